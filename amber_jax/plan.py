"""The sparsity plan: per-site choices as data (a pytree next to params).

A site is one linear projection of one layer (``q, k, v, o, gate, up, down``).
For every projection the plan holds, stacked over layers:

* ``enabled[proj]``: bool ``[L]``, whether that site's input is sparsified in prefill;
* ``factors[proj]``: float32 ``[L, d_in]``, the per-input-channel score factors
  (all ones for the naive |x| score).

and optionally ``quant``, the W8A8 part (``amber_jax.quant_plan.QuantState``: smoothed
int8 weights, scales, folded norms, float sites), and ``correction``, per-site output
corrections of the sparse sites calibrated by ``amber_jax.corrections`` (arrays stacked over
layers; None: no correction, the plain N:M transform), and ``channel_order``, per projection
a permutation of its input channels per layer that forms the N:M groups
(``amber_jax.channel_order``; None, or a projection left out: M consecutive channels).

Only the N:M pattern (and the implementation choices) are static: they fix shapes and
code inside the mask computation; changing which sites are enabled or the factors
re-uses the compiled function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from amber_jax.impl import check_impl, default_impl
from amber_jax.model.config import PROJECTIONS, LlamaConfig
from amber_jax.patterns import NMPattern
from amber_jax.sparsity import MASK_METHODS, check_channel_order


@struct.dataclass
class SparsityPlan:
  """Which linear inputs are sparsified in prefill, and with which score factors."""

  enabled: dict[str, jax.Array]  # proj -> bool [L]
  factors: dict[str, jax.Array]  # proj -> float32 [L, d_in]
  pattern: NMPattern | None = struct.field(pytree_node=False, default=None)
  impl: str = struct.field(pytree_node=False, default="xla")  # see amber_jax.impl
  # impl="xla": the mask algorithm (amber_jax.sparsity.nm_mask); all give the same mask.
  mask_method: str = struct.field(pytree_node=False, default="auto")
  # W8A8 part (amber_jax.quant_plan.QuantState) or None for float weights.
  quant: Any = None
  # Output corrections of sparse sites in prefill (amber_jax.corrections: proj -> center,
  # in_scale, token_rescale, out_scale, out_bias stacked over layers) or None for none.
  correction: Any = None
  # proj -> int32 [L, d_in]: the groups of M are consecutive in x[..., order[l]] (see
  # amber_jax.sparsity.nm_keep); projections not in the dict (or None) use the natural order.
  channel_order: dict[str, jax.Array] | None = None

  def enabled_sites(self) -> list[tuple[int, str]]:
    """(layer, projection) pairs that are sparsified, in layer-major order."""
    flags = {p: np.asarray(v) for p, v in self.enabled.items()}
    n_layers = len(next(iter(flags.values())))
    return [(l, p) for l in range(n_layers) for p in PROJECTIONS if flags[p][l]]


def dense_plan(config: LlamaConfig) -> SparsityPlan:
  """A plan that sparsifies nothing (pattern None): exactly the dense model."""
  return make_plan(config, None, sites=())


def make_plan(
  config: LlamaConfig,
  pattern: NMPattern | str | None,
  *,
  sites: Iterable[tuple[int, str]] | str = "all",
  factors: Mapping[str, np.ndarray] | None = None,
  impl: str | None = None,
  mask_method: str = "auto",
  channel_order: Mapping[str, np.ndarray] | None = None,
) -> SparsityPlan:
  """Builds a plan.

  Args:
    config: the model configuration (gives L and each projection's input width).
    pattern: N:M pattern, "N:M", or None for dense.
    sites: "all" (every projection of every layer) or an iterable of
      (layer, projection) pairs to sparsify.
    factors: optional proj -> [L, d_in] score factors (default: ones, the |x| score).
    impl: "xla", "pallas" (the fused kernel) or "pallas_mask" (mask pass + dot); None picks
      the backend's default (xla everywhere for now: see amber_jax.impl). An impl that
      cannot run raises ValueError.
    mask_method: the mask algorithm of impl "xla" (amber_jax.sparsity.nm_mask).
    channel_order: optional proj -> [L, d_in] permutations of each layer's input channels
      that form the N:M groups (amber_jax.channel_order.model_channel_order makes them).

  Raises:
    ValueError: naming the projection, if M does not divide a sparsified input
      width, if a site is out of range, or if a channel order is not a permutation.
  """
  pattern = None if pattern is None else NMPattern.parse(pattern)
  impl = check_impl(default_impl() if impl is None else impl, pattern)
  if mask_method not in ("auto", *MASK_METHODS):
    raise ValueError(f"mask_method must be 'auto' or one of {MASK_METHODS}, got {mask_method!r}")
  n_layers = config.n_layers
  shapes = config.linear_shapes()
  enabled = {p: np.zeros((n_layers,), bool) for p in PROJECTIONS}
  if pattern is not None:
    if isinstance(sites, str):
      if sites != "all":
        raise ValueError(f"sites must be 'all' or (layer, projection) pairs, got {sites!r}")
      sites = [(l, p) for l in range(n_layers) for p in PROJECTIONS]
    for layer, proj in sites:
      if proj not in PROJECTIONS:
        raise ValueError(f"unknown projection {proj!r}; valid: {', '.join(PROJECTIONS)}")
      if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
      enabled[proj][layer] = True
    for proj in PROJECTIONS:
      if enabled[proj].any():
        pattern.check_width(shapes[proj][0], where=f"{proj}-projection input")
  unknown = sorted(set(factors or {}) - set(PROJECTIONS))
  if unknown:
    raise ValueError(f"factors has unknown projections {unknown}; valid: {', '.join(PROJECTIONS)}")
  out_factors = {}
  for proj in PROJECTIONS:
    d_in = shapes[proj][0]
    f = np.ones((n_layers, d_in), np.float32)
    if factors is not None and proj in factors:
      f = np.asarray(factors[proj], np.float32)
      if f.shape != (n_layers, d_in):
        raise ValueError(f"factors[{proj!r}] must have shape {(n_layers, d_in)}, got {f.shape}")
      if not (np.isfinite(f).all() and (f >= 0).all()):
        raise ValueError(
          f"factors[{proj!r}] must be finite and >= 0 (score = |x| * factor), got "
          f"{int((f < 0).sum())} negative and {int((~np.isfinite(f)).sum())} non-finite entries"
        )
    out_factors[proj] = jnp.asarray(f)
  return SparsityPlan(
    enabled={p: jnp.asarray(v) for p, v in enabled.items()},
    factors=out_factors,
    pattern=pattern,
    impl=impl,
    mask_method=mask_method,
    channel_order=check_plan_channel_order(config, channel_order),
  )


def check_plan_channel_order(
  config: LlamaConfig, channel_order: Mapping[str, np.ndarray] | None
) -> dict[str, jax.Array] | None:
  """``channel_order`` as the plan stores it (int32 jax arrays; None for an empty mapping),
  after checking that every row is a permutation of its projection's input channels."""
  if not channel_order:
    return None
  shapes = config.linear_shapes()
  out = {}
  for proj, order in channel_order.items():
    if proj not in PROJECTIONS:
      raise ValueError(f"channel_order has unknown projection {proj!r}; valid: {PROJECTIONS}")
    order = np.asarray(order)
    d_in = shapes[proj][0]
    if order.shape != (config.n_layers, d_in):
      raise ValueError(
        f"channel_order[{proj!r}] must have shape {(config.n_layers, d_in)}, got {order.shape}"
      )
    for layer, row in enumerate(order):
      check_channel_order(row, d_in, where=f"channel_order[{proj!r}][{layer}]")
    out[proj] = jnp.asarray(order, jnp.int32)
  return out
