"""One registry of named sparsification methods (recipes), the same names everywhere.

A *method* is a complete recipe for an N:M plan: the selection score, which sites are sparse and
how they are chosen, how the o-projection's groups are formed, an optional output correction and
optional learned score factors. Every runner (``amber_jax.runs``: prefill, front, corrections,
zero_shot, generation), the CLI (``--method=`` / ``--methods=``), the lm-eval adapter
(``model_args="...,method=amber"``) and the result JSONs (``"method": name``) use these names
and mean the same thing by them. The pattern (``"8:16"``) and the coverage target are the
method's two free parameters.

Base methods (``BASE_METHODS``):

* ``dense``: nothing sparse.
* ``naive``: the paper's naive top-k baseline: |x| on the input of every linear of every layer.
* ``naive_rules``: |x| under Amber's site rules and automatic layer choice.
* ``amber``: Amber Pruner (arXiv 2508.02128): robust score, the paper's rules, automatic layers.
* ``search``: robust score, any site, chosen by its measured KL cost (beyond the paper).
* ``search_mixed``: ``search`` with the o-projection's N:M groups mixing attention heads.

Baselines of other papers, in the same harness (``amber_jax.baselines``; ``kind`` says what
they produce):

* ``wanda``, ``sparsegpt`` (kind "weight"): weight pruning, N:M along the input axis per output
  channel (``pattern``) or unstructured (``sparsity``); a params tree with zeros, evaluated
  densely;
* ``teal`` (TEAL's block-wise greedy allocation), ``teal_uniform`` (every site at the target)
  and ``cats`` (the gated MLP activation), kind "threshold": magnitude thresholds of the
  activations for an unstructured ``sparsity``, a plan with ``threshold`` / ``gate_threshold``.

``build_method`` builds any of them into (params, plan) with its record.

Suffixes (searched plans only, as the front measured them): ``+<correction>`` (any
``amber_jax.calibrate.correction_fit`` spec, e.g. ``+median`` or ``+median+bias``), then
``+learned[N]`` (N optimiser steps of learned score factors, default 4) or ``+learnedscale[N]``
(also per-output-channel scales). Aliases (``ALIASES``): ``paper`` (``amber``'s old name) and
``best``: the project's best recipe so far (``BEST``; see ``BEST_REASON``).

    >>> m = resolve_method("search_mixed+median+learned")
    >>> m.name, m.correction, m.learned_steps
    ('search_mixed+median+learned', 'median', 4)
    >>> resolve_method("paper").name
    'amber'
    >>> m.amber_config("8:16", coverage=0.55).o_order
    'mixed'
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.correction_fit import CorrectionSpec
from amber_jax.calibrate.learned_factors import LearnedFactors, learn_score_factors
from amber_jax.calibrate.pruner import AmberConfig, PlanInfo, build_plan
from amber_jax.core.patterns import NMPattern, parse_pattern_or_dense

DEFAULT_COVERAGE = 0.55  # the coverage target a method runs at unless told otherwise
DEFAULT_LEARN_STEPS = 4  # "+learned" without a number (RESULTS.md "front": 12 overfit)
DEFAULT_LEARNING_RATE = 0.05  # Adam on the log-factors (the front's learning_rate)

# What a method runs before evaluation, cheapest first.
CALIBRATION_COSTS = {
  "none": "nothing: the plan follows from the weights (or there is no plan)",
  "one pass": "one pass over the calibration windows (per-site output errors)",
  "per-site KL search": (
    "one pass per site and search window (KL to dense with only that site sparse): 210 sites "
    "x 2 windows of 512 tokens take about 5 minutes for SmolLM2-135M on 2 CPU cores"
  ),
  "optimiser steps": (
    "the search, then optax steps on the calibration windows (about 40 s per step for "
    "SmolLM2-135M on 2 CPU cores)"
  ),
  "layer by layer": (
    "one pass per layer over the calibration windows (each layer on the already-pruned "
    "model's inputs), plus the per-site pruning (SparseGPT: an OBS solve per site)"
  ),
  "histograms": "one pass of histograms over the calibration windows",
  "histograms + greedy": (
    "one pass of histograms, then per layer one one-layer pass per site and greedy step"
  ),
}
# What a method produces: no plan, an N:M plan, pruned weights, or activation thresholds.
KINDS = ("dense", "nm", "weight", "threshold")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseMethod:
  """A named base recipe: its definition, calibration cost and AmberConfig fields.

  ``score`` and ``policy`` are None for ``dense`` (no plan at all)."""

  name: str
  definition: str
  calibration: str  # a key of CALIBRATION_COSTS
  score: str | None
  policy: str | None
  o_order: str = "heads"
  granularity: str = "layer"
  reference: str = ""  # paper / arXiv id, where there is one
  suffixes: bool = False  # takes +correction / +learned suffixes
  kind: str = "nm"  # one of KINDS
  takes: tuple[str, ...] = ("pattern",)  # "pattern" (N:M) and/or "sparsity" (unstructured)


BASE_METHODS: dict[str, BaseMethod] = {
  m.name: m
  for m in (
    BaseMethod(
      name="dense",
      definition="No sparsity: every linear reads its whole input. The reference row.",
      calibration="none",
      score=None,
      policy=None,
      kind="dense",
      takes=(),
    ),
    BaseMethod(
      name="naive",
      definition=(
        "The paper's naive top-k baseline: keep the N of every M input activations with the "
        "largest |x| on the input of every linear of every layer (q, k, v, o, gate, up, down; "
        "AmberConfig score='naive', policy='all'; coverage 1.0, the LM head stays dense)."
      ),
      calibration="none",
      score="naive",
      policy="all",
      reference="arXiv 2508.02128 (naive top-k)",
    ),
    BaseMethod(
      name="naive_rules",
      definition=(
        "|x| scores under Amber Pruner's site rules and automatic layer choice (score='naive', "
        "policy='auto'): q, gate, down sparse; k, v, o, up dense; q and gate dense in the most "
        "sensitive layers so that coverage stays >= the target. Separates the robust score's "
        "share of Amber's gain from the rules' share. Named 'naive' in runs/front.py before "
        "this registry (front results saved with that name are read as this)."
      ),
      calibration="one pass",
      score="naive",
      policy="auto",
    ),
    BaseMethod(
      name="amber",
      definition=(
        "Amber Pruner: the robust weight-aware score |x_j| * f_j (f from the column norms of "
        "the weight standardised with the mean and std of its entries inside the 0.5/99.5 "
        "percentiles, clipped), the paper's rules (q, gate, down sparse; k, v, o, up dense) "
        "and q/gate kept dense in the most sensitive layers, chosen automatically on the "
        "calibration windows so that coverage >= the target (score='robust', policy='auto'). "
        "experiments/prefill.py's default. Old name: 'paper'."
      ),
      calibration="one pass",
      score="robust",
      policy="auto",
      reference="arXiv 2508.02128 (Amber Pruner, layer skip)",
    ),
    BaseMethod(
      name="search",
      definition=(
        "Beyond the paper (RESULTS.md 'front'): robust scores; any projection of any layer may "
        "be sparse. A site's cost is the KL divergence of the next-token distribution from the "
        "dense model's with only that site sparse (on the first 2 calibration windows); an "
        "exact knapsack picks the cheapest sites that reach the coverage target "
        "(score='robust', policy='search', amber_jax.calibrate.site_search)."
      ),
      calibration="per-site KL search",
      score="robust",
      policy="search",
      suffixes=True,
    ),
    BaseMethod(
      name="search_mixed",
      definition=(
        "'search' with the o-projection's N:M groups formed across attention heads (a fixed "
        "random channel order per layer, amber_jax.plan.channel_order; o_order='mixed'); the site "
        "costs are measured with that grouping."
      ),
      calibration="per-site KL search",
      score="robust",
      policy="search",
      o_order="mixed",
      suffixes=True,
    ),
    BaseMethod(
      name="wanda",
      definition=(
        "Wanda: weights scored |W_jo| * ||X_j||_2 (the input channel's norm over the "
        "calibration tokens); N:M keeps the N best of every M consecutive inputs of each output "
        "channel, unstructured the best (1 - s) of each output channel; no weight update; every "
        "linear of every layer, calibrated layer by layer on the pruned model's inputs."
      ),
      calibration="layer by layer",
      score=None,
      policy=None,
      reference="arXiv 2306.11695 (Wanda)",
      kind="weight",
      takes=("pattern", "sparsity"),
    ),
    BaseMethod(
      name="sparsegpt",
      definition=(
        "SparseGPT: per site the Hessian X^T X of its calibration inputs (float32, dampened by "
        "1% of its mean diagonal), column blocks of 128 with OBS updates of the remaining "
        "weights, N:M masks chosen per group of M columns (unstructured: per block); every "
        "linear of every layer, layers pruned in order on the pruned model's inputs."
      ),
      calibration="layer by layer",
      score=None,
      policy=None,
      reference="arXiv 2301.00774 (SparseGPT)",
      kind="weight",
      takes=("pattern", "sparsity"),
    ),
    BaseMethod(
      name="teal",
      definition=(
        "TEAL: every linear's input keeps the entries with |x| > t_site (unstructured, per "
        "token), t_site the magnitude quantile of the site's calibration inputs at its "
        "sparsity; the sparsities allocated per layer by TEAL's block-wise greedy search (the "
        "step that raises the layer's output error least, until the layer's MAC-weighted "
        "sparsity reaches the target)."
      ),
      calibration="histograms + greedy",
      score=None,
      policy=None,
      reference="arXiv 2408.14690 (TEAL)",
      kind="threshold",
      takes=("sparsity",),
    ),
    BaseMethod(
      name="teal_uniform",
      definition="TEAL with every site at the target sparsity (TEAL's uniform setting).",
      calibration="histograms",
      score=None,
      policy=None,
      reference="arXiv 2408.14690 (TEAL, uniform)",
      kind="threshold",
      takes=("sparsity",),
    ),
    BaseMethod(
      name="cats",
      definition=(
        "CATS: in every MLP the gated activation silu(gate(x)) keeps the entries with "
        "|a| > t_layer, the quantile of its calibration values at the target sparsity; down "
        "reads a sparse input and the same rows of up are unused (both count as removed)."
      ),
      calibration="histograms",
      score=None,
      policy=None,
      reference="arXiv 2404.08763 (CATS)",
      kind="threshold",
      takes=("sparsity",),
    ),
  )
}

# The project's best recipe so far, at coverage 0.55 (RESULTS.md "front", SmolLM2-135M, 8 windows
# x 512 tokens of lee_background; enwiki never calibrated on). Change it when a better one is
# measured, and say why here.
BEST = "search_mixed+learnedscale"
BEST_REASON = (
  "search_mixed+learnedscale at coverage 0.55 has the lowest 8:16 perplexity of every measured "
  "recipe on both texts: lee_background 37.73, enwiki 26.62 (amber: 42.72 / 30.23, "
  "search_mixed: 39.44 / 27.03, search_mixed+learned: 37.98 / 26.66; dense 33.31 / 23.46). At "
  "2:4 it gives 43.59 / 30.58 (amber 54.21 / 38.03); search_mixed+median+learnedscale is lower "
  "on lee_background (43.12) but not on the held-out enwiki (30.62) and worse at 8:16 "
  "(38.00 / 27.15). Calibration: the site costs (about 270 s) plus 4 steps (about 160 s) on "
  "2 CPU cores."
)
ALIASES = {"paper": "amber", "best": BEST}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  """A resolved method: a base recipe plus its suffixes. ``name`` is canonical (aliases
  resolved, the correction spelled as ``CorrectionSpec`` prints it, ``learned`` without the
  default step count); ``given`` is the name as asked for."""

  name: str
  base: BaseMethod
  correction: str = "none"
  learned_steps: int = 0  # 0: no learned factors
  learn_scales: bool = False
  given: str = ""

  @property
  def is_dense(self) -> bool:
    return self.base.kind == "dense"

  @property
  def kind(self) -> str:
    """What the method produces (``KINDS``): "dense", "nm", "weight" or "threshold"."""
    return self.base.kind

  @property
  def is_baseline(self) -> bool:
    """A method of another paper built by ``amber_jax.baselines`` (weight or threshold)."""
    return self.base.kind in ("weight", "threshold")

  @property
  def score(self) -> str | None:
    return self.base.score

  @property
  def policy(self) -> str | None:
    return self.base.policy

  @property
  def o_order(self) -> str:
    return self.base.o_order

  @property
  def granularity(self) -> str:
    return self.base.granularity

  @property
  def has_coverage_target(self) -> bool:
    """Whether the coverage target applies (policies auto and search choose sites for it)."""
    return self.policy in ("auto", "search")

  @property
  def needs_calibration(self) -> bool:
    """Whether building the plan reads calibration windows."""
    return (
      self.is_baseline
      or self.has_coverage_target
      or self.correction != "none"
      or self.learned_steps > 0
    )

  @property
  def calibration(self) -> str:
    """The calibration cost: a key of ``CALIBRATION_COSTS``."""
    if self.learned_steps:
      return "optimiser steps"
    return self.base.calibration

  def fields(self) -> dict:
    """The AmberConfig fields this method fixes (what a conflicting old flag would change)."""
    if self.is_dense or self.is_baseline:
      return {}
    return {
      "score": self.score,
      "policy": self.policy,
      "o_order": self.o_order,
      "granularity": self.granularity,
      "correction": self.correction,
    }

  def amber_config(
    self,
    pattern: str | NMPattern | None,
    *,
    coverage: float = DEFAULT_COVERAGE,
    **options,
  ) -> AmberConfig:
    """The method's AmberConfig at ``pattern``; ``coverage`` is used only by methods with a
    coverage target (else the field keeps its default, as the old flags built it).
    ``options``: the free AmberConfig fields (impl, robust_clip, skip_layers,
    correction_inputs, search_windows); one this method fixes is a ValueError."""
    fixed = sorted(set(options) & set(self.fields()))
    if fixed:
      raise ValueError(f"method {self.name!r} fixes {', '.join(fixed)}; do not pass them")
    if self.is_baseline:
      raise ValueError(
        f"method {self.name!r} is a {self.kind} baseline, not an N:M plan: build it with "
        "build_method (amber_jax.calibrate.methods)"
      )
    if isinstance(pattern, str):
      pattern = parse_pattern_or_dense(pattern)
    if self.is_dense or pattern is None:
      return AmberConfig(pattern=None, impl=options.get("impl"))
    if self.has_coverage_target:
      options["coverage"] = coverage
    return AmberConfig(pattern=pattern, **self.fields(), **options)

  def describe(self) -> str:
    """One paragraph: the definition, suffixes, calibration cost and reference."""
    text = self.base.definition
    if self.correction != "none":
      text += (
        f" Plus the output correction {self.correction!r} (amber_jax.calibrate.correction_fit)."
      )
    if self.learned_steps:
      what = "score factors and output scales" if self.learn_scales else "score factors"
      text += f" Plus {self.learned_steps} optax steps of learned {what}."
    text += f" Calibration: {CALIBRATION_COSTS[self.calibration]}."
    if self.base.reference:
      text += f" Reference: {self.base.reference}."
    return text


def method_names() -> list[str]:
  """Every base name and alias, then the suffix forms (for help texts and errors)."""
  return [*BASE_METHODS, *ALIASES]


def _valid_names() -> str:
  bases = ", ".join(method_names())
  return f"{bases}; searched bases take +<correction>, +learned[N], +learnedscale[N]"


def resolve_method(name: str | Method) -> Method:
  """The Method a name stands for; ValueError listing the valid names for an unknown one.

  ``"search+median"`` -> correction "median"; ``"search+learned"`` -> 4 learned steps;
  ``"search+learned12"`` -> 12; ``"search+learnedscale"`` -> 4 steps, scales too;
  ``"search+median+learned"`` -> factors learned through the calibrated correction.
  """
  if isinstance(name, Method):
    return name
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f"method must be a name ({_valid_names()}), got {name!r}")
  given = name
  name = ALIASES.get(name.strip(), name.strip())
  base_name, *extras = name.split("+")
  base_name = ALIASES.get(base_name, base_name)
  if base_name not in BASE_METHODS:
    raise ValueError(f"unknown method {given!r}; valid: {_valid_names()}")
  base = BASE_METHODS[base_name]
  steps, scales = 0, False
  if extras and extras[-1].startswith("learned"):
    last = extras.pop()
    scales = last.startswith("learnedscale")
    count = last[len("learnedscale" if scales else "learned") :]
    if count and not (count.isdigit() and int(count) >= 1):
      raise ValueError(f"learned steps must be a positive integer, got {given!r}")
    steps = int(count or DEFAULT_LEARN_STEPS)
  correction = "none"
  if extras:
    try:
      correction = str(CorrectionSpec.parse("+".join(extras)))
    except ValueError as e:
      raise ValueError(f"method {given!r}: {e}") from None
  if (steps or correction != "none") and not base.suffixes:
    searched = ", ".join(n for n, b in BASE_METHODS.items() if b.suffixes)
    raise ValueError(
      f"corrections and learned factors apply to searched plans ({searched}), got {given!r}"
    )
  parts = [base.name]
  if correction != "none":
    parts.append(correction)
  if steps:
    word = "learnedscale" if scales else "learned"
    parts.append(word if steps == DEFAULT_LEARN_STEPS else f"{word}{steps}")
  return Method(
    name="+".join(parts),
    base=base,
    correction=correction,
    learned_steps=steps,
    learn_scales=scales,
    given=given,
  )


def check_method_conflicts(method: str | Method, given: dict) -> Method:
  """The resolved method, or a ValueError when an old option in ``given`` (name -> value, only
  those the caller was given, e.g. ``{"policy": "auto"}``) sets a field the method fixes to
  another value: it names both."""
  m = resolve_method(method)
  fixed = m.fields()
  if m.is_dense or m.is_baseline:
    fixed = {k: None for k in ("score", "policy", "o_order", "granularity", "correction")}
  for key, value in given.items():
    if key in fixed and value != fixed[key]:
      sets = (
        "makes no plan"
        if m.is_dense
        else f"is a {m.kind} baseline"
        if m.is_baseline
        else f"sets {key}={fixed[key]!r}"
      )
      raise ValueError(
        f"method={m.given or m.name!r} conflicts with {key}={value!r} (the method {sets}); "
        "give the method or the option, not both"
      )
  return m


def identify_method(amber: AmberConfig | None, *, learned_steps: int = 0, learn_scales=False):
  """The canonical name of the registry method that builds ``amber`` (with this learning), or
  None when the plan is not one of them (e.g. the weight score, fixed skip layers)."""
  if amber is None or amber.pattern is None:
    return "dense"
  if amber.skip_layers or not amber.robust_clip or amber.correction_inputs != "dense":
    return None
  for base in BASE_METHODS.values():
    if base.score is None:
      continue
    own = (base.score, base.policy, base.o_order, base.granularity)
    if own != (amber.score, amber.policy, amber.o_order, amber.granularity):
      continue
    suffix = [] if amber.correction == "none" else [str(CorrectionSpec.parse(amber.correction))]
    if learned_steps:
      word = "learnedscale" if learn_scales else "learned"
      suffix.append(word if learned_steps == DEFAULT_LEARN_STEPS else f"{word}{learned_steps}")
    if suffix and not base.suffixes:
      return None
    return "+".join([base.name, *suffix])
  return None


@dataclasses.dataclass(frozen=True)
class MethodPlan:
  """What ``build_method_plan`` returns: the plan info (its ``plan`` with learned factors when
  the method learns them) and the learning's record (None without learning)."""

  info: PlanInfo
  method: Method | None  # None: the plan came from an AmberConfig alone
  learned: LearnedFactors | None = None

  @property
  def plan(self):
    return self.info.plan

  def learned_record(self) -> dict | None:
    """The learning's JSON record (steps, scales, losses, initial/final KL), or None."""
    if self.learned is None:
      return None
    return {
      "steps": self.method.learned_steps,
      "scales": self.method.learn_scales,
      "losses": self.learned.losses,
      "initial_kl": self.learned.initial_kl,
      "final_kl": self.learned.final_kl,
    }


