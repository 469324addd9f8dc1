"""Amber Pruner as one call: score factors + site policy (+ calibration) -> SparsityPlan."""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.correction_fit import (
  CorrectionResult,
  CorrectionSpec,
  calibrate_corrections,
  check_correction,
  check_correction_inputs,
)
from amber_jax.calibrate.policy import (
  Sensitivity,
  check_coverage_target,
  check_policy,
  check_skip_layers,
  max_skips_for_coverage,
  measure_sensitivity,
  policy_sites,
  select_dense_sites,
  select_skip_layers,
)
from amber_jax.calibrate.site_search import SiteCosts, measure_site_costs, select_sites
from amber_jax.core.backends import check_impl, get_backend
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import check_score, model_factors
from amber_jax.model.config import LlamaConfig
from amber_jax.plan.channel_order import check_o_order, model_channel_order
from amber_jax.plan.coverage import Coverage, plan_coverage
from amber_jax.plan.schema import SparsityPlan, make_plan

GRANULARITIES = ("layer", "site")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AmberConfig:
  """How to build a plan. Validated on construction (ValueError naming the field)."""

  pattern: NMPattern | None
  score: str = "naive"
  policy: str = "all"
  skip_layers: tuple[int, ...] = ()
  # auto: "layer" keeps q and gate dense together in whole layers (the paper's rule);
  # "site" chooses q and gate sites independently (a knapsack on the coverage budget).
  granularity: str = "layer"
  coverage: float = 0.55  # target for policy="auto" and "search"
  robust_clip: bool = True
  # "xla" | "pallas" | "pallas_mask"; None: the backend's default (amber_jax.core.backends)
  impl: str | None = None
  # Output correction of the sparse sites (amber_jax.calibrate.correction_fit), e.g. "median+bias";
  # fitted on the calibration windows, on the dense model's inputs or the sparse one's
  # ("sequential", "global"). Off by default: none won on a held-out text yet (RESULTS.md
  # "corrections").
  correction: str = "none"
  correction_inputs: str = "dense"
  # policy="search": the per-site KL costs are measured on the first this many calibration
  # windows (one pass per site and window, resumed at the site's layer: 2 x 512 tokens take
  # under 5 min for the 210 sites of SmolLM2-135M on 2 CPU cores).
  search_windows: int = 2
  # How the o-projection's input channels form N:M groups (amber_jax.plan.channel_order): "heads"
  # (M consecutive channels of one head) or "mixed" (a fixed random order per layer, mixing
  # heads in every group: on SmolLM2-135M the o sites' KL costs fall to a median 0.57x at 8:16).
  o_order: str = "heads"

  def __post_init__(self):
    if self.pattern is not None and not isinstance(self.pattern, NMPattern):
      # Normalised here ("8:16" -> NMPattern): everything downstream reads .n and .m.
      object.__setattr__(self, "pattern", NMPattern.parse(self.pattern))
    if self.impl is not None:
      check_impl(self.impl, self.pattern)
    check_score(self.score)
    check_policy(self.policy)
    check_coverage_target(self.coverage)
    if self.granularity not in GRANULARITIES:
      raise ValueError(
        f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
      )
    if self.policy in ("auto", "search") and self.skip_layers:
      raise ValueError(
        f"skip_layers cannot be given with policy={self.policy!r} (it chooses the sites)"
      )
    check_correction(self.correction)
    check_correction_inputs(self.correction_inputs)
    check_o_order(self.o_order)
    if self.search_windows < 1:
      raise ValueError(f"search_windows must be >= 1, got {self.search_windows}")
    runs_corrections = self.impl is None or get_backend(self.impl).corrections
    if not runs_corrections and not CorrectionSpec.parse(self.correction).is_none:
      raise ValueError(f"correction={self.correction!r} needs impl='xla', got impl={self.impl!r}")

  def validate_for(self, config: LlamaConfig) -> None:
    """Model-dependent checks (skip layers in range, M divides widths, the auto policy's
    coverage target reachable under the paper's rules), before loading weights."""
    check_skip_layers(config, self.skip_layers)
    if self.pattern is not None:
      policy = {"auto": "paper", "search": "all"}.get(self.policy, self.policy)
      make_plan(config, self.pattern, sites=policy_sites(config, policy, self.skip_layers))
      if self.policy == "auto":
        max_skips_for_coverage(config, self.coverage)  # raises if the target is unreachable

  @property
  def needs_calibration(self) -> bool:
    """Whether build_plan needs calibration windows (auto/search policy, or a correction)."""
    return self.pattern is not None and (
      self.policy in ("auto", "search") or not CorrectionSpec.parse(self.correction).is_none
    )


