"""Learned score factors of an Amber plan (``experiments/learn_factors.py``): the paper's plan,
its per-channel score factors learned with optax (KL to the dense model, weights frozen), and
perplexity before and after on the evaluation windows and a held-out text."""

from __future__ import annotations

import dataclasses

import numpy as np

from amber_jax.calibrate.learned_factors import learn_score_factors
from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.core.patterns import NMPattern
from amber_jax.data.texts import DEFAULT_TEXT, load_text
from amber_jax.eval.perplexity import make_windows, perplexity
from amber_jax.io.loading import load_tokenizer
from amber_jax.io.sources import DEFAULT_MODEL, resolve_model
from amber_jax.runs.common import check_cache_dir, prepare_eval


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnFactorsConfig:
  model: str = DEFAULT_MODEL
  pattern: str = "8:16"
  policy: str = "auto"
  score: str = "robust"  # the initial factors
  coverage: float = 0.55
  steps: int = 60
  learning_rate: float = 0.05
  temperature: float = 0.5
  batch_size: int = 2  # calibration windows per step
  calib_windows: int = 8
  seq_len: int = 512
  other_text: str = "enwiki"  # held out, evaluation only ("" to skip)
  save_plan: str = ""  # orbax directory for prefill.py --load_plan ("" to skip)
  cache_dir: str = ""


def run_learn_factors(cfg: LearnFactorsConfig, *, log=print) -> dict:
  """Builds the plan on the calibration windows of lee_background (after its 8 evaluation
  windows), learns its factors there, evaluates both plans; returns what results JSON holds."""
  check_cache_dir(cfg.cache_dir)
  amber = AmberConfig(
    pattern=NMPattern.parse(cfg.pattern),
    score=cfg.score,
    policy=cfg.policy,
    coverage=cfg.coverage,
  )
  texts = {}

  def validate(config):
    """Before the weights load: the plan fits the model, the held-out text makes 8 windows."""
    amber.validate_for(config)
    if cfg.other_text:
      tok = load_tokenizer(resolve_model(cfg.model, cfg.cache_dir, log=lambda *a: None))
      ids = np.asarray(tok.encode(load_text(cfg.other_text, cfg.cache_dir)).ids, np.int32)
      try:
        texts[cfg.other_text] = make_windows(ids, cfg.seq_len, 8)
      except ValueError as e:
        raise ValueError(f"--other_text {cfg.other_text!r}: {e}") from None

  setup = prepare_eval(
    model=cfg.model,
    text=DEFAULT_TEXT,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=8,
    calib_windows=cfg.calib_windows,
    dtype="float32",
    validate=validate,
    log=log,
  )
  texts = {DEFAULT_TEXT: setup.eval_windows, **texts}
  info = build_plan(setup.params, setup.config, amber, calib_windows=setup.calib_windows)
  log(f"plan: coverage {info.coverage.covered:.3f}, q/gate dense in {list(info.skip_layers)}")
  learned = learn_score_factors(
    setup.params,
    info.plan,
    setup.calib_windows,
    config=setup.config,
    steps=cfg.steps,
    learning_rate=cfg.learning_rate,
    temperature=cfg.temperature,
    batch_size=cfg.batch_size,
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
    log(
      f"{name}: dense {r['dense']:.2f}  {cfg.pattern} paper {r['paper']:.2f}  "
      f"learned {r['learned']:.2f}  (closes {100 * gain:.0f}% of the gap)"
    )
  log(
    f"KL on calibration windows {learned.initial_kl:.4f} -> {learned.final_kl:.4f} nats/token; "
    f"{cfg.steps} steps in {learned.seconds:.0f} s"
  )
  if cfg.save_plan:
    from amber_jax.plan.io import save_sparsity_plan

    # The identity prefill.py --load_plan checks (runs/prefill.py _plan_identity): the model as
    # named, its shapes, the pattern, no W8A8.
    identity = {
      "model": cfg.model,
      "model_config": dataclasses.asdict(setup.config),
      "pattern": str(amber.pattern),
      "quant": "none",
    }
    save_sparsity_plan(cfg.save_plan, learned.plan, metadata=identity)
    log(f"wrote the learned plan to {cfg.save_plan}")
  curve = learned.losses
  log("loss curve: " + " ".join(f"{v:.3f}" for v in curve[:: max(1, len(curve) // 12)]))
  return {
    "pattern": cfg.pattern,
    "policy": cfg.policy,
    "score": cfg.score,
    "coverage": info.coverage.covered,
    "skip_layers": list(info.skip_layers),
    "steps": cfg.steps,
    "learning_rate": cfg.learning_rate,
    "temperature": cfg.temperature,
    "perplexity": rows,
    "kl": [learned.initial_kl, learned.final_kl],
    "losses": curve,
    "seconds": learned.seconds,
  }