def build_method_plan(
  params,
  config,
  method: str | Method | None,
  amber: AmberConfig,
  *,
  calib_windows: np.ndarray | None = None,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  site_costs=None,
  learning_rate: float = DEFAULT_LEARNING_RATE,
) -> MethodPlan:
  """``pruner.build_plan(amber)``, then the method's learned factors (if any) on the same
  calibration windows. ``amber`` is the method's AmberConfig (``Method.amber_config``, maybe
  with free options such as impl); for a method without learning, or ``method=None`` (a plan
  given by AmberConfig fields alone), this is exactly build_plan."""
  m = None if method is None else resolve_method(method)
  info = build_plan(
    params,
    config,
    amber,
    calib_windows=calib_windows,
    batch_size=batch_size,
    dtype=dtype,
    show_progress=show_progress,
    site_costs=site_costs,
  )
  if m is None or not m.learned_steps or amber.pattern is None:
    return MethodPlan(info, m)
  if calib_windows is None or len(calib_windows) == 0:
    raise ValueError(f"method {m.name!r} learns factors: it needs calibration windows")
  learned = learn_score_factors(
    params,
    info.plan,
    calib_windows,
    config=config,
    steps=m.learned_steps,
    learning_rate=learning_rate,
    learn_scales=m.learn_scales,
    show_progress=show_progress,
  )
  info = dataclasses.replace(info, plan=learned.plan, seconds=info.seconds + learned.seconds)
  return MethodPlan(info, m, learned)


