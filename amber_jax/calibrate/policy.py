"""Which sites are sparsified: the paper's rules, explicit skip lists, and automatic selection.

Policies:

* ``all``: every site of every layer;
* ``paper``: the paper's rules, as the architecture declares them (``Site.rule``): for Llama,
  q, gate and down sparse in every layer; k, v (small under GQA), o and up (most sensitive)
  dense; ``skip_layers`` keeps the skippable sites (q and gate) dense in those layers;
* ``auto``: the paper's rules, with the q/gate skip layers chosen from measured
  sensitivities: as many of the most sensitive layers as the coverage target
  allows (every layer's q+gate costs the same multiply-adds, so taking the
  largest errors first minimises the total error of the sparse sites);
* ``search``: any projection of any layer, chosen by each site's measured effect on the
  next-token distribution to reach the coverage target (``amber_jax.calibrate.site_search``).

Sensitivity of a site = ||Y - Y'|| / ||Y|| for that projection alone, with Y the
dense output and Y' the output with its input sparsified, accumulated over the
calibration windows on the dense model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.harness import (
  record_only,
  site_error_table,
  site_records,
)
from amber_jax.core.linear import row_factors, site_product
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sites import Architecture
from amber_jax.core.sparsity import sparsify
from amber_jax.plan.coverage import coverage as coverage_of
from amber_jax.plan.coverage import site_macs

POLICIES = ("all", "paper", "auto", "search")


def check_policy(policy: str) -> str:
  """``policy`` unchanged if it is one of ``POLICIES``, else ValueError listing them."""
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
  return policy


def check_batch_size(batch_size: int) -> int:
  """ValueError unless ``batch_size`` (windows per forward pass) is an int >= 1."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  return batch_size


def check_skip_layers(config: Architecture, skip_layers: Iterable[int]) -> tuple[int, ...]:
  """The distinct layer indices of ``skip_layers``, sorted; ValueError for a non-integer or
  an index outside the model's layers."""
  skip_layers = list(skip_layers)
  for layer in skip_layers:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
      raise ValueError(f"skip_layers must be integer layer indices, got {layer!r}")
  out = tuple(sorted(set(int(l) for l in skip_layers)))
  for layer in out:
    if not 0 <= layer < config.n_layers:
      raise ValueError(
        f"skip layer {layer} is out of range: the model has layers 0..{config.n_layers - 1}"
      )
  return out


def check_coverage_target(target: float) -> float:
  """``target`` as a float; ValueError unless it is in (0, 1] (a share of multiply-adds)."""
  if not 0.0 < target <= 1.0:
    raise ValueError(f"coverage must be in (0, 1], got {target}")
  return float(target)


def policy_sites(
  config: Architecture, policy: str, skip_layers: Iterable[int] = ()
) -> list[tuple[int, str]]:
  """(layer, site) pairs sparsified under ``policy`` ("all" or "paper") with the skippable
  sites (q/gate for Llama) of ``skip_layers`` kept dense."""
  check_policy(policy)
  skip = set(check_skip_layers(config, skip_layers))
  sites = config.sites
  names = sites.names if policy == "all" else sites.with_rule("sparse", "skippable")
  skippable = set(sites.with_rule("skippable"))
  return [
    (l, p) for l in range(config.n_layers) for p in names if not (l in skip and p in skippable)
  ]


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """Relative output error per site, [n_layers, n_sites] in ``config.sites`` order."""

  errors: np.ndarray
  pattern: str
  score: str
  tokens: int
  site_names: tuple[str, ...]  # the columns of ``errors``

  def table(self) -> str:
    header = "layer " + " ".join(f"{p:>7}" for p in self.site_names)
    rows = [header]
    for l, row in enumerate(self.errors):
      rows.append(f"{l:>5} " + " ".join(f"{e:>7.4f}" for e in row))
    rows.append(" mean " + " ".join(f"{e:>7.4f}" for e in self.errors.mean(axis=0)))
    return "\n".join(rows)


@functools.partial(jax.jit, static_argnames=("config", "pattern", "dtype"))
def _sensitivity_sums(params, tokens_BxT, sites, *, config, pattern, dtype):
  def record(x, weights, site):
    y = site_product(x, weights).astype(jnp.float32)
    factors = row_factors(site["factors"], weights)
    x_sparse = sparsify(x, pattern, factors, channel_order=site.get("channel_order"))
    err = site_product(x - x_sparse, weights).astype(jnp.float32)
    return jnp.sum(err * err), jnp.sum(y * y)

  return site_records(
    params, tokens_BxT, config=config, dtype=dtype, hook=record_only(record), hook_xs=sites
  )


