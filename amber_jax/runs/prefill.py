"""The main job: perplexity and prefill throughput, dense vs an N:M plan, side by side.

The plan is a named method of ``amber_jax.calibrate.methods`` (``method="amber"``,
``"search_mixed"``, ``"best"``, ...) or, without one, the old fields (score, policy, o_order,
granularity). By default it is Amber Pruner's (robust score, the paper's q/gate/down rule, q/gate
kept dense in the most sensitive layers chosen automatically so that coverage stays >= 0.55), and
the naive top-k baseline (|x| at every site) is evaluated next to it on the same windows.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from amber_jax.baselines.weight_pruning import save_pruned_weights
from amber_jax.calibrate.methods import (
  Method,
  build_method,
  build_method_plan,
  check_method_conflicts,
  check_method_target,
  identify_method,
  resolve_method,
)
from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.calibrate.stats import (
  collect_input_absmax,
  measure_quant_errors,
  most_sensitive_sites,
)
from amber_jax.core.backends import check_impl
from amber_jax.core.patterns import parse_pattern_or_dense
from amber_jax.data.texts import DEFAULT_TEXT
from amber_jax.eval.agreement import generation_agreement
from amber_jax.eval.perplexity import perplexity
from amber_jax.io.atomic import check_output_directory
from amber_jax.io.plan_checkpoint import META_NAME as PLAN_META_NAME
from amber_jax.io.sources import DEFAULT_MODEL
from amber_jax.plan.coverage import plan_coverage
from amber_jax.plan.io import load_sparsity_plan, save_sparsity_plan
from amber_jax.plan.quant_state import (
  DEFAULT_ALPHA,
  build_quant_state,
  check_float_sites,
  check_quant_options,
  smoothed_score_factors,
)
from amber_jax.plan.schema import make_plan
from amber_jax.runs.common import (
  DTYPES,
  check_model_options,
  environment,
  prepare_eval,
  recorded_config,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillRunConfig:
  """Everything the main job needs; validated on construction (before any loading)."""

  model: str = DEFAULT_MODEL
  pattern: str = "8:16"
  # A name of amber_jax.calibrate.methods ("" : the plan is the fields below). It sets score,
  # policy, o_order and granularity (a field given another value as well is a ValueError) and may
  # add a correction and learned factors; "dense" makes the pattern dense.
  method: str = ""
  # An unstructured target of a baseline method that takes one (wanda, sparsegpt: instead of
  # pattern; teal, teal_uniform, cats: required), the share of entries set to zero.
  sparsity: float | None = None
  # The defaults are the method the project is named after (Amber Pruner); the naive
  # baseline row below shows what it improves on.
  score: str = "robust"
  policy: str = "auto"
  skip_layers: tuple[int, ...] = ()
  coverage: float = 0.55
  robust_clip: bool = True
  impl: str | None = None  # one of amber_jax.core.backends.IMPLS; None: the default (xla)
  granularity: str = "layer"  # auto policy: "layer" (q+gate together) or "site"
  o_order: str = (
    "heads"  # o-projection N:M groups: "heads" or "mixed" (amber_jax.plan.channel_order)
  )
  quant: str = "none"  # "none" | "w8a8"
  smooth: str = "smoothquant"  # w8a8: "none" | "smoothquant" | "outstanding"
  alpha: float | None = None  # None: 0.5 (smoothquant), 0.10 (outstanding)
  act_scale: str = "token"  # w8a8 activations: "token" (dynamic) | "tensor" (static)
  order: str = "sparsify_first"  # or "quantize_first"
  float_sites: tuple[tuple[int, str], ...] = ()  # w8a8 sites kept in float
  float_sites_auto: int = 0  # w8a8: also keep the k sites with the largest quantization error
  save_plan: str = ""  # directory: save the calibrated plan (orbax, atomic)
  load_plan: str = ""  # directory: restore a saved plan instead of calibrating
  seq_len: int = 512
  num_windows: int = 8
  calib_windows: int = 8  # taken after the evaluation windows, never overlapping them
  batch_size: int = 4
  dtype: str = "float32"
  text: str = DEFAULT_TEXT  # a known text name or a path to a UTF-8 file
  gen_prompts: int = 4  # prompts for the generation-agreement check (0 disables it)
  # Also evaluate the naive top-k baseline (score |x| at every site of every layer) when the
  # plan is N:M and not itself that baseline.
  naive_baseline: bool = True
  gen_prompt_len: int = 64
  gen_tokens: int = 32
  cache_dir: str = ""

  def __post_init__(self):
    if self.method:
      self._apply_method()
    elif self.sparsity is not None:
      raise ValueError(
        "sparsity applies to the unstructured baselines (--method=wanda, sparsegpt, teal, "
        "teal_uniform, cats), not to an N:M plan"
      )
    self.amber()  # validates pattern, score, policy, coverage, skip_layers
    for name in ("seq_len", "num_windows", "batch_size", "gen_prompt_len", "gen_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("calib_windows", "gen_prompts"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.policy in ("auto", "search") and self.calib_windows < 1:
      raise ValueError(f"policy={self.policy} needs calib_windows >= 1")
    check_model_options(self.dtype, self.cache_dir)
    if self.quant not in ("none", "w8a8"):
      raise ValueError(f"quant must be one of none, w8a8, got {self.quant!r}")
    alpha = DEFAULT_ALPHA.get(self.smooth, 0.5) if self.alpha is None else self.alpha
    check_quant_options(self.smooth, alpha, self.act_scale, self.order)
    if self.float_sites_auto < 0:
      raise ValueError(f"float_sites_auto must be >= 0, got {self.float_sites_auto}")
    if self.quant == "w8a8" and self.calib_windows < 1:
      raise ValueError("quant=w8a8 needs calib_windows >= 1 (activation statistics)")
    check_float_sites(self.float_sites)
    # Options the run would silently ignore are errors.
    if self.policy not in ("auto", "search") and self._given(("coverage",)):
      raise ValueError(f"coverage only applies with policy auto or search (policy={self.policy!r})")
    if self.policy != "auto" and self._given(("granularity",)):
      raise ValueError(f"granularity only applies with policy=auto (policy={self.policy!r})")
    if self.quant != "w8a8":
      given = self._given(self._W8A8_OPTIONS)
      if given:
        raise ValueError(f"{', '.join(given)} only apply with quant=w8a8 (quant={self.quant!r})")
    if self.save_plan:
      check_output_directory(self.save_plan, arg="save_plan", marker=PLAN_META_NAME)
    if self.load_plan:
      self._check_nothing_a_loaded_plan_fixes()

  _METHOD_FIELDS = ("score", "policy", "o_order", "granularity")

  def _apply_method(self) -> None:
    """Checks the old fields against the method and sets them to its values."""
    m = resolve_method(self.method)
    check_method_conflicts(m, {k: getattr(self, k) for k in self._given(self._METHOD_FIELDS)})
    if not m.is_baseline and self.sparsity is not None:
      raise ValueError(f"method {m.name!r} takes an N:M pattern, not sparsity={self.sparsity}")
    if m.is_baseline:
      self.baseline_target()  # checks the pattern / sparsity against what the method takes
      for name in ("quant", "load_plan"):
        if self._given((name,)):
          raise ValueError(f"method={self.method!r} (a {m.kind} baseline) does not take {name}")
      return
    if m.is_dense:
      if self.pattern not in ("dense", self._defaults()["pattern"]):
        raise ValueError(
          f"method={self.method!r} makes no plan; it conflicts with pattern={self.pattern!r}"
        )
      object.__setattr__(self, "pattern", "dense")
      return
    for name in self._METHOD_FIELDS:
      object.__setattr__(self, name, getattr(m, name))
    if self.quant != "none" and (m.correction != "none" or m.learned_steps):
      raise ValueError(
        f"method={self.method!r} (a correction or learned factors) cannot be combined with "
        f"quant={self.quant!r}"
      )

  def baseline_target(self) -> tuple:
    """(pattern or None, sparsity or None) of a baseline method: its sparsity when given, else
    the pattern (the default one too, for the weight methods); ValueError naming what the
    method takes otherwise."""
    m = self.resolved_method()
    pattern = self.pattern if self._given(("pattern",)) else None
    if pattern is None and self.sparsity is None and "pattern" in m.base.takes:
      pattern = self.pattern
    _, pattern, sparsity = check_method_target(m, pattern, self.sparsity)
    return pattern, sparsity

  def resolved_method(self) -> Method | None:
    """The registry method of ``method`` (None when the plan comes from the old fields)."""
    return resolve_method(self.method) if self.method else None

  def method_name(self) -> str | None:
    """The registry name of this run's plan: the method's, or the one the old fields match
    (None when they match none, e.g. the weight score)."""
    m = self.resolved_method()
    return m.name if m is not None else identify_method(self.amber())

  _W8A8_OPTIONS = ("smooth", "alpha", "act_scale", "order", "float_sites", "float_sites_auto")

  # Options a restored plan fixes (it was calibrated with them): giving one with load_plan
  # would be silently ignored, so it is an error. (impl stays free: it changes speed only.)
  _FIXED_BY_LOADED_PLAN = (
    "method", "score", "policy", "skip_layers", "coverage", "robust_clip", "granularity", "o_order",
    "smooth", "alpha", "act_scale", "order", "float_sites", "float_sites_auto", "save_plan",
  )  # fmt: skip

  def _defaults(self) -> dict:
    return {f.name: f.default for f in dataclasses.fields(self)}

  def _given(self, names) -> list[str]:
    """Those of ``names`` whose value differs from the field's default."""
    defaults = self._defaults()
    return [n for n in names if getattr(self, n) != defaults[n]]

  def _check_nothing_a_loaded_plan_fixes(self) -> None:
    given = self._given(self._FIXED_BY_LOADED_PLAN)
    if given:
      raise ValueError(
        f"load_plan restores a calibrated plan, which fixes {', '.join(given)}; drop "
        f"{'it' if len(given) == 1 else 'them'} (only pattern, quant and impl may be given)"
      )

  def amber(self) -> AmberConfig:
    """The plan's AmberConfig (the method's, with this run's coverage and free options)."""
    m = self.resolved_method()
    if m is not None and m.is_baseline:  # not an N:M plan: built by build_method
      return AmberConfig(pattern=None, impl=self.impl)
    if m is not None:
      return m.amber_config(
        parse_pattern_or_dense(self.pattern),
        coverage=self.coverage,
        impl=self.impl,
        robust_clip=self.robust_clip,
        skip_layers=tuple(self.skip_layers),
      )
    return AmberConfig(
      pattern=parse_pattern_or_dense(self.pattern),
      score=self.score,
      policy=self.policy,
      skip_layers=tuple(self.skip_layers),
      coverage=self.coverage,
      robust_clip=self.robust_clip,
      impl=self.impl,
      granularity=self.granularity,
      o_order=self.o_order,
    )


