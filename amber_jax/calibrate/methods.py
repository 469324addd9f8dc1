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
}


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


BASE_METHODS: dict[str, BaseMethod] = {
  m.name: m
  for m in (
    BaseMethod(
      name="dense",
      definition="No sparsity: every linear reads its whole input. The reference row.",
      calibration="none",
      score=None,
      policy=None,
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
    return self.base.score is None

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
    return self.has_coverage_target or self.correction != "none" or self.learned_steps > 0

  @property
  def calibration(self) -> str:
    """The calibration cost: a key of ``CALIBRATION_COSTS``."""
    if self.learned_steps:
      return "optimiser steps"
    return self.base.calibration

  def fields(self) -> dict:
    """The AmberConfig fields this method fixes (what a conflicting old flag would change)."""
    if self.is_dense:
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
  if m.is_dense:
    fixed = {k: None for k in ("score", "policy", "o_order", "granularity", "correction")}
  for key, value in given.items():
    if key in fixed and value != fixed[key]:
      sets = "makes no plan" if m.is_dense else f"sets {key}={fixed[key]!r}"
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
