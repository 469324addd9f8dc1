"""Outstanding-sparse table: W8A8 (SmoothQuant, inverted smoothing) with and without N:M.

With ``rotations`` (``amber_jax.rotate`` names) every row is measured again on each rotated
model: per pattern, since a calibrated rotation is laid out for the pattern's group size (its
W8A8-only rows then repeat for each pattern's rotated model). Rotated rows carry "rotation" and
their method names end in "[rotation M=m]"."""

from __future__ import annotations

import dataclasses
import time

from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.calibrate.stats import collect_input_absmax
from amber_jax.core.patterns import NMPattern
from amber_jax.eval.perplexity import perplexity
from amber_jax.plan.quant_state import build_quant_state, smoothed_score_factors
from amber_jax.plan.schema import make_plan
from amber_jax.rotate import Rotation, rotate_model
from amber_jax.rotate.recipe import check_rotation_for
from amber_jax.runs.common import (
  DTYPES,
  EvalRunOptions,
  check_model_options,
  environment,
  prepare_eval,
  recorded_config,
)
from amber_jax.runs.markdown import markdown_table


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantTableConfig(EvalRunOptions):
  """The W8A8 table's settings: smoothings and orders per pattern."""

  patterns: tuple[str, ...] = ("8:16", "2:4")
  score: str = "robust"
  policy: str = "auto"
  coverage: float = 0.55
  smoothquant_alpha: float = 0.5
  outstanding_alpha: float = 0.10
  act_scale: str = "token"
  rotations: tuple[str, ...] = ("none",)  # amber_jax.rotate names

  def __post_init__(self):
    if not self.patterns:
      raise ValueError("patterns must name at least one N:M pattern")
    if len(set(self.patterns)) != len(self.patterns):
      raise ValueError(f"patterns has duplicates: {list(self.patterns)}")
    for p in self.patterns:
      NMPattern.parse(p)
    AmberConfig(pattern=None, score=self.score, policy=self.policy, coverage=self.coverage)
    for name in ("seq_len", "num_windows", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    check_model_options(self.dtype, self.cache_dir)
    if self.calib_windows < 1:
      raise ValueError("calib_windows must be >= 1")
    if not self.rotations:
      raise ValueError("rotations must name at least one rotation ('none': the model as loaded)")
    names = [Rotation.parse(r).name for r in self.rotations]
    if len(set(names)) != len(names):
      raise ValueError(f"rotations name one rotation twice: {list(self.rotations)}")


def _amber(cfg: QuantTableConfig, pattern: str) -> AmberConfig:
  return AmberConfig(
    pattern=NMPattern.parse(pattern), score=cfg.score, policy=cfg.policy, coverage=cfg.coverage
  )


def run_quant_table(cfg: QuantTableConfig, *, log=print, show_progress=True) -> dict:
  rotations = [Rotation.parse(r) for r in cfg.rotations]

  def validate(c):  # M divides every sparsified width, the target is reachable, rotations fit
    for p in cfg.patterns:
      _amber(cfg, p).validate_for(c)
      for r in rotations:
        check_rotation_for(c, r, NMPattern.parse(p).m)

  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    validate=validate,  # before loading
    show_progress=show_progress,
    log=log,
  )
  dtype = DTYPES[cfg.dtype]
  rows: list[dict] = []
  for rotation in rotations:
    if rotation.is_identity:
      _quant_rows(cfg, setup, setup.params, setup.config, cfg.patterns, rows, log, show_progress)
      continue
    for pattern in cfg.patterns:
      rm = rotate_model(
        setup.params,
        setup.config,
        rotation,
        m=NMPattern.parse(pattern).m,
        calib_windows=setup.calib_windows[:, :-1],
        batch_size=cfg.batch_size,
        dtype=dtype,
        show_progress=show_progress,
      )
      tag = {
        "rotation": rotation.name,
        "suffix": f" [{rotation.name} M={NMPattern.parse(pattern).m}]",
      }
      _quant_rows(cfg, setup, rm.params, rm.config, (pattern,), rows, log, show_progress, **tag)
  return {"rows": rows, "config": recorded_config(cfg), **environment()}