def parse_float_sites(items) -> tuple[tuple[int, str], ...]:
  """["down:29", "o:0"] (the --float_sites flag) -> ((29, "down"), (0, "o")); ValueError
  naming the flag for an entry that is not proj:layer (the names are checked against the
  model's declared sites once its config has loaded, ``check_float_sites``)."""
  sites = []
  for item in items:
    proj, _, layer = str(item).partition(":")
    if not layer.strip().isdigit():
      raise ValueError(
        f"--float_sites entries look like proj:layer (e.g. down:29,o:0), got {item!r}"
      )
    sites.append((int(layer), proj.strip()))
  return tuple(sites)


def _result_row(r, **extra) -> dict:
  return {
    "perplexity": r.perplexity,
    "nll": r.nll,
    "tokens": r.tokens,
    "windows": r.windows,
    "seconds": r.seconds,
    "tokens_per_second": r.tokens_per_second,
    **extra,
  }


def _plan_identity(cfg: PrefillRunConfig, model_config) -> dict:
  """What a saved plan must match to be used: the model's shapes, the pattern, the W8A8 mode."""
  pattern = parse_pattern_or_dense(cfg.pattern)
  return {
    # The model as named (another checkpoint of the same shapes, e.g. a base model next to its
    # instruct tune, must not take this one's plan without a word) and its shapes.
    "model": cfg.model,
    "model_config": dataclasses.asdict(model_config),
    "pattern": "dense" if pattern is None else str(pattern),
    "quant": cfg.quant,
  }


