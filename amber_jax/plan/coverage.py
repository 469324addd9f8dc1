"""Coverage: the share of per-token linear multiply-adds whose input is sparsified.

Counted over the sites the architecture declares (``config.sites``: for Llama q, k, v, o,
gate, up and down) of every layer, each at its multiply-adds per token (an expert site counts
only the experts a token uses); the LM head is excluded (as in the paper). Depends on the
config and the set of sparsified sites only, so it can be computed for models that are not
loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sites import Architecture


@dataclasses.dataclass(frozen=True)
class Coverage:
  """Share of a model's linear multiply-adds whose input a plan sparsifies (LM head excluded)."""

  covered: float  # share of linear multiply-adds whose input is sparsified
  removed: float  # share actually removed: covered * (1 - N/M)
  covered_macs: int  # per token
  total_macs: int  # per token, every site of every layer


def site_macs(config: Architecture) -> dict[str, int]:
  """Per-token multiply-adds of each site of one layer (``Site.macs_per_token``)."""
  return {s.name: s.macs_per_token for s in config.sites}


def coverage(
  config: Architecture, sites: Iterable[tuple[int, str]], pattern: NMPattern | None
) -> Coverage:
  """Coverage of sparsifying ``sites`` ((layer, projection) pairs) with ``pattern``.

  Raises ValueError for a layer outside the model or an unknown projection."""
  macs = site_macs(config)
  total = config.n_layers * sum(macs.values())
  sites = set(sites)
  for layer, proj in sites:
    if proj not in macs:
      raise ValueError(f"unknown projection {proj!r} in sites; valid: {', '.join(macs)}")
    if not 0 <= layer < config.n_layers:
      raise ValueError(
        f"layer {layer} in sites is out of range: the model has layers 0..{config.n_layers - 1}"
      )
  covered = 0 if pattern is None else sum(macs[p] for _, p in sites)
  share = covered / total
  removed = 0.0 if pattern is None else share * (1 - pattern.density)
  return Coverage(covered=share, removed=removed, covered_macs=covered, total_macs=total)


def plan_coverage(config: Architecture, plan) -> Coverage:
  """Coverage of a SparsityPlan (its enabled sites and pattern)."""
  return coverage(config, plan.enabled_sites() if plan.pattern else (), plan.pattern)
