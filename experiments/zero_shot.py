"""Zero-shot BIG-bench accuracy, dense vs N:M (naive and Amber Pruner), resumable.

Command (10 packaged tasks, dense + 8:16 and 2:4 with both methods; the RESULTS.md table):

    python experiments/zero_shot.py --subsample=200 --output=results/zero_shot.json
    python experiments/report.py     # tables into RESULTS.md, plots into results/plots/

Each (method x pattern, task) pair is saved in --output as soon as it finishes; rerunning the
same command skips the finished pairs (an entry made with another --limit, --num_fewshot or
--model is an error). A short check, 20 questions of one task, dense only:

    python experiments/zero_shot.py --tasks=physical_intuition --patterns=dense --limit=20 \
      --output=/tmp/zero_shot.json

The choices of a question are scored in one packed row (the context once). The full dense row
(9,285 questions, 20,411 choices) took 47 minutes on 2 CPU cores shared with other jobs (load
average 5-8; results/zero_shot_dense_full.json); the RESULTS.md table uses a seeded random subset
of 200 questions per task (--subsample=200, 1,871 questions per row, about 8-15 minutes a row),
the same questions for every row, so the change vs dense is measured pairwise.

Only the table, from an existing results file (nothing evaluated):

    python experiments/zero_shot.py --output=zero_shot.json --report --results=RESULTS.md
"""

from __future__ import annotations

from pathlib import Path

from _common import define_options, run
from absl import flags

from amber_jax.data.bigbench import BIGBENCH_TASKS
from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.markdown import update_markdown_section
from amber_jax.runs.zero_shot import (
  METHODS,
  ZeroShotConfig,
  load_results,
  needs_calibration,
  report_markdown,
  run_zero_shot,
)

OPTS = define_options(
  "model",
  "batch_size",
  "dtype",
  "calib_windows",
  "text_file",
  "impl",
  "output",
  "cache_dir",
  batch_size=(8, "Scored choices per forward pass."),
  calib_windows=(8, "amber: calibration windows (after the 8 perplexity windows of the text)."),
  text_file=(None, "Calibration text for amber (default: gensim's lee_background.cor)."),
  output=(None, "Results JSON (resumed when it exists)."),
)
_TASKS = flags.DEFINE_list(
  "tasks", list(BIGBENCH_TASKS), "Packaged BIG-bench task names or paths to BIG-bench JSON files."
)
_PATTERNS = flags.DEFINE_list(
  "patterns",
  ["dense", "8:16", "2:4"],
  "'dense', N:M patterns and/or unstructured targets ('50%': the baselines wanda, sparsegpt, "
  "teal, teal_uniform, cats; each method gets the targets it takes).",
)
_METHODS = flags.DEFINE_list(
  "methods",
  list(METHODS),
  "For each sparse pattern, amber_jax.calibrate.methods names: naive (all linears, |x|), "
  "amber (auto "
  "policy, robust score), or any other sparse method (search_mixed, best, ...), and the "
  "baselines wanda, sparsegpt (N:M or a % target), teal, teal_uniform, cats (a % target).",
)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", 0, "Solved examples before each question.")
_LIMIT = flags.DEFINE_integer("limit", None, "The first questions of each task (default: all).")
_SUBSAMPLE = flags.DEFINE_integer(
  "subsample", None, "Instead of --limit: a seeded random subset of this many questions per task."
)
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "amber: minimum share of linear MACs sparsified.")
_REPORT = flags.DEFINE_bool(
  "report", False, "Only print the table of --output (and write --results); evaluate nothing."
)
_RESULTS = flags.DEFINE_string(
  "results", None, "Markdown file whose 'zero-shot' section gets the table (e.g. RESULTS.md)."
)
flags.mark_flag_as_required("output")


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _REPORT.value:
    if not Path(OPTS.output).is_file():
      raise ValueError(f"--report needs an existing --output file, {OPTS.output!r} is not one")
    result = {"results": load_results(OPTS.output)}
  else:
    if not needs_calibration(_PATTERNS.value, _METHODS.value):
      given = [f"--{n}" for n in ("text_file", "coverage", "calib_windows") if OPTS.present(n)]
      if given:  # would be silently ignored
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(
          f"{', '.join(given)} only {verb} to amber rows (--methods with a calibrated method "
          "such as amber and a sparse --patterns entry)"
        )
    cfg = ZeroShotConfig(
      **OPTS.fields(ZeroShotConfig),
      tasks=tuple(_TASKS.value),
      patterns=tuple(_PATTERNS.value),
      methods=tuple(_METHODS.value),
      num_fewshot=_NUM_FEWSHOT.value,
      limit=_LIMIT.value,
      subsample=_SUBSAMPLE.value,
      coverage=_COVERAGE.value,
    )
    result = run_zero_shot(cfg)
  if not result["results"]:
    raise ValueError(f"no finished entries in {OPTS.output}")
  table = report_markdown(result)
  print(table)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "zero-shot", "## Zero-shot accuracy\n\n" + table)
    print(f"wrote the zero-shot section of {_RESULTS.value}")


if __name__ == "__main__":
  run(main)