def _wants_naive_baseline(cfg: PrefillRunConfig, amber: AmberConfig) -> bool:
  """Whether the naive baseline row is evaluated: asked for, an N:M pattern, and a plan that
  is not itself the baseline (a loaded plan's choices are not known here: always compared)."""
  if not cfg.naive_baseline or amber.pattern is None:
    return False
  if cfg.load_plan:
    return True
  is_baseline = (
    amber.score == "naive"
    and amber.policy == "all"
    and not amber.skip_layers
    and amber.o_order == "heads"
    and cfg.quant == "none"
  )
  return not is_baseline


def _naive_baseline_row(setup, amber: AmberConfig, common: dict) -> dict:
  """The naive top-k baseline: score |x| on the input of every linear of every layer."""
  plan = make_plan(setup.config, amber.pattern, impl=amber.impl)
  row = perplexity(
    setup.params, setup.eval_windows, plan=plan, desc=f"naive {amber.pattern}", **common
  )
  cov = plan_coverage(setup.config, plan)
  return _result_row(
    row,
    method="naive",
    pattern=str(amber.pattern),
    policy="all",
    score="naive",
    impl=plan.impl,
    coverage=cov.covered,
    removed=cov.removed,
  )


def _generation_row(setup, plan, prompts, cfg: PrefillRunConfig) -> dict:
  """Greedy continuations under the plan's sparse prefill (dense decode) vs the dense model's."""
  gen = generation_agreement(
    setup.params,
    prompts,
    config=setup.config,
    plan=plan,
    new_tokens=cfg.gen_tokens,
    dtype=DTYPES[cfg.dtype],
  )
  return {
    "agreement": gen.agreement,
    "prefix_agreement": gen.prefix_agreement,
    "prompts": gen.prompts,
    "new_tokens": gen.new_tokens,
  }