def measure_sensitivity(
  params,
  windows: np.ndarray,
  *,
  config: Architecture,
  pattern: NMPattern,
  factors: dict[str, np.ndarray],
  score: str = "",
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  channel_order: dict[str, np.ndarray] | None = None,
) -> Sensitivity:
  """Per-site relative output error of sparsifying that site alone, on ``windows`` (dense model).

  ``windows`` [W, T] token ids; ``factors`` site -> [L, d_in] score factors; ``channel_order``
  a plan's (site -> [L, d_in] permutations forming the N:M groups) or None.
  """
  check_batch_size(batch_size)
  windows = np.asarray(windows, np.int32)
  names = config.sites.names
  sites = {p: {"factors": jnp.asarray(factors[p])} for p in names}
  for p, order in (channel_order or {}).items():
    sites[p]["channel_order"] = jnp.asarray(order)
  errors = site_error_table(
    lambda rows: _sensitivity_sums(
      params, rows, sites, config=config, pattern=pattern, dtype=dtype
    ),
    windows,
    config=config,
    batch_size=batch_size,
    desc="sensitivity",
    show_progress=show_progress,
  )
  return Sensitivity(
    errors=errors,
    pattern=str(pattern),
    score=score,
    tokens=int(windows.size),
    site_names=names,
  )


def max_skips_for_coverage(config: Architecture, target: float) -> int:
  """How many layers can keep q/gate dense under the paper's rules with coverage >= target."""
  check_coverage_target(target)
  pattern = NMPattern(n=1, m=2)  # coverage does not depend on N:M
  base = coverage_of(config, policy_sites(config, "paper"), pattern).covered
  if base < target - 1e-12:
    raise ValueError(
      f"coverage target {target:.3f} is unreachable with the paper's rules on this model "
      f"(at most {base:.3f} with no skipped layers); lower --coverage or use --policy=all"
    )
  for k in range(config.n_layers, -1, -1):
    sites = policy_sites(config, "paper", range(k))
    if coverage_of(config, sites, pattern).covered >= target - 1e-12:
      return k
  return 0


def _check_finite_errors(sensitivity: Sensitivity) -> None:
  # A NaN error would sort as the least sensitive (argsort) or count as free (knapsack).
  errors = np.asarray(sensitivity.errors)
  if not np.isfinite(errors).all():
    bad = [tuple(int(i) for i in ix) for ix in np.argwhere(~np.isfinite(errors))[:8]]
    raise ValueError(
      f"sensitivity errors must be finite; non-finite at (layer, projection index) {bad}"
    )


def select_skip_layers(
  sensitivity: Sensitivity, config: Architecture, coverage_target: float
) -> tuple[int, ...]:
  """The skip layers (q/gate dense) of the ``auto`` policy: the most sensitive (summed over the
  skippable sites) that the target allows."""
  _check_finite_errors(sensitivity)
  k = max_skips_for_coverage(config, coverage_target)
  columns = [config.sites.index(p) for p in config.sites.with_rule("skippable")]
  benefit = sensitivity.errors[:, columns].sum(axis=1)
  order = np.argsort(-benefit, kind="stable")
  return tuple(sorted(int(l) for l in order[:k]))


def select_dense_sites(
  sensitivity: Sensitivity, config: Architecture, coverage_target: float
) -> tuple[tuple[int, str], ...]:
  """Site-granular ``auto``: which q and gate sites (independently) stay dense.

  A 0/1 knapsack: each q or gate site kept dense costs its multiply-adds of
  coverage and removes its sensitivity from the total error; the budget is the
  coverage above the target under the paper's rules. Exact by dynamic programming
  over multiply-add units (the gcd of the site costs).
  """
  check_coverage_target(coverage_target)
  _check_finite_errors(sensitivity)
  macs = site_macs(config)
  total = config.n_layers * sum(macs.values())
  paper = sum(macs[p] for _, p in policy_sites(config, "paper"))
  budget = paper - coverage_target * total
  if budget < -1e-9 * total:
    max_skips_for_coverage(config, coverage_target)  # raises the unreachable-target error
  skippable = config.sites.with_rule("skippable")
  unit = math.gcd(*(macs[p] for p in skippable))
  capacity = max(0, int(math.floor(budget / unit + 1e-9)))
  items = [(l, p) for l in range(config.n_layers) for p in skippable]
  costs = [macs[p] // unit for _, p in items]
  values = [float(sensitivity.errors[l, config.sites.index(p)]) for l, p in items]
  return tuple(sorted(items[i] for i in knapsack(costs, values, capacity)))


def knapsack(costs: Sequence[int], values: Sequence[float], capacity: int) -> list[int]:
  """Exact 0/1 knapsack by dynamic programming: indices of the items of largest total value
  whose integer costs sum to at most ``capacity`` (O(items x capacity))."""
  capacity = max(0, int(capacity))
  best = np.zeros(capacity + 1)
  take = np.zeros((len(costs), capacity + 1), bool)
  for i, (cost, value) in enumerate(zip(costs, values, strict=True)):
    if cost > capacity:
      continue
    candidate = best[: capacity + 1 - cost] + value
    better = candidate > best[cost:] + 1e-15
    take[i, cost:] = better
    best[cost:] = np.where(better, candidate, best[cost:])
  chosen, c = [], capacity
  for i in range(len(costs) - 1, -1, -1):
    if take[i, c]:
      chosen.append(i)
      c -= costs[i]
  return chosen[::-1]


def parse_layer_list(spec: str | Sequence[int]) -> tuple[int, ...]:
  """ "19,21,28" -> (19, 21, 28); empty string -> ()."""
  if not isinstance(spec, str):
    return tuple(int(x) for x in spec)
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  try:
    return tuple(int(p) for p in parts)
  except ValueError as e:
    raise ValueError(f"skip_layers must be comma-separated integers, got {spec!r}") from e
