"""Amber Pruner's selection scores and their per-input-channel factors.

Every score is |x_j| * f_j with a static, per-projection factor f (computed once
from the weight, never changing it):

* ``naive``:  f_j = 1 (plain magnitude);
* ``weight``: f_j = ||W[:, j]||_2 / min_k ||W[:, k]||_2 (W is [d_out, d_in]);
* ``robust``: the same on the standardised weight W_hat = (W - mu) / sigma, where
  mu and sigma are the mean and std of the entries between the 0.5th and 99.5th
  percentiles. Entries outside that range are clipped to it first
  (``robust_clip=True``, the default) or kept as they are (the paper is
  ambiguous; both are offered).

Our weights are stored [d_in, d_out], so W[:, j] of the paper is row j here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCORES = ("naive", "weight", "robust")
ROBUST_PERCENTILES = (0.5, 99.5)
_TINY = 1e-12


def check_score(score: str) -> str:
  """``score`` unchanged if it names a score of ``SCORES``, else ValueError listing them."""
  if score not in SCORES:
    raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
  return score


def _standardise(w, *, clip: bool, xp):
  lo, hi = xp.percentile(w, ROBUST_PERCENTILES[0]), xp.percentile(w, ROBUST_PERCENTILES[1])
  inside = (w >= lo) & (w <= hi)
  count = xp.maximum(xp.sum(inside), 1)
  mean = xp.sum(xp.where(inside, w, 0)) / count
  var = xp.sum(xp.where(inside, (w - mean) ** 2, 0)) / count
  std = xp.sqrt(var) + _TINY
  if clip:
    w = xp.clip(w, lo, hi)
  return (w - mean) / std


def channel_factors(
  w_IxO, score: str, *, robust_clip: bool = True, contract_axis: int = 0
) -> jax.Array | np.ndarray:
  """Per-input-channel factors f [d_in] of one weight matrix for ``score``.

  ``w_IxO``: numpy or jax array; the input (contraction) axis is ``contract_axis``
  (0 for our [d_in, d_out] layout). Works under jit when given a jax array.
  """
  check_score(score)
  xp = np if isinstance(w_IxO, np.ndarray) else jnp
  w = w_IxO.astype(xp.float32)
  if contract_axis != 0:
    w = xp.moveaxis(w, contract_axis, 0)
  w = w.reshape(w.shape[0], -1)
  if score == "naive":
    return xp.ones((w.shape[0],), xp.float32)
  if score == "robust":
    w = _standardise(w, clip=robust_clip, xp=xp)
  norms = xp.sqrt(xp.sum(w * w, axis=1))
  return (norms / (xp.min(norms) + _TINY)).astype(xp.float32)


def model_factors(params, score: str, *, robust_clip: bool = True) -> dict[str, np.ndarray]:
  """site -> [L, d_in] factors for every site (``layers/<name>/w``) of a stacked-layer params
  tree; [L, E, d_in] for an expert site (``w`` [L, E, d_in, d_out]: each expert's own)."""
  check_score(score)
  out = {}
  for proj, weights in params["layers"].items():
    if not isinstance(weights, dict) or "w" not in weights:
      continue
    w = np.asarray(weights["w"], np.float32)
    mats = w.reshape(-1, *w.shape[-2:])  # every (layer[, expert]) matrix
    f = np.stack([channel_factors(m, score, robust_clip=robust_clip) for m in mats])
    out[proj] = f.reshape(*w.shape[:-2], w.shape[-2]).astype(np.float32)
  return out