def _run_loaded_plan(cfg, setup, plan, result, common, prompts) -> dict:
  """Evaluates a restored plan (no calibration) next to the dense row already in ``result``;
  ``cfg.impl``, when given, replaces the plan's matmul implementation (speed only)."""
  if cfg.impl is not None:
    plan = plan.replace(impl=check_impl(cfg.impl, plan.pattern))
  row = perplexity(setup.params, setup.eval_windows, plan=plan, desc="loaded plan", **common)
  key = "sparse" if plan.pattern is not None else "quant"
  quant = "none" if plan.quant is None else "w8a8"
  order = None if plan.quant is None else plan.quant.order
  result[key] = _result_row(
    row,
    pattern=str(plan.pattern),
    policy="loaded",
    score="loaded",
    impl=plan.impl,
    quant=quant,
    order=order,
    smooth="loaded",
  )
  if plan.pattern is not None:
    cov = plan_coverage(setup.config, plan)
    result.update(coverage=cov.covered, removed=cov.removed)
    result["time_ratio"] = row.seconds / result["dense"]["seconds"]
    if prompts is not None:
      result["generation"] = _generation_row(setup, plan, prompts, cfg)
  result["config"] = recorded_config(cfg)
  result["model_config"] = dataclasses.asdict(setup.config)
  result.update(environment())
  return result


