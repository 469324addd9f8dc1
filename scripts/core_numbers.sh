#!/usr/bin/env bash
# The numbers the core redesign must not move (issue 16), each to the last digit, as JSON files
# in $1: dense / naive / Amber 8:16 with a plan saved and restored, W8A8 SmoothQuant, and
# search_mixed 8:16 at coverage 0.55. Run before and after a change on the same machine; compare
# with `diff -r`. About 12 minutes on 2 cores.
set -euo pipefail
out=${1:?usage: scripts/core_numbers.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python experiments/prefill.py --pattern=8:16 --save_plan="$out/amber_plan" --output="$out/prefill.json"
python experiments/prefill.py --pattern=8:16 --load_plan="$out/amber_plan" --output="$out/restored.json"
python experiments/prefill.py --pattern=8:16 --quant=w8a8 --smooth=smoothquant --output="$out/w8a8_smoothquant.json"
python experiments/front.py --patterns=8:16 --methods=search_mixed --coverages=0.55 --results= --plot= \
  --output="$out/front_search_mixed.json"