def _quant_rows(
  cfg, setup, params, config, patterns, rows, log, show_progress, rotation=None, suffix=""
):
  """Appends the table's rows for one model (``params``, ``config``) and ``patterns``: dense
  (unrotated only), W8A8 with both smoothings, and per pattern Amber and Outstanding-sparse."""
  dtype = DTYPES[cfg.dtype]
  common = dict(config=config, batch_size=cfg.batch_size, dtype=dtype, show_progress=show_progress)
  tag = {} if rotation is None else {"rotation": rotation}

  def evaluate(name, plan, **extra):
    start = time.perf_counter()
    r = perplexity(params, setup.eval_windows, plan=plan, desc=name + suffix, **common)
    rows.append(
      {
        "method": name + suffix,
        "perplexity": r.perplexity,
        "seconds": time.perf_counter() - start,
        **extra,
        **tag,
      }
    )
    log(f"{name + suffix:<60} ppl {r.perplexity:8.3f}")

  if rotation is None:
    evaluate("dense", None)
  extra = {} if rotation is None else {"pattern": patterns[0]}
  absmax = collect_input_absmax(
    params,
    setup.calib_windows,
    config=config,
    batch_size=cfg.batch_size,
    dtype=dtype,
    show_progress=show_progress,
  )
  quant = {}
  for smooth, alpha in (
    ("smoothquant", cfg.smoothquant_alpha),
    ("outstanding", cfg.outstanding_alpha),
  ):
    state, smoothed = build_quant_state(
      params, config, absmax, smooth=smooth, alpha=alpha, act_mode=cfg.act_scale
    )
    quant[smooth] = (state, smoothed)
    evaluate(
      f"W8A8 {smooth} a={alpha}",
      make_plan(config, None, impl="xla").replace(quant=state),
      smooth=smooth,
      alpha=alpha,
      **extra,
    )
  for pattern in patterns:
    amber = _amber(cfg, pattern)
    info = build_plan(
      params,
      config,
      amber,
      calib_windows=setup.calib_windows,
      batch_size=cfg.batch_size,
      dtype=dtype,
      show_progress=show_progress,
    )
    extra = {
      "pattern": pattern,
      "coverage": info.coverage.covered,
      "skip_layers": list(info.skip_layers),
    }
    evaluate(f"Amber {pattern} {cfg.policy}/{cfg.score}", info.plan, **extra)
    state, smoothed = quant["outstanding"]
    factors = smoothed_score_factors(smoothed, cfg.score)
    for order in ("sparsify_first", "quantize_first"):
      plan = info.plan.replace(quant=state.replace(order=order), factors=factors)
      evaluate(
        f"Outstanding-sparse {pattern} ({order.replace('_', ' ')})", plan, order=order, **extra
      )


def quant_table_markdown(result: dict, command: str) -> str:
  cfg = result["config"]
  dense = next(r["perplexity"] for r in result["rows"] if r["method"] == "dense")
  amber = {
    (r["pattern"], r.get("rotation")): r["perplexity"]
    for r in result["rows"]
    if r["method"].startswith("Amber")
  }
  table = []
  for r in result["rows"]:
    vs_amber = ""
    if r["method"].startswith("Outstanding-sparse"):
      base = amber[(r["pattern"], r.get("rotation"))]
      vs_amber = f"{100 * (r['perplexity'] / base - 1):+.1f}%"
    cov = f"{100 * r['coverage']:.1f}%" if "coverage" in r else "-"
    table.append(
      [
        r["method"],
        f"{r['perplexity']:.2f}",
        f"{100 * (r['perplexity'] / dense - 1):+.1f}%",
        vs_amber,
        cov,
      ]
    )
  env = result["device"]
  return "\n".join(
    [
      f"## Outstanding-sparse: W8A8 with and without N:M ({cfg['model']})",
      "",
      f"Perplexity on the first {cfg['num_windows']} windows of {cfg['seq_len']} predicted tokens "
      f"of `{cfg['text']}`. W8A8: int8 weights (per output channel), int8 activations "
      f"({cfg['act_scale']} scales), int8 x int8 -> int32 dots, every linear (LM head in float); "
      f"smoothing folded into the RMSNorms for q/k/v and gate/up, applied to the o/down inputs. "
      f"Activation statistics and the auto policy use the {cfg['calib_windows']} windows after the "
      f"evaluation ones. Sparse rows: {cfg['policy']} policy, {cfg['score']} score (factors from "
      "the smoothed weights), coverage >= "
      + f"{cfg['coverage']}."
      + (
        " Rows marked [rotation M=m] run on the model rotated by amber_jax.rotate, calibrated for"
        " groups of m (the dense model is unchanged; 'vs Amber alone' compares with Amber on"
        " the same rotated model)."
        if any(r.get("rotation") for r in result["rows"])
        else ""
      ),
      "",
      f"Command: `{command}` (backend {env['backend']}, jax {result['versions']['jax']}).",
      "",
      markdown_table(["method", "perplexity", "vs dense", "vs Amber alone", "coverage"], table),
    ]
  )