def _run_baseline(cfg, setup, result, common, prompts, show_progress) -> dict:
  """A baseline of another paper (``amber_jax.baselines``: weight pruning or activation
  thresholds), built by ``build_method``, evaluated on the same windows as dense."""
  pattern, sparsity = cfg.baseline_target()
  built = build_method(
    setup.params,
    setup.config,
    cfg.resolved_method(),
    pattern=pattern,
    sparsity=sparsity,
    calib_windows=setup.calib_windows,
    batch_size=cfg.batch_size,
    dtype=common["dtype"],
    show_progress=show_progress,
  )
  if cfg.save_plan:
    if built.pruned is not None:
      save_pruned_weights(cfg.save_plan, built.pruned, metadata=_plan_identity(cfg, setup.config))
    else:
      save_sparsity_plan(cfg.save_plan, built.plan, metadata=_plan_identity(cfg, setup.config))
  target = str(pattern) if pattern is not None else f"{100 * sparsity:.0f}%"
  row = perplexity(
    built.params,
    setup.eval_windows,
    plan=built.plan,
    desc=f"{built.method.name} {target}",
    **common,
  )
  result["sparse"] = _result_row(
    row,
    method=built.method.name,
    pattern=None if pattern is None else str(pattern),
    sparsity=sparsity,
    policy=built.method.kind,
    score=built.method.name,
    impl="xla",
    quant="none",
  )
  result.update(coverage=built.coverage, removed=built.removed, plan_seconds=built.seconds)
  result["baseline"] = built.record
  result["time_ratio"] = row.seconds / result["dense"]["seconds"]
  if prompts is not None:
    gen = generation_agreement(
      setup.params,
      prompts,
      config=setup.config,
      plan=built.plan,
      new_tokens=cfg.gen_tokens,
      dtype=common["dtype"],
      sparse_params=built.params,
    )
    result["generation"] = {
      "agreement": gen.agreement,
      "prefix_agreement": gen.prefix_agreement,
      "prompts": gen.prompts,
      "new_tokens": gen.new_tokens,
    }
  result["config"] = recorded_config(cfg)
  result["model_config"] = dataclasses.asdict(setup.config)
  result["params_from_cache"] = setup.params_from_cache
  result.update(environment())
  return result


