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

from _common import default_cache_dir, run
from absl import flags

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Known model name, .gguf file or HF dir.")
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern.")
_POLICY = flags.DEFINE_enum("policy", "auto", ["all", "paper", "auto"], "Which sites are sparse.")
_SCORE = flags.DEFINE_enum("score", "robust", ["naive", "weight", "robust"], "Initial factors.")
_COVERAGE = flags.DEFINE_float("coverage", 0.55, "Coverage target of the auto policy.")
_STEPS = flags.DEFINE_integer("steps", 60, "Optimiser steps.")
_LR = flags.DEFINE_float("learning_rate", 0.05, "Adam learning rate on log-factors.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.5, "Relative temperature of the surrogate.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Calibration windows per step.")
_CALIB = flags.DEFINE_integer("calib_windows", 8, "Calibration windows (after the eval ones).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per window.")
_OTHER_TEXT = flags.DEFINE_string("other_text", "enwiki", "Held-out text ('' to skip).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results path.")
_SAVE_PLAN = flags.DEFINE_string(
  "save_plan", None, "Write the learned plan here (orbax) for prefill.py --load_plan."
)
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Model/text cache.")


def _check_flags() -> None:
  """The flags that need no model, checked before anything loads (ValueError naming each)."""
  import math

  from amber_jax.io.atomic import check_output_directory, check_output_file
  from amber_jax.io.plan_checkpoint import META_NAME as PLAN_META_NAME
  from amber_jax.runs.checks import check_at_least, check_text_source

  check_at_least(_STEPS.value, 1, arg="--steps")
  check_at_least(_BATCH.value, 1, arg="--batch_size")
  # The factors are learned on the calibration windows (and they follow the evaluation ones).
  check_at_least(_CALIB.value, 1, arg="--calib_windows")
  for flag in (_LR, _TEMPERATURE):
    if not (flag.value > 0 and math.isfinite(flag.value)):
      raise ValueError(f"--{flag.name} must be a finite number > 0, got {flag.value}")
  if _OTHER_TEXT.value:
    check_text_source(_OTHER_TEXT.value, arg="--other_text")
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  if _SAVE_PLAN.value:
    check_output_directory(_SAVE_PLAN.value, arg="--save_plan", marker=PLAN_META_NAME)


def main(argv):
  del argv
  import dataclasses

  import numpy as np

  from amber_jax.calibrate.learned_factors import learn_score_factors
  from amber_jax.calibrate.pruner import AmberConfig, build_plan
  from amber_jax.core.patterns import NMPattern
  from amber_jax.data.texts import load_text
  from amber_jax.eval.perplexity import make_windows, perplexity
  from amber_jax.io.atomic import write_json_atomic
  from amber_jax.io.loading import load_tokenizer
  from amber_jax.io.sources import resolve_model
  from amber_jax.runs.common import check_cache_dir, prepare_eval

  _check_flags()
  cache = _CACHE_DIR.value or default_cache_dir()
  check_cache_dir(cache)
  amber = AmberConfig(
    pattern=NMPattern.parse(_PATTERN.value),
    score=_SCORE.value,
    policy=_POLICY.value,
    coverage=_COVERAGE.value,
  )
  texts = {}

  def validate(config):
    """Before the weights load: the plan fits the model, the held-out text makes 8 windows."""
    amber.validate_for(config)
    if _OTHER_TEXT.value:
      tok = load_tokenizer(resolve_model(_MODEL.value, cache, log=lambda *a: None))
      ids = np.asarray(tok.encode(load_text(_OTHER_TEXT.value, cache)).ids, np.int32)
      try:
        texts[_OTHER_TEXT.value] = make_windows(ids, _SEQ_LEN.value, 8)
      except ValueError as e:
        raise ValueError(f"--other_text {_OTHER_TEXT.value!r}: {e}") from None

  setup = prepare_eval(
    model=_MODEL.value,
    text="lee_background",
    cache_dir=cache,
    seq_len=_SEQ_LEN.value,
    num_windows=8,
    calib_windows=_CALIB.value,
    dtype="float32",
    validate=validate,
  )
  texts = {"lee_background": setup.eval_windows, **texts}
  info = build_plan(setup.params, setup.config, amber, calib_windows=setup.calib_windows)
  print(f"plan: coverage {info.coverage.covered:.3f}, q/gate dense in {list(info.skip_layers)}")
  learned = learn_score_factors(
    setup.params,
    info.plan,
    setup.calib_windows,
    config=setup.config,
    steps=_STEPS.value,
    learning_rate=_LR.value,
    temperature=_TEMPERATURE.value,
    batch_size=_BATCH.value,
  )
  rows = {}
  for name, windows in texts.items():
    kw = dict(config=setup.config, show_progress=True)
    rows[name] = {
      "dense": perplexity(setup.params, windows, desc=f"{name} dense", **kw).perplexity,
      "paper": perplexity(setup.params, windows, plan=info.plan, desc="paper", **kw).perplexity,
      "learned": perplexity(
        setup.params, windows, plan=learned.plan, desc="learned", **kw
      ).perplexity,
    }
    r = rows[name]
    gain = (r["paper"] - r["learned"]) / (r["paper"] - r["dense"])
    print(
      f"{name}: dense {r['dense']:.2f}  {_PATTERN.value} paper {r['paper']:.2f}  "
      f"learned {r['learned']:.2f}  (closes {100 * gain:.0f}% of the gap)"
    )
  print(
    f"KL on calibration windows {learned.initial_kl:.4f} -> {learned.final_kl:.4f} nats/token; "
    f"{_STEPS.value} steps in {learned.seconds:.0f} s"
  )
  if _SAVE_PLAN.value:
    from amber_jax.plan.io import save_sparsity_plan

    # The identity prefill.py --load_plan checks (runs/prefill.py _plan_identity): the model as
    # named, its shapes, the pattern, no W8A8.
    identity = {
      "model": _MODEL.value,
      "model_config": dataclasses.asdict(setup.config),
      "pattern": str(amber.pattern),
      "quant": "none",
    }
    save_sparsity_plan(_SAVE_PLAN.value, learned.plan, metadata=identity)
    print(f"wrote the learned plan to {_SAVE_PLAN.value}")
  curve = learned.losses
  print("loss curve:", " ".join(f"{v:.3f}" for v in curve[:: max(1, len(curve) // 12)]))
  if _OUTPUT.value:
    write_json_atomic(
      _OUTPUT.value,
      {
        "pattern": _PATTERN.value,
        "policy": _POLICY.value,
        "score": _SCORE.value,
        "coverage": info.coverage.covered,
        "skip_layers": list(info.skip_layers),
        "steps": _STEPS.value,
        "learning_rate": _LR.value,
        "temperature": _TEMPERATURE.value,
        "perplexity": rows,
        "kl": [learned.initial_kl, learned.final_kl],
        "losses": curve,
        "seconds": learned.seconds,
      },
    )
  print(json.dumps(rows))


if __name__ == "__main__":
  run(main)
