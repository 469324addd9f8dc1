#!/usr/bin/env bash
# Second GPU session: the XLA mask algorithms next to the dense dot, and the 8B prefill with
# each sparse implementation (tuned Triton block sizes from the first session).
set -u
OUT=${OUT:-/tmp/amber_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 90 python3 experiments/bench_masks.py --shapes=full --repeats=10 2>&1 \
  | grep -v xla_bridge | tee "$OUT/bench_masks.log"
timeout 200 python3 experiments/bench_prefill.py --random_init=llama-3.1-8b --dtype=bfloat16 \
  --impls=xla,xla-sortnet,xla-topk,pallas --batch_sizes=1 --seq_lens=2048 --repeats=3 \
  --output="$OUT/bench_prefill_llama8b_2.json" 2>&1 | grep -v xla_bridge | tee "$OUT/bench_prefill2.log"
