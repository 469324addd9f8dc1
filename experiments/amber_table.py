"""The score x policy x pattern perplexity table of Amber Pruner, written into RESULTS.md.

    python experiments/amber_table.py

Evaluates dense, then naive/weight/robust scores x all/paper/auto policies x
2:4, 4:8, 8:16 on the default model and text (8 windows x 512; auto calibrates on
the next 8 windows at coverage >= 0.55), prints each row as it finishes, and
replaces the "amber-table" section of RESULTS.md (and --output JSON). About
10-15 minutes on 2 CPU cores.
"""

from __future__ import annotations

from _common import command_line, define_options, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.amber_table import (
  AmberTableConfig,
  amber_table_markdown,
  run_amber_table,
)
from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.markdown import update_markdown_section

OPTS = define_options("model", "num_windows", "output", "cache_dir")
_PATTERNS = flags.DEFINE_list("patterns", ["2:4", "4:8", "8:16"], "N:M patterns.")
_SCORES = flags.DEFINE_list("scores", ["naive", "weight", "robust"], "Scores.")
_POLICIES = flags.DEFINE_list("policies", ["all", "paper", "auto"], "Policies.")
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "Coverage target of the auto policy.")
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  cfg = AmberTableConfig(
    **OPTS.fields(AmberTableConfig),
    patterns=tuple(_PATTERNS.value),
    scores=tuple(_SCORES.value),
    policies=tuple(_POLICIES.value),
    coverage=_COVERAGE.value,
  )
  result = run_amber_table(cfg)
  markdown = amber_table_markdown(result, command_line())
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "amber-table", markdown)
  if OPTS.output:
    write_json_atomic(OPTS.output, result)


if __name__ == "__main__":
  run(main)
