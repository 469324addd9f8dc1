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

import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CACHE_DIR_DEFAULT, default_cache_dir, define_impl_flag, run  # noqa: E402

from amber_jax.report import update_markdown_section  # noqa: E402
from amber_jax.runs.checks import check_markdown_file  # noqa: E402
from amber_jax.runs.common import DTYPES  # noqa: E402
from amber_jax.runs.generation import (  # noqa: E402
  DEFAULT_TASKS,
  RESULTS_FORMAT,
  GenerationConfig,
  generation_markdown,
  run_generation,
)
from amber_jax.runs.zero_shot import METHODS, load_results, needs_calibration  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Known model name, .gguf file or HF dir.")
_TASKS = flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "Packaged task names or JSON files.")
_PATTERNS = flags.DEFINE_list("patterns", ["dense", "8:16", "2:4"], "'dense' and/or N:M.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "naive and/or amber, per sparse pattern.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", 3, "Solved examples before each question.")
_LIMIT = flags.DEFINE_integer("limit", 100, "Questions per task (the first ones).")
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", None, "Tokens generated (default: longest answer's tokens + 2, per task)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per generation call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Compute and parameter dtype.")
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "amber: minimum share of linear MACs sparsified.")
_IMPL = define_impl_flag()
flags.declare_key_flag("impl")  # defined in _common: listed by --help, not only --helpfull
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON (resumed when it exists).")
_REPORT = flags.DEFINE_bool("report", False, "Only print the table of --output; evaluate nothing.")
_RESULTS = flags.DEFINE_string("results", None, "Markdown file whose 'generation' section is set.")
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir",
  None,
  f"Model/text cache (default: {CACHE_DIR_DEFAULT}).",
)
flags.mark_flag_as_required("output")


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _REPORT.value:
    if not Path(_OUTPUT.value).is_file():
      raise ValueError(f"--report needs an existing --output file, {_OUTPUT.value!r} is not one")
    result = {
      "results": load_results(
        _OUTPUT.value, fmt=RESULTS_FORMAT, need=("exact_match", "n", "answers", "settings")
      )
    }
  else:
    if _COVERAGE.present and not needs_calibration(_PATTERNS.value, _METHODS.value):
      raise ValueError(  # would be silently ignored
        "--coverage only applies to amber rows (--methods with amber and a sparse --patterns entry)"
      )
    cfg = GenerationConfig(
      model=_MODEL.value,
      tasks=tuple(_TASKS.value),
      patterns=tuple(_PATTERNS.value),
      methods=tuple(_METHODS.value),
      num_fewshot=_NUM_FEWSHOT.value,
      limit=_LIMIT.value,
      max_new_tokens=_MAX_NEW.value,
      batch_size=_BATCH_SIZE.value,
      dtype=_DTYPE.value,
      coverage=_COVERAGE.value,
      output=_OUTPUT.value,
      cache_dir=_CACHE_DIR.value or default_cache_dir(),
      impl=_IMPL.value,
    )
    result = run_generation(cfg)
  if not result["results"]:
    raise ValueError(f"no finished entries in {_OUTPUT.value}")
  table = generation_markdown(result)
  print(table)
  if _RESULTS.value:
    update_markdown_section(
      _RESULTS.value, "generation", "## Generation under sparse prefill\n\n" + table
    )
    print(f"wrote the generation section of {_RESULTS.value}")


if __name__ == "__main__":
  run(main)
