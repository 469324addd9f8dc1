"""Coverage of a policy on a model's configuration: no weights, no text (the paper's Table 1
arithmetic: the share of per-token linear multiply-adds whose input is sparsified)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from amber_jax.calibrate.policy import check_skip_layers, policy_sites
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sites import Architecture
from amber_jax.plan.coverage import coverage, site_macs

# Policies that need no weights (auto and search measure sensitivities on the model).
STATIC_POLICIES = ("paper", "all")


@dataclasses.dataclass(frozen=True)
class CoverageReport:
  """What ``coverage_report`` returns (also the experiment's JSON, ``dataclasses.asdict``)."""

  model: str
  architecture: str
  policy: str
  skip_layers: tuple[int, ...]
  pattern: str
  coverage: float  # a fraction of the per-token linear multiply-adds (LM head excluded)
  removed: float  # coverage * (1 - N/M)
  covered_macs: int
  total_macs: int
  site_macs: dict[str, int]  # per token, one layer (experts: only those a token uses)
  sparse_sites: dict[str, int]  # site -> the number of layers where it is sparsified
  skippable: tuple[str, ...]  # the sites skip_layers keeps dense (q and gate for Llama)


def coverage_report(
  config: Architecture,
  *,
  model: str,
  policy: str = "paper",
  skip_layers: Sequence[int] = (),
  pattern: str = "8:16",
) -> CoverageReport:
  """Coverage of ``policy`` ("paper" or "all") with ``skip_layers`` on ``config``.

  Raises ValueError for a policy that needs weights (auto, search), a bad skip layer or a
  pattern that is not N:M."""
  if policy not in STATIC_POLICIES:
    raise ValueError(
      f"policy must be one of {', '.join(STATIC_POLICIES)} here (no weights are loaded; auto "
      f"and search measure sensitivities on the model), got {policy!r}"
    )
  nm = NMPattern.parse(pattern)
  skip = check_skip_layers(config, skip_layers)
  sites = policy_sites(config, policy, skip)
  cov = coverage(config, sites, nm)
  counts = {name: 0 for name in config.sites.names}
  for _, name in sites:
    counts[name] += 1
  return CoverageReport(
    model=model,
    architecture=getattr(config, "architecture", type(config).__name__),
    policy=policy,
    skip_layers=skip,
    pattern=str(nm),
    coverage=cov.covered,
    removed=cov.removed,
    covered_macs=cov.covered_macs,
    total_macs=cov.total_macs,
    site_macs=site_macs(config),
    sparse_sites=counts,
    skippable=config.sites.with_rule("skippable"),
  )


def format_coverage(report: CoverageReport) -> str:
  """Two lines for people: the model and policy, then coverage and the removed share."""
  skip = ",".join(map(str, report.skip_layers)) or "none"
  return (
    f"{report.model} ({report.architecture}): policy={report.policy}, "
    f"{'/'.join(report.skippable)} dense in layers {skip}, {report.pattern}\n"
    f"coverage {100 * report.coverage:.1f}% of linear multiply-adds "
    f"({report.covered_macs:,} of {report.total_macs:,} per token), "
    f"removed {100 * report.removed:.1f}%"
  )