@dataclasses.dataclass(frozen=True)
class BuiltMethod:
  """What ``build_method`` returns: the ``params`` to evaluate (a weight method's pruned ones,
  else the given ones), the ``plan`` (None: dense), the calibration ``seconds``, the share of the
  linear multiply-adds touched (``coverage``: sparsified inputs or pruned weights) and removed
  (``removed``), a JSON ``record`` of what was built, and the method's own result (``info`` for
  an N:M plan, ``pruned`` for weight pruning, ``thresholds`` for TEAL/CATS)."""

  method: Method
  params: dict
  plan: object
  pattern: str | None
  sparsity: float | None
  seconds: float
  coverage: float
  removed: float
  record: dict
  info: PlanInfo | None = None
  pruned: object = None
  thresholds: object = None
  learned: LearnedFactors | None = None


def check_method_target(method: str | Method, pattern, sparsity) -> tuple[Method, object, object]:
  """(method, NMPattern or None, sparsity or None) after checking that the method takes what was
  given: an N:M method a pattern, a threshold method a sparsity, a weight method exactly one of
  them (ValueError naming the method and what it takes)."""
  from amber_jax.baselines.weight_masks import check_sparsity

  m = resolve_method(method)
  if isinstance(pattern, str):
    pattern = parse_pattern_or_dense(pattern)
  takes = m.base.takes
  if m.is_dense:
    return m, None, None
  if pattern is not None and "pattern" not in takes:
    raise ValueError(f"method {m.name!r} takes a sparsity (unstructured), not pattern={pattern}")
  if sparsity is not None and "sparsity" not in takes:
    raise ValueError(f"method {m.name!r} takes an N:M pattern, not sparsity={sparsity}")
  if (pattern is None) == (sparsity is None):
    what = " or ".join(takes)
    raise ValueError(
      f"method {m.name!r} needs exactly one {what}, got pattern={pattern}, sparsity={sparsity}"
    )
  if sparsity is not None:
    sparsity = check_sparsity(sparsity)
  return m, pattern, sparsity


