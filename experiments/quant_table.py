"""W8A8 and Outstanding-sparse perplexity table, written into RESULTS.md.

    python experiments/quant_table.py

Rows: dense; W8A8 with SmoothQuant (a=0.5); W8A8 with the inverted "outstanding" smoothing
(a=0.10); Amber (auto policy, robust score) at 8:16 and 2:4; Outstanding-sparse (outstanding
W8A8 + the same Amber plan) in both orders. Prints each row as it finishes and replaces the
"quant-table" section of RESULTS.md. About 5-8 minutes on 2 CPU cores.
"""

from __future__ import annotations

from _common import command_line, define_options, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.markdown import update_markdown_section
from amber_jax.runs.quant_table import (
  QuantTableConfig,
  quant_table_markdown,
  run_quant_table,
)

OPTS = define_options("model", "num_windows", "output", "cache_dir")
_PATTERNS = flags.DEFINE_list("patterns", ["8:16", "2:4"], "N:M patterns.")
_ACT_SCALE = flags.DEFINE_enum("act_scale", "token", ["token", "tensor"], "Activation scales.")
_ROTATIONS = flags.DEFINE_list(
  "rotations",
  ["none"],
  "amber_jax.rotate names (none, res_pca, res_hadamard, head_pca+..., see experiments/front.py); "
  "each rotated model gets every row again, per pattern.",
)
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  cfg = QuantTableConfig(
    **OPTS.fields(QuantTableConfig),
    patterns=tuple(_PATTERNS.value),
    act_scale=_ACT_SCALE.value,
    rotations=tuple(_ROTATIONS.value),
  )
  result = run_quant_table(cfg)
  markdown = quant_table_markdown(
    result, command_line(skip=("--cache_dir", "--output", "--results"))
  )
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "quant-table", markdown)
  if OPTS.output:
    write_json_atomic(OPTS.output, result)


if __name__ == "__main__":
  run(main)
