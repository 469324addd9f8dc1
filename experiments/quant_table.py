"""W8A8 and Outstanding-sparse perplexity table, written into RESULTS.md.

    python experiments/quant_table.py

Rows: dense; W8A8 with SmoothQuant (a=0.5); W8A8 with the inverted "outstanding" smoothing
(a=0.10); Amber (auto policy, robust score) at 8:16 and 2:4; Outstanding-sparse (outstanding
W8A8 + the same Amber plan) in both orders. Prints each row as it finishes and replaces the
"quant-table" section of RESULTS.md. About 5-8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys

from _common import default_cache_dir, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.markdown import update_markdown_section
from amber_jax.runs.quant_table import (
  QuantTableConfig,
  quant_table_markdown,
  run_quant_table,
)

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Known model name, .gguf file or HF dir.")
_PATTERNS = flags.DEFINE_list("patterns", ["8:16", "2:4"], "N:M patterns.")
_ACT_SCALE = flags.DEFINE_enum("act_scale", "token", ["token", "tensor"], "Activation scales.")
_NUM_WINDOWS = flags.DEFINE_integer("num_windows", 8, "Evaluation windows.")
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results path.")
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir", None, "Cache directory (default: ~/.cache/amber_jax)."
)


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  cfg = QuantTableConfig(
    model=_MODEL.value,
    patterns=tuple(_PATTERNS.value),
    act_scale=_ACT_SCALE.value,
    num_windows=_NUM_WINDOWS.value,
    cache_dir=_CACHE_DIR.value or default_cache_dir(),
  )
  result = run_quant_table(cfg)
  command = "python experiments/quant_table.py" + "".join(
    f" {a}" for a in sys.argv[1:] if not a.startswith(("--cache_dir", "--output"))
  )
  markdown = quant_table_markdown(result, command)
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "quant-table", markdown)
  if _OUTPUT.value:
    write_json_atomic(_OUTPUT.value, result)


if __name__ == "__main__":
  run(main)