def run_prefill(cfg: PrefillRunConfig, *, log=print, show_progress: bool = True) -> dict:
  """Evaluates the dense baseline and the configured plan on the same windows.

  Bad input (pattern, M not dividing a width, skip layers, missing model, short
  text) fails before the weights are loaded. Returns a JSON-ready dict with
  "dense", "sparse" (absent when pattern is dense), "coverage", "removed",
  "skip_layers", "generation", "config", "versions", "device".
  """
  amber = cfg.amber()
  method = cfg.resolved_method()
  baseline = method is not None and method.is_baseline
  wants_generation = cfg.gen_prompts and (amber.pattern is not None or baseline)
  loaded = {}

  def validate(model_config):
    amber.validate_for(model_config)
    check_float_sites(cfg.float_sites, model_config)
    if wants_generation:
      try:
        model_config.check_seq_len(cfg.gen_prompt_len + cfg.gen_tokens)
      except ValueError as e:
        raise ValueError(
          f"generation prompts of {cfg.gen_prompt_len} + {cfg.gen_tokens}: {e}"
        ) from None
    if cfg.load_plan:  # checked against this model and pattern before any weights load
      loaded["plan"], loaded["meta"] = load_sparsity_plan(
        cfg.load_plan, expect=_plan_identity(cfg, model_config), config=model_config
      )

  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    validate=validate,
    show_progress=show_progress,
    log=log,
  )
  prompts = None
  if wants_generation:
    need = cfg.gen_prompts * cfg.gen_prompt_len
    if len(setup.rest_tokens) < need:
      raise ValueError(
        f"text too short for {cfg.gen_prompts} generation prompts of {cfg.gen_prompt_len} "
        "tokens after the evaluation and calibration windows (use --gen_prompts=0)"
      )
    prompts = setup.rest_tokens[:need].reshape(cfg.gen_prompts, cfg.gen_prompt_len)
  dtype = DTYPES[cfg.dtype]
  params, config = setup.params, setup.config
  common = dict(config=config, batch_size=cfg.batch_size, dtype=dtype, show_progress=show_progress)

  dense = perplexity(params, setup.eval_windows, plan=None, desc="dense", **common)
  result = {
    "method": "loaded" if cfg.load_plan else cfg.method_name(),
    "dense": _result_row(dense),
    "coverage": 0.0,
    "removed": 0.0,
    "skip_layers": [],
  }
  if _wants_naive_baseline(cfg, amber):
    result["naive"] = _naive_baseline_row(setup, amber, common)
  quant_state = smoothed = None
  if baseline:
    return _run_baseline(cfg, setup, result, common, prompts, show_progress)
  if loaded:
    return _run_loaded_plan(cfg, setup, loaded["plan"], result, common, prompts)
  if cfg.quant == "w8a8":
    start = time.perf_counter()
    absmax = collect_input_absmax(
      params,
      setup.calib_windows,
      config=config,
      batch_size=cfg.batch_size,
      dtype=dtype,
      show_progress=show_progress,
    )
    float_sites = tuple(cfg.float_sites)
    if cfg.float_sites_auto:
      probe, _ = build_quant_state(
        params,
        config,
        absmax,
        smooth=cfg.smooth,
        alpha=cfg.alpha,
        act_mode=cfg.act_scale,
        order=cfg.order,
      )
      errors = measure_quant_errors(
        params,
        setup.calib_windows,
        probe,
        config=config,
        batch_size=cfg.batch_size,
        dtype=dtype,
        show_progress=show_progress,
      )
      float_sites = tuple(
        sorted(
          set(float_sites)
          | set(most_sensitive_sites(errors, cfg.float_sites_auto, config.site_names))
        )
      )
    quant_state, smoothed = build_quant_state(
      params,
      config,
      absmax,
      smooth=cfg.smooth,
      alpha=cfg.alpha,
      act_mode=cfg.act_scale,
      order=cfg.order,
      float_sites=float_sites,
    )
    calib_seconds = time.perf_counter() - start
    quant_plan = make_plan(config, None, impl="xla").replace(quant=quant_state)
    if amber.pattern is None and cfg.save_plan:
      save_sparsity_plan(cfg.save_plan, quant_plan, metadata=_plan_identity(cfg, config))
    quant = perplexity(params, setup.eval_windows, plan=quant_plan, desc="w8a8", **common)
    result["float_sites"] = [f"{p}:{l}" for l, p in float_sites]
    result["quant"] = _result_row(
      quant, smooth=cfg.smooth, act_scale=cfg.act_scale, calib_seconds=calib_seconds
    )
  if amber.pattern is not None:
    built = build_method_plan(
      params,
      config,
      cfg.resolved_method(),
      amber,
      calib_windows=setup.calib_windows,
      batch_size=cfg.batch_size,
      dtype=dtype,
      show_progress=show_progress,
    )
    info, plan = built.info, built.plan
    if built.learned is not None:
      result["learned"] = built.learned_record()
    if quant_state is not None:
      # Outstanding-sparse: the scores see the smoothed activations, so their factors come
      # from the smoothed weights (the weight-aware score itself is invariant to smoothing).
      factors = smoothed_score_factors(smoothed, amber.score, robust_clip=amber.robust_clip)
      plan = plan.replace(quant=quant_state, factors=factors)
    if cfg.save_plan:
      save_sparsity_plan(cfg.save_plan, plan, metadata=_plan_identity(cfg, config))
    sparse = perplexity(
      params, setup.eval_windows, plan=plan, desc=f"sparse {amber.pattern}", **common
    )
    result["sparse"] = _result_row(
      sparse,
      method=result["method"],
      pattern=str(amber.pattern),
      policy=amber.policy,
      score=amber.score,
      impl=info.plan.impl,
      quant=cfg.quant,
      order=cfg.order if cfg.quant != "none" else None,
      o_order=amber.o_order,
    )
    result["sparse_sites"] = {p: int(np.asarray(plan.enabled[p]).sum()) for p in plan.enabled}
    result["coverage"] = info.coverage.covered
    result["removed"] = info.coverage.removed
    result["skip_layers"] = list(info.skip_layers)
    result["dense_sites"] = [f"{p}{l}" for l, p in info.dense_sites]
    result["plan_seconds"] = info.seconds
    result["time_ratio"] = sparse.seconds / dense.seconds
    if info.sensitivity is not None:
      result["sensitivity"] = info.sensitivity.errors.tolist()
    if prompts is not None:
      result["generation"] = _generation_row(setup, plan, prompts, cfg)
  result["config"] = recorded_config(cfg)
  result["model_config"] = dataclasses.asdict(config)
  result["params_from_cache"] = setup.params_from_cache
  result.update(environment())
  return result


