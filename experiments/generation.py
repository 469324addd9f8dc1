"""Generative BIG-bench evaluation: greedy answers under sparse prefill, exact match, agreement.

Command (the RESULTS.md table: 3 tasks, 100 questions each, 3-shot; dense, 8:16 and 2:4 with the
naive and Amber plans):

    python experiments/generation.py --output=results/generation.json --results=RESULTS.md

Each multiple-choice question is asked without scoring the choices: the model must write the
answer ("plausible", "True", "05/01/2021"), which counts when it equals a correct choice. Prefill
follows the plan; decode is dense against the cache the sparse prefill wrote. Sparse rows also
report how many answers equal the dense model's. Resumable like zero_shot.py (finished
(row, task) pairs are skipped). Any BIG-bench JSON file works as a task, including generative
ones (``"target"`` strings).

Only the table, from an existing results file:

    python experiments/generation.py --output=results/generation.json --report --results=RESULTS.md
"""

from __future__ import annotations

from pathlib import Path

from _common import define_options, run
from absl import flags

from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.generation import (
  DEFAULT_TASKS,
  RESULTS_FORMAT,
  GenerationConfig,
  generation_markdown,
  run_generation,
)
from amber_jax.runs.markdown import update_markdown_section
from amber_jax.runs.zero_shot import METHODS, load_results, needs_calibration

OPTS = define_options(
  "model",
  "batch_size",
  "dtype",
  "impl",
  "output",
  "cache_dir",
  batch_size=(8, "Prompts per generation call."),
  output=(None, "Results JSON (resumed when it exists)."),
)
_TASKS = flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "Packaged task names or JSON files.")
_PATTERNS = flags.DEFINE_list(
  "patterns",
  ["dense", "8:16", "2:4"],
  "'dense', N:M patterns and/or unstructured targets ('50%': the baselines wanda, sparsegpt, "
  "teal, teal_uniform, cats; each method gets the targets it takes).",
)
_METHODS = flags.DEFINE_list(
  "methods",
  list(METHODS),
  "amber_jax.calibrate.methods names (naive, amber, ..., and the baselines wanda, sparsegpt, "
  "teal, teal_uniform, cats), per sparse pattern.",
)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", 3, "Solved examples before each question.")
_LIMIT = flags.DEFINE_integer("limit", 100, "Questions per task (the first ones).")
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", None, "Tokens generated (default: longest answer's tokens + 2, per task)."
)
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "amber: minimum share of linear MACs sparsified.")
_REPORT = flags.DEFINE_bool("report", False, "Only print the table of --output; evaluate nothing.")
_RESULTS = flags.DEFINE_string("results", None, "Markdown file whose 'generation' section is set.")
flags.mark_flag_as_required("output")


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _REPORT.value:
    if not Path(OPTS.output).is_file():
      raise ValueError(f"--report needs an existing --output file, {OPTS.output!r} is not one")
    result = {
      "results": load_results(
        OPTS.output, fmt=RESULTS_FORMAT, need=("exact_match", "n", "answers", "settings")
      )
    }
  else:
    if _COVERAGE.present and not needs_calibration(_PATTERNS.value, _METHODS.value):
      raise ValueError(  # would be silently ignored
        "--coverage only applies to amber rows (--methods with a calibrated method such as "
        "amber and a sparse --patterns entry)"
      )
    cfg = GenerationConfig(
      **OPTS.fields(GenerationConfig),
      tasks=tuple(_TASKS.value),
      patterns=tuple(_PATTERNS.value),
      methods=tuple(_METHODS.value),
      num_fewshot=_NUM_FEWSHOT.value,
      limit=_LIMIT.value,
      max_new_tokens=_MAX_NEW.value,
      coverage=_COVERAGE.value,
    )
    result = run_generation(cfg)
  if not result["results"]:
    raise ValueError(f"no finished entries in {OPTS.output}")
  table = generation_markdown(result)
  print(table)
  if _RESULTS.value:
    update_markdown_section(
      _RESULTS.value, "generation", "## Generation under sparse prefill\n\n" + table
    )
    print(f"wrote the generation section of {_RESULTS.value}")


if __name__ == "__main__":
  run(main)
