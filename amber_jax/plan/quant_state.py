"""W8A8 (and Outstanding-sparse) as plan data: smoothed int8 weights, scales, float sites.

Smoothing divides a site's input by s (per input channel) and multiplies the weight's
input rows by s, so dense outputs are unchanged. Sites that read the same activation share
one s (from the group's largest weight rows); where that activation is a norm's output
(``Site.folds_into``: q/k/v on the attention norm, gate/up on the MLP norm for Llama) the
division is folded exactly into that norm's weight; other sites (o and down) divide their
input at the injection point.

Per site, stacked over layers:

* ``w_q`` int8 [L, d_in, d_out] and ``w_scale`` float32 [L, d_out] (symmetric per output
  channel) of the smoothed weight;
* ``act_div`` [L, d_in]: what the injection point divides the input by (ones where the
  norm was folded); ``fold`` [L, d_in]: the folded s (ones for o/down), which a site kept
  in float multiplies back;
* ``act_scale`` [L]: the static per-tensor activation scale (used with act_mode="tensor");
* ``in_float`` bool [L]: the site keeps its float weight;
* ``act_absmax`` [L, d_in]: the calibration statistic (max |input| per channel) the rest
  was derived from, kept so a plan can be re-derived (another alpha) without recalibrating.

``norms`` holds the folded RMSNorm weights. Static: ``act_mode`` ("token" dynamic
per-token scales, or "tensor" static) and ``order`` ("sparsify_first": sparsify, then
quantize the sparse row; "quantize_first": quantize, then sparsify the int8 values).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import struct

from amber_jax.core.quant import quantize_weight, smoothing_factors, weight_input_absmax
from amber_jax.core.sites import Architecture

SMOOTHING = ("none", "smoothquant", "outstanding")
ACT_MODES = ("token", "tensor")
ORDERS = ("sparsify_first", "quantize_first")
DEFAULT_ALPHA = {"none": 0.5, "smoothquant": 0.5, "outstanding": 0.10}


@struct.dataclass
class QuantState:
  """The W8A8 part of a plan: int8 weights, scales and smoothing per site, folded norms, and
  the activation mode and order (static). Built by ``build_quant_state``."""

  sites: dict  # site -> the arrays of amber_jax.plan.schema.GROUP_KEYS["quant"]
  norms: dict  # "attn_norm"/"mlp_norm" -> [L, D] folded norm weights
  act_mode: str = struct.field(pytree_node=False, default="token")
  order: str = struct.field(pytree_node=False, default="sparsify_first")


def check_quant_options(smooth: str, alpha: float, act_mode: str, order: str) -> None:
  """ValueError naming the option unless the W8A8 options are valid: ``smooth`` in
  ``SMOOTHING``, ``alpha`` in [0, 1], ``act_mode`` in ``ACT_MODES``, ``order`` in ``ORDERS``."""
  if smooth not in SMOOTHING:
    raise ValueError(f"smooth must be one of {', '.join(SMOOTHING)}, got {smooth!r}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if act_mode not in ACT_MODES:
    raise ValueError(f"act_mode must be one of {', '.join(ACT_MODES)}, got {act_mode!r}")
  if order not in ORDERS:
    raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def check_float_sites(
  float_sites: Iterable[tuple[int, str]], config: Architecture | None = None
) -> tuple[tuple[int, str], ...]:
  """``float_sites`` as a tuple if every entry is a (layer, site name) pair (with, given
  ``config``, a declared site and a layer of that model); else ValueError naming the entry and
  what is valid. Callable before the model loads (without ``config``: the names are checked
  when it has loaded)."""
  sites = tuple(float_sites)
  names = None if config is None else config.sites.names
  for site in sites:
    layer, proj = site if isinstance(site, tuple) and len(site) == 2 else (None, None)
    if (
      not isinstance(proj, str)
      or (names is not None and proj not in names)
      or isinstance(layer, bool)
      or not isinstance(layer, (int, np.integer))
    ):
      valid = "a site name" if names is None else f"one of {', '.join(names)}"
      raise ValueError(
        f"float_sites entry {site!r} is not a (layer, projection) pair: the projection must be "
        f"{valid}"
      )
    if layer < 0 or (config is not None and layer >= config.n_layers):
      valid = "layer >= 0" if config is None else f"layers 0..{config.n_layers - 1}"
      raise ValueError(f"float_sites entry {proj}:{layer} is out of range: valid {valid}")
  return sites


def _matrices_input_absmax(w: np.ndarray) -> np.ndarray:
  """max |w| per input channel [d_in] of a weight [d_in, d_out], or over every expert of an
  expert weight [E, d_in, d_out]."""
  return np.max([np.asarray(weight_input_absmax(m)) for m in w.reshape(-1, *w.shape[-2:])], axis=0)


def build_quant_state(
  params,
  config: Architecture,
  input_absmax: dict[str, np.ndarray],
  *,
  smooth: str = "smoothquant",
  alpha: float | None = None,
  act_mode: str = "token",
  order: str = "sparsify_first",
  float_sites: Iterable[tuple[int, str]] = (),
) -> tuple[QuantState, dict[str, np.ndarray]]:
  """The W8A8 plan part, and the smoothed float weights (proj -> [L, d_in, d_out]) from which
  score factors of the sparse part should be computed (the scores see smoothed activations)."""
  alpha = DEFAULT_ALPHA.get(smooth, 0.5) if alpha is None else alpha
  check_quant_options(smooth, alpha, act_mode, order)
  n_layers = config.n_layers
  float_set = set(check_float_sites(float_sites, config))
  names = config.sites.names
  w = {p: np.asarray(params["layers"][p]["w"], np.float32) for p in names}
  # An expert site's weight is [L, E, d_in, d_out]: its experts read the same activation (gate,
  # up) or share one smoothing per layer (down), so the smoothing is per layer, [L, d_in], from
  # the largest |w| over every expert; its int8 codes and scales are per expert.
  s = {}
  for group in config.sites.groups_by_input().values():
    w_absmax = np.stack(
      [np.max([_matrices_input_absmax(w[p][l]) for p in group], axis=0) for l in range(n_layers)]
    )
    x_absmax = np.max([input_absmax[p] for p in group], axis=0)
    group_s = np.stack(
      [
        np.asarray(smoothing_factors(x_absmax[l], w_absmax[l], alpha=alpha, kind=smooth))
        for l in range(n_layers)
      ]
    ).astype(np.float32)
    for p in group:
      s[p] = group_s
  folded = {site.name for site in config.sites if site.folds_into is not None}
  sites, smoothed = {}, {}
  for site in config.sites:
    p = site.name
    lead = (n_layers, site.experts) if site.experts else (n_layers,)
    s_in = s[p][:, None, :] if site.experts else s[p]  # [L, (1,) d_in]
    smoothed[p] = w[p] * s_in[..., None]
    mats = smoothed[p].reshape(-1, *site.shape)
    q_and_scale = [quantize_weight(m) for m in mats]

    def per_site(a, lead=lead, experts=site.experts):  # [L, d_in] as the site's [L, (E,) d_in]
      return np.broadcast_to(a[:, None], (*lead, a.shape[-1])) if experts else a

    ones = np.ones_like(s[p])
    act_div = ones if p in folded else s[p]
    # Static per-tensor scale: the largest smoothed input value / 127.
    act_scale = np.max(input_absmax[p] / s[p], axis=1) / 127.0
    if site.experts:
      act_scale = np.repeat(act_scale[:, None], site.experts, axis=1)
    in_float = np.asarray([(l, p) in float_set for l in range(n_layers)])
    sites[p] = {
      "w_q": jnp.asarray(
        np.stack([np.asarray(q) for q, _ in q_and_scale]).reshape(*lead, *site.shape), jnp.int8
      ),
      "w_scale": jnp.asarray(
        np.stack([np.asarray(sc) for _, sc in q_and_scale]).reshape(*lead, site.d_out),
        jnp.float32,
      ),
      "act_div": jnp.asarray(per_site(act_div)),
      "fold": jnp.asarray(per_site(s[p] if p in folded else ones)),
      "act_scale": jnp.asarray(np.maximum(act_scale, 1e-8), jnp.float32),
      "in_float": jnp.asarray(
        np.repeat(in_float[:, None], site.experts, axis=1) if site.experts else in_float
      ),
      "act_absmax": jnp.asarray(per_site(input_absmax[p]), jnp.float32),
    }
  norms = {
    site.folds_into: jnp.asarray(
      np.asarray(params["layers"][site.folds_into], np.float32) / s[site.name]
    )
    for site in config.sites
    if site.folds_into is not None
  }
  return QuantState(sites=sites, norms=norms, act_mode=act_mode, order=order), smoothed


def smoothed_score_factors(
  smoothed: dict[str, np.ndarray], score: str, *, robust_clip: bool = True
) -> dict[str, jnp.ndarray]:
  """Score factors (proj -> [L, d_in]) from the smoothed weights of ``build_quant_state``:
  with W8A8 the N:M scores see smoothed activations, so their factors must too (the
  weight-aware score is invariant to smoothing; the robust one is not)."""
  from amber_jax.core.scores import model_factors

  layers = {"layers": {p: {"w": w} for p, w in smoothed.items()}}
  return {
    p: jnp.asarray(f) for p, f in model_factors(layers, score, robust_clip=robust_clip).items()
  }
