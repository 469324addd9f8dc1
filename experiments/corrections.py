"""Ablation of the output corrections of sparse sites, written into RESULTS.md.

    python experiments/corrections.py --output=results/corrections.json

For 8:16 and 2:4, the paper's method (robust score, auto policy at coverage >= 0.55) and naive
(|x| score, every site sparse): the plan without correction, each correction alone and the
combinations, fitted on the 8 calibration windows of lee_background (on the dense model's
inputs; the best combination also "sequential"ly and "global"ly, on the sparse model's), then
perplexity on the 8 evaluation windows of lee_background and of enwiki (never calibrated on).
Prints each row as it finishes, then a summary and the markdown table, and replaces the
"corrections" section of --results (and --output JSON; --from_json re-renders one). 71 minutes
on 2 busy CPU cores (96 perplexity evaluations, 44 calibrations of 8-60 s each).
"""

from __future__ import annotations

from _common import TRANSFER_TEXT, command_line, define_options, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.checks import (
  check_markdown_file,
  read_json_file,
  require_keys,
)
from amber_jax.runs.corrections import (
  DEFAULT_CORRECTIONS,
  DEFAULT_METHODS,
  CorrectionsConfig,
  corrections_markdown,
  run_corrections,
)
from amber_jax.runs.markdown import update_markdown_section

OPTS = define_options(
  "model",
  "num_windows",
  "calib_windows",
  "text",
  "text_file",
  "output",
  "cache_dir",
  num_windows=(8, "Evaluation windows per text."),
  text_file=TRANSFER_TEXT,
)
_PATTERNS = flags.DEFINE_list("patterns", ["8:16", "2:4"], "N:M patterns.")
_METHODS = flags.DEFINE_list(
  "methods",
  list(DEFAULT_METHODS),
  "Base plans (amber_jax.calibrate.methods names): amber (or paper), naive, naive_rules, "
  "search, ...",
)
_CORRECTIONS = flags.DEFINE_list(
  "corrections",
  list(DEFAULT_CORRECTIONS),
  "Corrections ('a+b' combines; '@sequential' or '@global' fits on the sparse model's inputs).",
)
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "Coverage target of the paper's (auto) policy.")
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")
_FROM_JSON = flags.DEFINE_string(
  "from_json", None, "Re-render the table of a saved --output JSON instead of running."
)


def _from_json() -> str:
  """The markdown of a saved --output JSON (ValueError naming --from_json if it is not one)."""
  result = read_json_file(_FROM_JSON.value, arg="--from_json")
  require_keys(result, ("rows", "dense", "config"), arg="--from_json", what="corrections")
  try:
    return corrections_markdown(result, result.get("command", "python experiments/corrections.py"))
  except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError) as e:
    raise ValueError(
      f"--from_json {_FROM_JSON.value!r} is not a complete corrections results file "
      f"({type(e).__name__}: {e})"
    ) from None


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _FROM_JSON.value:
    markdown = _from_json()
    print(markdown)
    if _RESULTS.value:
      update_markdown_section(_RESULTS.value, "corrections", markdown)
    return
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  cfg = CorrectionsConfig(
    **OPTS.fields(CorrectionsConfig, text_file="transfer_text"),
    patterns=tuple(_PATTERNS.value),
    methods=tuple(_METHODS.value),
    corrections=tuple(_CORRECTIONS.value),
    coverage=_COVERAGE.value,
  )
  result = run_corrections(cfg)
  command = command_line(skip=("--cache_dir", "--output", "--results"))
  result["command"] = command
  markdown = corrections_markdown(result, command)
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "corrections", markdown)
  if OPTS.output:
    write_json_atomic(OPTS.output, result)


if __name__ == "__main__":
  run(main)
