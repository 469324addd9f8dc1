"""Each rotation's effect on each projection's N:M cost, into RESULTS.md (issue 19).

    python experiments/rotation_costs.py --output=results/rotation_costs.json

For each pattern and rotation (amber_jax.rotate names; calibrated on the calibration windows
the front uses), the KL to the dense model with one projection sparse in every layer, next to
the unrotated model's, and the dense model's largest logit change. About 20 minutes for the
defaults on 2 CPU cores (12 rotations x 2 patterns).
"""

from __future__ import annotations

from _common import TRANSFER_TEXT, command_line, define_options, run
from absl import flags

from amber_jax.io.atomic import write_json_atomic
from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.markdown import update_markdown_section
from amber_jax.runs.rotation_costs import (
  DEFAULT_ROTATIONS,
  RotationCostsConfig,
  rotation_costs_markdown,
  run_rotation_costs,
)

OPTS = define_options(
  "model",
  "num_windows",
  "calib_windows",
  "text",
  "text_file",
  "output",
  "cache_dir",
  text_file=TRANSFER_TEXT,
)
_PATTERNS = flags.DEFINE_list("patterns", ["8:16", "2:4"], "N:M patterns.")
_ROTATIONS = flags.DEFINE_list(
  "rotations", list(DEFAULT_ROTATIONS), "amber_jax.rotate names (see experiments/front.py)."
)
_SEARCH_WINDOWS = flags.DEFINE_integer("search_windows", 2, "Calibration windows for the KL.")
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown file to update ('' to skip).")


def main(argv):
  del argv
  if _RESULTS.value:
    check_markdown_file(_RESULTS.value, arg="--results")
  cfg = RotationCostsConfig(
    **OPTS.fields(RotationCostsConfig, text_file="transfer_text"),
    patterns=tuple(_PATTERNS.value),
    rotations=tuple(_ROTATIONS.value),
    search_windows=_SEARCH_WINDOWS.value,
  )
  result = run_rotation_costs(cfg)
  markdown = rotation_costs_markdown(
    result, command_line(skip=("--cache_dir", "--output", "--results"))
  )
  print(markdown)
  if _RESULTS.value:
    update_markdown_section(_RESULTS.value, "rotation-costs", markdown)
  if cfg.output:
    write_json_atomic(cfg.output, result)


if __name__ == "__main__":
  run(main)
