#!/usr/bin/env bash
# Third prepared GPU session (at most 8.5 minutes of steps on one H200; run through the
# device tool, or by hand on a CUDA machine): what is new since the first two sessions,
# compiled and timed.
#   1. the GPU kernel tests: the Mosaic GPU int8 kernel (Hopper only), the mask kernel, the
#      Triton kernels again (errors against the references are printed);
#   2. the kernel sweep at the prefill shapes: XLA dense vs the two-pass N:M route (mask
#      pass alone, mask pass + dot), the fused kernel with its new sorting-network mask, and
#      the int8 kernels (Mosaic GPU autotuned);
#   3. the 8B-shaped prefill with impl pallas_mask next to xla (sorting network).
# Logs and JSON go to $OUT. Each step has its own timeout so one hang cannot eat the rest.
set -u
OUT=${OUT:-/tmp/amber_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_int8_matmul.py \
  tests/test_nm_mask.py tests/test_nm_matmul.py -k "gpu or mgpu" 2>&1 | tail -60 | tee "$OUT/kernel_tests.log"
timeout 260 python3 experiments/bench_kernels.py --autotune --autotune_kernels=mgpu_int8 \
  --methods=xla_dense,xla_mask_dot,pallas_mask,pallas_mask_dot,pallas_nm,xla_int8,mgpu_int8,mgpu_nm_int8 \
  --output="$OUT/bench_kernels3.json" 2>&1 | tee "$OUT/bench_kernels3.log"
timeout 100 python3 experiments/bench_prefill.py --random_init=llama-3.1-8b --dtype=bfloat16 \
  --impls=xla,pallas_mask --batch_sizes=1 --seq_lens=2048 --repeats=5 --peak_tflops=989 \
  --output="$OUT/bench_prefill3.json" 2>&1 | grep -v xla_bridge | tee "$OUT/bench_prefill3.log"