@dataclasses.dataclass(frozen=True)
class PlanInfo:
  """What ``build_plan`` returns: the plan and how it was chosen (coverage, skipped layers,
  the measured sensitivities or site costs when a policy measured them)."""

  plan: SparsityPlan
  coverage: Coverage
  skip_layers: tuple[int, ...]  # layers whose q and gate both stay dense
  sensitivity: Sensitivity | None
  seconds: float  # factors + calibration + search
  dense_sites: tuple[tuple[int, str], ...] = ()  # granularity="site": q/gate sites kept dense
  correction: CorrectionResult | None = None  # the calibrated corrections (if any)
  site_costs: SiteCosts | None = None  # policy="search": the measured per-site costs


def build_plan(
  params,
  config: LlamaConfig,
  amber: AmberConfig,
  *,
  calib_windows: np.ndarray | None = None,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  site_costs: SiteCosts | None = None,
) -> PlanInfo:
  """The plan of ``amber`` for this model; ``calib_windows`` [W, T] are needed for "auto",
  "search" and for a correction (fitted on all of them in one pass).

  ``site_costs``: costs measured earlier for the same pattern and score (SiteCosts serve
  every coverage target), so policy="search" skips measuring them again."""
  start = time.perf_counter()
  amber.validate_for(config)
  expert_sites = [s.name for s in config.sites if s.experts]
  if amber.correction != "none" and expert_sites:
    raise ValueError(
      f"correction={amber.correction!r}: output corrections are not supported on expert sites "
      f"({', '.join(expert_sites)}); use correction='none' on a mixture-of-experts model"
    )
  if amber.pattern is None:
    plan = make_plan(config, None, impl=amber.impl)
    return PlanInfo(plan, plan_coverage(config, plan), (), None, time.perf_counter() - start)
  factors = model_factors(params, amber.score, robust_clip=amber.robust_clip)
  channel_order = model_channel_order(config, amber.o_order)
  plan_of = lambda sites: make_plan(
    config,
    amber.pattern,
    sites=sites,
    factors=factors,
    impl=amber.impl,
    channel_order=channel_order,
  )
  sensitivity = None
  skip = tuple(amber.skip_layers)
  dense_sites: set[tuple[int, str]] = set()
  if amber.policy == "auto":
    if calib_windows is None or len(calib_windows) == 0:
      raise ValueError("policy='auto' needs calibration windows (calib_windows >= 1)")
    sensitivity = measure_sensitivity(
      params,
      calib_windows,
      config=config,
      pattern=amber.pattern,
      factors=factors,
      score=amber.score,
      batch_size=batch_size,
      dtype=dtype,
      show_progress=show_progress,
      channel_order=channel_order,
    )
    if amber.granularity == "layer":
      skip = select_skip_layers(sensitivity, config, amber.coverage)
    else:
      dense_sites = set(select_dense_sites(sensitivity, config, amber.coverage))
  if amber.policy == "search":
    if calib_windows is None or len(calib_windows) == 0:
      raise ValueError("policy='search' needs calibration windows (calib_windows >= 1)")
    if site_costs is None:
      site_costs = measure_site_costs(
        params,
        plan_of("all"),
        calib_windows[: amber.search_windows],
        config=config,
        batch_size=min(batch_size, 2),
        dtype=dtype,
        show_progress=show_progress,
      )
    elif site_costs.pattern != str(amber.pattern):
      raise ValueError(f"site_costs are for {site_costs.pattern}, the plan is {amber.pattern}")
    elif site_costs.ordered != tuple(sorted(channel_order or {})):
      raise ValueError(
        f"site_costs were measured with channel orders for {site_costs.ordered or 'none'}, "
        f"the plan (o_order={amber.o_order!r}) has them for {tuple(sorted(channel_order or {}))}"
      )
    sites = select_sites(site_costs, config, amber.coverage)
  else:
    policy = "paper" if amber.policy == "auto" else amber.policy
    sites = [s for s in policy_sites(config, policy, skip) if s not in dense_sites]
  plan = plan_of(sites)
  if dense_sites:  # report whole layers where every skippable site (q, gate) stayed dense
    skippable = config.sites.with_rule("skippable")
    skip = tuple(
      l for l in range(config.n_layers) if {(l, name) for name in skippable} <= dense_sites
    )
  correction = None
  if not CorrectionSpec.parse(amber.correction).is_none:
    if calib_windows is None or len(calib_windows) == 0:
      raise ValueError(f"correction={amber.correction!r} needs calibration windows")
    correction = calibrate_corrections(
      params,
      plan,
      calib_windows,
      config=config,
      correction=amber.correction,
      inputs=amber.correction_inputs,
      dtype=dtype,
      show_progress=show_progress,
    )
    plan = plan.replace(correction=correction.correction)
  return PlanInfo(
    plan,
    plan_coverage(config, plan),
    skip,
    sensitivity,
    time.perf_counter() - start,
    tuple(sorted(dense_sites)),
    correction,
    site_costs if amber.policy == "search" else None,
  )