def build_method(
  params,
  config,
  method: str | Method,
  *,
  pattern=None,
  sparsity: float | None = None,
  coverage: float = DEFAULT_COVERAGE,
  calib_windows: np.ndarray | None = None,
  sites="all",
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  options: dict | None = None,
) -> BuiltMethod:
  """Any registry method built on ``params``: an N:M method at ``pattern`` and ``coverage``
  (``build_method_plan``; ``options``: the free AmberConfig fields such as impl), a weight
  method (``amber_jax.baselines.weight_pruning.prune_weights``; ``options``: damp, block_size)
  at ``pattern`` or ``sparsity`` on ``sites``, a threshold method
  (``amber_jax.baselines.thresholds``; ``options``: decode, greedy_step, greedy_windows) at
  ``sparsity`` on ``sites`` (CATS: the layers of the "gate" entries of ``sites``, or all).
  Everything is checked before calibration starts."""
  from amber_jax.plan.coverage import plan_coverage, site_macs

  m, pattern, sparsity = check_method_target(method, pattern, sparsity)
  options = dict(options or {})
  if m.is_dense:
    return BuiltMethod(m, params, None, None, None, 0.0, 0.0, 0.0, {"method": "dense"})
  if m.needs_calibration and (calib_windows is None or len(calib_windows) == 0):
    raise ValueError(f"method {m.name!r} calibrates: it needs calib_windows")
  if m.kind == "nm":
    amber = m.amber_config(pattern, coverage=coverage, **options)
    built = build_method_plan(
      params,
      config,
      m,
      amber,
      calib_windows=calib_windows,
      batch_size=batch_size,
      dtype=dtype,
      show_progress=show_progress,
    )
    cov = plan_coverage(config, built.plan)
    record = {"method": m.name, "pattern": str(pattern), "coverage": cov.covered}
    if built.learned is not None:
      record["learned"] = built.learned_record()
    return BuiltMethod(
      m,
      params,
      built.plan,
      str(pattern),
      None,
      built.info.seconds,
      cov.covered,
      cov.removed,
      record,
      info=built.info,
      learned=built.learned,
    )
  macs = site_macs(config)
  total = config.n_layers * sum(macs.values())
  if m.kind == "weight":
    from amber_jax.baselines.weight_pruning import prune_weights

    unknown = sorted(set(options) - {"damp", "block_size"})
    if unknown or (m.name == "wanda" and options):
      raise ValueError(f"method {m.name!r} takes no option {sorted(options)}")
    pruned = prune_weights(
      params,
      config,
      m.name,
      calib_windows=calib_windows,
      pattern=pattern,
      sparsity=sparsity,
      sites=sites,
      batch_size=batch_size,
      dtype=dtype,
      show_progress=show_progress,
      **options,
    )
    share = pruned.zero_share()
    covered = sum(macs[s] for _, s in pruned.sites) / total
    removed = sum(macs[s] * share[s][l] for l, s in pruned.sites) / total
    return BuiltMethod(
      m,
      pruned.params,
      None,
      None if pattern is None else str(pattern),
      sparsity,
      pruned.seconds,
      covered,
      float(removed),
      pruned.record(),
      pruned=pruned,
    )
  from amber_jax.baselines.thresholds import cats_plan, teal_plan

  if m.name == "cats":
    unknown = sorted(set(options) - {"decode"})
    if unknown:
      raise ValueError(f"method 'cats' takes only the option decode, got {unknown}")
    layers = "all" if sites == "all" else sorted({l for l, s in sites if s == "gate"})
    built = cats_plan(
      params,
      config,
      calib_windows,
      sparsity=sparsity,
      layers=layers,
      batch_size=batch_size,
      dtype=dtype,
      show_progress=show_progress,
      **options,
    )
    covered = 2 * np.count_nonzero(built.site_sparsity["down"]) * macs["down"] / total
  else:
    unknown = sorted(set(options) - {"decode", "greedy_step", "greedy_windows"})
    if unknown:
      raise ValueError(f"method {m.name!r} takes the options decode, greedy_step, greedy_windows")
    built = teal_plan(
      params,
      config,
      calib_windows,
      sparsity=sparsity,
      sites=sites,
      allocation="greedy" if m.name == "teal" else "uniform",
      batch_size=batch_size,
      dtype=dtype,
      show_progress=show_progress,
      **options,
    )
    covered = sum(macs[s] * np.count_nonzero(v) for s, v in built.site_sparsity.items()) / total
  return BuiltMethod(
    m,
    params,
    built.plan,
    None,
    sparsity,
    built.seconds,
    float(covered),
    built.removed,
    built.record(),
    thresholds=built,
  )


def parse_target(spec) -> NMPattern | float | None:
  """A row's target as the runners' ``patterns`` lists write it: "dense" -> None, "N:M" -> an
  NMPattern, "50%" (or "0.5") -> the unstructured sparsity 0.5 of the baselines that take one.
  ValueError naming the spec otherwise."""
  from amber_jax.baselines.weight_masks import check_sparsity

  if isinstance(spec, NMPattern):
    return spec
  if isinstance(spec, float):
    return check_sparsity(spec)
  text = str(spec).strip()
  if ":" in text or text == "dense":
    return parse_pattern_or_dense(text)
  try:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
  except ValueError:
    raise ValueError(
      f"target must be 'dense', an N:M pattern or an unstructured sparsity ('50%' or 0.5), "
      f"got {spec!r}"
    ) from None
  return check_sparsity(value, name=f"target {spec!r}")


def target_name(target) -> str:
  """The canonical name of a target: "dense", "2:4", "50%"."""
  target = parse_target(target)
  if target is None:
    return "dense"
  if isinstance(target, NMPattern):
    return str(target)
  return f"{100 * target:g}%"
