"""Coverage-quality front and ablation of the methods beyond the paper (issue 8), into RESULTS.md.

    python experiments/front.py --output=results/front.json

For each pattern and coverage target, the plan of each method (amber_jax.calibrate.methods names:
naive_rules and amber under the paper's site rules; the KL-searched sites; searched + median
correction; searched + learned score factors at the goal coverage only), calibrated on the main
text's calibration windows, then perplexity on its evaluation windows (and at the goal coverage also
on the transfer text, never calibrated on). Rows are saved to --output as they finish; a rerun skips
them. Writes the table and the ablation into the "front" section of --results and the plot to
--plot. The defaults took 42 minutes on 2 CPU cores (two patterns; site costs were measured before
they resumed passes at the site's layer, which now saves about 3 minutes per pattern). Rerunning
with other --methods or --coverages adds rows to the same --output (e.g. --methods=search+learned12
--coverages=0.55).
RESULTS.md's rows with head-mixed o groups come from
--methods=search_mixed,search_mixed+median,search_mixed+learned,search_mixed+learnedscale
(32 minutes) and --methods=search_mixed+median+learned,search_mixed+median+learnedscale
--coverages=0.55.
"""

from __future__ import annotations

from pathlib import Path

from _common import TRANSFER_TEXT, command_line, define_options, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.checks import (
  check_markdown_file,
  parse_floats,
  read_json_file,
  require_keys,
)
from amber_jax.runs.front import (
  DEFAULT_COVERAGES,
  DEFAULT_METHODS,
  FrontConfig,
  front_markdown,
  run_front,
  save_front_plots,
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
  output=(None, "JSON results path (rows saved as they finish)."),
)
_PATTERNS = flags.DEFINE_list("patterns", ["8:16", "2:4"], "N:M patterns.")
_METHODS = flags.DEFINE_list(
  "methods",
  list(DEFAULT_METHODS),
  "amber_jax.calibrate.methods names with a coverage target: naive_rules (was 'naive'), amber (or "
  "paper), search, search_mixed (o groups mix heads), and for search or search_mixed: "
  "+<correction>, +learned[N] (N optimiser steps, default 4), +learnedscale[N] (also output "
  "scales); best.",
)
_ROTATIONS = flags.DEFINE_list(
  "rotations",
  ["none"],
  "amber_jax.rotate names, every method runs on each: none, or <place>_<basis> parts joined by "
  "'+': res_{fold,pca,balance,hadamard,random}, head_{pca,hadamard,random}, "
  "down_{balance,hadamard} (e.g. res_pca+head_pca+down_balance).",
)
_COVERAGES = flags.DEFINE_list(
  "coverages", [str(c) for c in DEFAULT_COVERAGES], "Coverage targets."
)
_GOAL = flags.DEFINE_float(
  "goal_coverage", 0.55, "Target where the transfer text and learned factors are evaluated."
)
_SEARCH_WINDOWS = flags.DEFINE_integer(
  "search_windows", 2, "Calibration windows for the per-site KL costs."
)
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")
_PLOT = flags.DEFINE_string(
  "plot",
  "results/plots/coverage_front.png",
  "PNG ('' to skip); learning_curves.png goes next to it.",
)
_FROM_JSON = flags.DEFINE_string(
  "from_json", None, "Re-render the table and plot of a saved --output JSON instead of running."
)


def _check_outputs() -> None:
  """--results and --plot (and learning_curves.png next to it) can be written."""
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _PLOT.value:
    check_output_file(_PLOT.value, arg="--plot")
    check_output_file(Path(_PLOT.value).with_name("learning_curves.png"), arg="--plot")


def _render(result: dict) -> str:
  try:
    return front_markdown(result)
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(
      f"--from_json {_FROM_JSON.value!r} is not a complete front results file "
      f"({type(e).__name__}: {e})"
    ) from None


def main(argv):
  del argv
  _check_outputs()
  if _FROM_JSON.value:
    result = read_json_file(_FROM_JSON.value, arg="--from_json")
    require_keys(result, ("rows", "dense", "config"), arg="--from_json", what="front")
    markdown = _render(result)
  else:
    cfg = FrontConfig(
      **OPTS.fields(FrontConfig, text_file="transfer_text"),
      patterns=tuple(_PATTERNS.value),
      methods=tuple(_METHODS.value),
      coverages=parse_floats(_COVERAGES.value, arg="--coverages"),
      goal_coverage=_GOAL.value,
      search_windows=_SEARCH_WINDOWS.value,
      rotations=tuple(_ROTATIONS.value),
    )
    result = run_front(cfg)
    command = command_line(skip=("--cache_dir", "--output", "--results", "--plot"))
    if command not in result["commands"]:
      result["commands"].append(command)
    if OPTS.output:
      write_json_atomic(OPTS.output, result)
    markdown = front_markdown(result)
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "front", markdown)
  if _PLOT.value:
    for path in save_front_plots(result, _PLOT.value):
      print(f"wrote {path}")


if __name__ == "__main__":
  run(main)