# What a (policy, score) pair is called in the table, where it has a name in the paper.
_METHOD_NAMES = {
  ("all", "naive"): "naive top-k",
  ("auto", "robust"): "Amber Pruner",
  ("paper", "robust"): "Amber Pruner",
}


def _run_name(row: dict) -> str:
  """'8:16 auto/robust (Amber Pruner)': pattern, policy/score, and the method's name if any."""
  if row.get("policy") in ("weight", "threshold"):  # a baseline of another paper
    target = row["pattern"] or f"{100 * row['sparsity']:.0f}%"
    return f"{target} {row['method']} ({row['policy']} sparsity)"
  name = f"{row['pattern']} {row['policy']}/{row['score']}"
  method = _METHOD_NAMES.get((row["policy"], row["score"]))
  if method is None and row.get("method") not in (None, "naive", "amber", "naive_rules"):
    method = row["method"]  # a registry name beyond the paper's, e.g. search_mixed+learned
  return f"{name} ({method})" if method else name


def format_table(result: dict) -> str:
  """The side-by-side table printed by experiments/prefill.py."""
  rows = [("dense", result["dense"], "0.0%")]
  if "naive" in result:
    rows.append(
      (_run_name(result["naive"]), result["naive"], f"{100 * result['naive']['coverage']:.1f}%")
    )
  if "quant" in result:
    rows.append((f"w8a8 {result['quant']['smooth']}", result["quant"], "0.0%"))
  if "sparse" in result:
    s = result["sparse"]
    name = _run_name(s)
    if s.get("o_order", "heads") != "heads":
      name += f", o {s['o_order']}"
    if s.get("quant", "none") != "none":
      name += f" + w8a8 ({s['order'].replace('_', ' ')})"
    rows.append((name, s, f"{100 * result['coverage']:.1f}%"))
  header = (
    f"{'run':<40} {'perplexity':>10} {'tokens':>7} {'coverage':>9} {'tok/s':>8} {'time/dense':>10}"
  )
  lines = [header, "-" * len(header)]
  dense_s = result["dense"]["seconds"]
  for name, r, cov in rows:
    lines.append(
      f"{name:<40} {r['perplexity']:>10.3f} {r['tokens']:>7d} {cov:>9} "
      f"{r['tokens_per_second']:>8.1f} {r['seconds'] / dense_s:>10.3f}"
    )
  if "sparse" in result:
    lines.append(
      f"coverage: {100 * result['coverage']:.1f}% of linear multiply-adds sparsified, "
      f"{100 * result['removed']:.1f}% removed (x (1 - N/M)); LM head excluded"
    )
    if result.get("plan_seconds") is not None:
      lines.append(f"plan built in {result['plan_seconds']:.1f} s (scores, calibration, search)")
    if result["sparse"]["policy"] == "search":
      counts = ", ".join(f"{p} {n}" for p, n in result["sparse_sites"].items())
      lines.append(f"layers sparse per projection: {counts}")
    elif result["sparse"]["policy"] not in ("all", "loaded", "weight", "threshold"):
      lines.append(f"q/gate dense in layers: {result['skip_layers'] or 'none'}")
      if result.get("dense_sites"):
        lines.append(f"q/gate sites kept dense: {', '.join(result['dense_sites'])}")
    if "generation" in result:
      g = result["generation"]
      lines.append(
        f"generation ({g['prompts']} prompts x {g['new_tokens']} tokens, sparse "
        f"prefill, decode without sparsity): {100 * g['agreement']:.1f}% of tokens equal to "
        f"dense, {100 * g['prefix_agreement']:.1f}% before the first divergence"
      )
  return "\n".join(lines)
