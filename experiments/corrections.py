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

import sys

from _common import CACHE_DIR_DEFAULT, default_cache_dir, run
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

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Known model name, .gguf file or HF dir.")
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
_NUM_WINDOWS = flags.DEFINE_integer("num_windows", 8, "Evaluation windows per text.")
_CALIB_WINDOWS = flags.DEFINE_integer("calib_windows", 8, "Calibration windows (main text).")
_TEXT = flags.DEFINE_string("text", "lee_background", "Main text: evaluation and calibration.")
_TEXT_FILE = flags.DEFINE_string(
  "text_file", "enwiki", "Second text (known name or UTF-8 file), evaluation only ('' to skip)."
)
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results path.")
_FROM_JSON = flags.DEFINE_string(
  "from_json", None, "Re-render the table of a saved --output JSON instead of running."
)
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir",
  None,
  f"Cache directory (default: {CACHE_DIR_DEFAULT}).",
)


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  if _FROM_JSON.value:
    result = read_json_file(_FROM_JSON.value, arg="--from_json")
    require_keys(result, ("rows", "dense", "config"), arg="--from_json", what="corrections")
    try:
      markdown = corrections_markdown(
        result, result.get("command", "python experiments/corrections.py")
      )
    except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError) as e:
      raise ValueError(
        f"--from_json {_FROM_JSON.value!r} is not a complete corrections results file "
        f"({type(e).__name__}: {e})"
      ) from None
    print(markdown)
    if _RESULTS.value:
      update_markdown_section(_RESULTS.value, "corrections", markdown)
    return
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  cfg = CorrectionsConfig(
    model=_MODEL.value,
    patterns=tuple(_PATTERNS.value),
    methods=tuple(_METHODS.value),
    corrections=tuple(_CORRECTIONS.value),
    coverage=_COVERAGE.value,
    num_windows=_NUM_WINDOWS.value,
    calib_windows=_CALIB_WINDOWS.value,
    text=_TEXT.value,
    transfer_text=_TEXT_FILE.value,
    cache_dir=_CACHE_DIR.value or default_cache_dir(),
  )
  result = run_corrections(cfg)
  command = "python experiments/corrections.py" + "".join(
    f" {a}" for a in sys.argv[1:] if not a.startswith(("--cache_dir", "--output", "--results"))
  )
  result["command"] = command
  markdown = corrections_markdown(result, command)
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "corrections", markdown)
  if _OUTPUT.value:
    write_json_atomic(_OUTPUT.value, result)


if __name__ == "__main__":
  run(main)
