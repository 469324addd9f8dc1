"""Methods on equal terms (issue 18): Amber and the baselines of other papers, into RESULTS.md.

    python experiments/compare.py --output=results/compare.json

Rows: dense, naive top-k, amber (Amber Pruner), best (the project's best recipe), wanda and
sparsegpt (weight pruning), teal and cats (activation thresholds); columns: 2:4, 4:8, 8:16 for
the N:M methods (activation N:M, or weight N:M for wanda/sparsegpt) and, for the unstructured
ones, same_sites (50% of the sites amber sparsifies at --match_pattern) and same_removed (the
share of linear multiply-adds amber removes there). Per entry: perplexity of --num_windows
windows of the main text and of --text_file (never calibrated on), the BIG-bench average
acc_norm change vs dense with a paired standard error (--subsample examples per task), the
share of greedy tokens equal to dense, and the calibration time. Calibration: --calib_windows
windows of the main text after the evaluation windows. Entries are saved to --output as they
finish; a rerun skips them. Writes the "compare" section of --results and the plot --plot.
The run in RESULTS.md: the commands there; its 23 entries took 82 minutes on 2 CPU cores (half
of the first dozen beside the test suite): about 2 minutes per entry (BIG-bench at 20 examples
per task is most of it), plus the calibration: 1-2 minutes for wanda/sparsegpt/teal, 3 for TEAL's
greedy search, 11 per pattern for best (site search and learned factors).
"""

from __future__ import annotations

from _common import TRANSFER_TEXT, command_line, define_options, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.checks import check_markdown_file, read_json_file, require_keys
from amber_jax.runs.compare import (
  DEFAULT_METHODS,
  MATCHED_COLUMNS,
  NM_COLUMNS,
  CompareConfig,
  compare_markdown,
  run_compare,
  save_compare_plot,
)
from amber_jax.runs.markdown import update_markdown_section

OPTS = define_options(
  "model",
  "num_windows",
  "calib_windows",
  "seq_len",
  "batch_size",
  "dtype",
  "text",
  "text_file",
  "output",
  "cache_dir",
  num_windows=(4, "Evaluation windows per text."),
  text_file=TRANSFER_TEXT,
  output=(None, "JSON results path (entries saved as they finish; resumed)."),
)
_METHODS = flags.DEFINE_list(
  "methods",
  list(DEFAULT_METHODS),
  "amber_jax.calibrate.methods names: dense, naive, amber, best (and any N:M recipe), wanda, "
  "sparsegpt, teal, teal_uniform, cats.",
)
_PATTERNS = flags.DEFINE_list("patterns", list(NM_COLUMNS), "N:M columns.")
_MATCHED = flags.DEFINE_list(
  "matched", list(MATCHED_COLUMNS), "Unstructured columns: same_sites, same_removed."
)
_MATCH_PATTERN = flags.DEFINE_string(
  "match_pattern", "8:16", "The amber plan whose sites and removed share the matched columns copy."
)
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "Coverage target of amber and best.")
_SUBSAMPLE = flags.DEFINE_integer("subsample", 50, "BIG-bench examples per task (seeded subset).")
_GEN_PROMPTS = flags.DEFINE_integer("gen_prompts", 4, "Prompts for generation agreement (0: off).")
_TEAL_STEP = flags.DEFINE_float("teal_greedy_step", 0.05, "TEAL's greedy step (base_step_size).")
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")
_PLOT = flags.DEFINE_string("plot", "results/plots/compare.png", "PNG ('' to skip).")
_FROM_JSON = flags.DEFINE_string(
  "from_json", None, "Re-render the table and plot of a saved --output JSON instead of running."
)


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _PLOT.value:
    check_output_file(_PLOT.value, arg="--plot")
  if _FROM_JSON.value:
    result = read_json_file(_FROM_JSON.value, arg="--from_json")
    require_keys(result, ("entries", "config"), arg="--from_json", what="compare")
  else:
    cfg = CompareConfig(
      **OPTS.fields(CompareConfig, text_file="transfer_text"),
      methods=tuple(_METHODS.value),
      patterns=tuple(_PATTERNS.value),
      matched=tuple(_MATCHED.value),
      match_pattern=_MATCH_PATTERN.value,
      coverage=_COVERAGE.value,
      subsample=_SUBSAMPLE.value,
      gen_prompts=_GEN_PROMPTS.value,
      teal_greedy_step=_TEAL_STEP.value,
    )
    result = run_compare(cfg)
    result["command"] = command_line(skip=("--cache_dir", "--output", "--results", "--plot"))
    write_json_atomic(cfg.output, result)
  markdown = compare_markdown(result)
  if "command" in result:
    markdown = f"`{result['command']}`\n\n" + markdown
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "compare", "## Methods on equal terms\n\n" + markdown)
  if _PLOT.value:
    print(f"wrote {save_compare_plot(result, _PLOT.value)}")


if __name__ == "__main__":
  run(main)
