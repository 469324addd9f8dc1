"""Per-site sensitivity table and heatmap (layers x projections) of the real model.

    python experiments/sensitivity.py --pattern=8:16 --score=robust --heatmap=sensitivity.png

Prints ||Y - Y'|| / ||Y|| of every projection of every layer when only that
projection's input is sparsified (measured on 8 calibration windows of 512 tokens
that follow the 8 evaluation windows), the per-projection means, and the layers
whose q/gate the auto policy keeps dense at --coverage. About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
from _common import define_options, run
from absl import flags

from amber_jax.core.scores import SCORES
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.plots import save_sensitivity_heatmap
from amber_jax.runs.sensitivity import SensitivityRunConfig, run_sensitivity

OPTS = define_options("model", "calib_windows", "seq_len", "output", "cache_dir")
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern.")
_SCORE = flags.DEFINE_enum("score", "robust", list(SCORES), "Selection score.")
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "Coverage target for the auto choice.")
_HEATMAP = flags.DEFINE_string("heatmap", "sensitivity.png", "PNG heatmap path ('' to skip).")


def main(argv):
  del argv
  if _HEATMAP.value:
    check_output_file(_HEATMAP.value, arg="--heatmap")
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  cfg = SensitivityRunConfig(
    **OPTS.fields(SensitivityRunConfig),
    pattern=_PATTERN.value,
    score=_SCORE.value,
    coverage=_COVERAGE.value,
  )
  result = run_sensitivity(cfg)
  print(
    f"relative output error per site ({cfg.pattern}, score={cfg.score}, "
    f"{result['tokens']} calibration tokens):"
  )
  print(result["table"])
  print(
    f"auto policy at coverage >= {cfg.coverage}: q/gate dense in layers "
    f"{result['skip_layers']} ({result['seconds']:.1f} s for factors + sensitivity + search)"
  )
  if _HEATMAP.value:
    path = save_sensitivity_heatmap(
      np.asarray(result["errors"]),
      result["projections"],
      _HEATMAP.value,
      title=f"{cfg.model} {cfg.pattern} score={cfg.score}",
      skip_layers=result["skip_layers"],
    )
    print(f"wrote {path}")
  if OPTS.output:
    write_json_atomic(OPTS.output, result)


if __name__ == "__main__":
  run(main)
