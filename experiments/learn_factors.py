"""Learn the score factors of an Amber plan with optax (KL to the dense model), weights frozen.

    python experiments/learn_factors.py --pattern=8:16 --steps=60

Builds the paper's plan (auto policy, robust score, coverage >= 0.55, calibrated on the 8
windows after the 8 evaluation windows of lee_background), learns its per-channel score factors
on those calibration windows (straight-through N:M mask, see
amber_jax/calibrate/learned_factors.py), then reports perplexity before and after on the evaluation
windows and on the Wikipedia text (never used for calibration), the KL before/after on the
calibration windows, the loss curve and the time. --save_plan writes the learned plan (orbax) for
experiments/prefill.py --load_plan.
"""

from __future__ import annotations

import json
import math

from _common import define_options, run
from absl import flags

OPTS = define_options(
  "model",
  "batch_size",
  "calib_windows",
  "seq_len",
  "output",
  "cache_dir",
  batch_size=(2, "Calibration windows per step."),
)
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern.")
_POLICY = flags.DEFINE_enum("policy", "auto", ["all", "paper", "auto"], "Which sites are sparse.")
_SCORE = flags.DEFINE_enum("score", "robust", ["naive", "weight", "robust"], "Initial factors.")
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "Coverage target of the auto policy.")
_STEPS = flags.DEFINE_integer("steps", 60, "Optimiser steps.")
_LR = flags.DEFINE_float("learning_rate", 0.05, "Adam learning rate on log-factors.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.5, "Relative temperature of the surrogate.")
_OTHER_TEXT = flags.DEFINE_string("other_text", "enwiki", "Held-out text ('' to skip).")
_SAVE_PLAN = flags.DEFINE_string(
  "save_plan", None, "Write the learned plan here (orbax) for prefill.py --load_plan."
)


def _check_flags() -> None:
  """The flags that need no model, checked before anything loads (ValueError naming each)."""
  from amber_jax.io.atomic import check_output_directory, check_output_file
  from amber_jax.io.plan_checkpoint import META_NAME as PLAN_META_NAME
  from amber_jax.runs.checks import check_at_least, check_text_source

  check_at_least(_STEPS.value, 1, arg="--steps")
  check_at_least(OPTS.batch_size, 1, arg="--batch_size")
  # The factors are learned on the calibration windows (and they follow the evaluation ones).
  check_at_least(OPTS.calib_windows, 1, arg="--calib_windows")
  for flag in (_LR, _TEMPERATURE):
    if not (flag.value > 0 and math.isfinite(flag.value)):
      raise ValueError(f"--{flag.name} must be a finite number > 0, got {flag.value}")
  if _OTHER_TEXT.value:
    check_text_source(_OTHER_TEXT.value, arg="--other_text")
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  if _SAVE_PLAN.value:
    check_output_directory(_SAVE_PLAN.value, arg="--save_plan", marker=PLAN_META_NAME)


def main(argv):
  del argv
  from amber_jax.io.atomic import write_json_atomic
  from amber_jax.runs.learn_factors import LearnFactorsConfig, run_learn_factors

  _check_flags()
  cfg = LearnFactorsConfig(
    **OPTS.fields(LearnFactorsConfig),
    pattern=_PATTERN.value,
    policy=_POLICY.value,
    score=_SCORE.value,
    coverage=_COVERAGE.value,
    steps=_STEPS.value,
    learning_rate=_LR.value,
    temperature=_TEMPERATURE.value,
    other_text=_OTHER_TEXT.value,
    save_plan=_SAVE_PLAN.value or "",
  )
  result = run_learn_factors(cfg)
  if OPTS.output:
    write_json_atomic(OPTS.output, result)
  print(json.dumps(result["perplexity"]))


if __name__ == "__main__":
  run(main)
