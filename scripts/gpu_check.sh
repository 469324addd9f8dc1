#!/usr/bin/env bash
# One prepared GPU session (run through the device tool, or by hand on a CUDA machine):
# kernel tests compiled for the GPU, the kernel sweep, and prefill throughput on random
# weights (the machine cannot fetch the real checkpoint). Logs and JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/amber_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_nm_matmul.py \
  tests/test_int8_matmul.py -k "gpu or lower" 2>&1 | tail -60 | tee "$OUT/kernel_tests.log"
timeout 210 python3 experiments/bench_kernels.py --autotune --output="$OUT/bench_kernels.json" \
  2>&1 | tee "$OUT/bench_kernels.log"
timeout 170 python3 experiments/bench_prefill.py --random_init=llama-3.1-8b --dtype=bfloat16 \
  --impls=xla,pallas --batch_sizes=1,4 --seq_lens=2048 --repeats=5 \
  --output="$OUT/bench_prefill_llama8b.json" 2>&1 | tee "$OUT/bench_prefill.log"
