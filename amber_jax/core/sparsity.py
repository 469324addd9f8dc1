"""N:M activation sparsification: scores, masks and the ``sparsify`` transform.

The mask is chosen per token and per group of M consecutive entries along the
last (input-channel, i.e. contraction) axis: the N entries with the largest
score survive, the others are zeroed. Ties are broken by position (the lower
index wins), so exactly N entries survive in every group, always. With a ``channel_order``
the groups are M consecutive entries of the permuted channels instead
(``amber_jax.plan.channel_order`` says why the o-projection wants one).

NaN and inf: a NaN score counts as larger than every finite score, so a NaN
activation is kept and propagates into the matmul exactly as in the dense
computation (sparsity never hides a NaN); +inf scores (from inf activations)
are kept likewise. Among several NaN/inf entries the lower index wins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.core.patterns import NMPattern

# The default mask algorithm ("auto") is the sorting network up to this M, lax.top_k above
# (the network's comparator count grows as M log^2 M). Measured (BENCHMARKS.md): at 8:16 the
# sorting network costs 1.24-1.52x a dense bf16 dot on an H200 where the pairwise ranks cost
# 17-24x and top_k 4-6x, and it also beats pairwise ranks on CPU (model prefill 1.4-1.6x of
# dense instead of 1.8-2.3x).
_SORTNET_MAX_M = 128


def nm_scores(x: jax.Array, factors: jax.Array | None = None) -> jax.Array:
  """Selection score: |x|, or |x| * factors (factors ``[d]`` broadcast over the leading axes,
  or per row: ``x``'s shape, as an expert site's rows each take their expert's factors).

  Computed in float32 (bf16 inputs are upcast exactly); NaN scores map to +inf, so a NaN
  activation, and an inf one under a zero factor (inf * 0 is NaN), are kept as the module
  docstring promises. Factors are finite and >= 0 (``make_plan`` checks): a negative factor
  would invert the preference, infinities included.
  """
  score = jnp.abs(x.astype(jnp.float32))
  if factors is not None:
    f = factors.astype(jnp.float32)
    score = score * (f.reshape((1,) * (score.ndim - 1) + (-1,)) if f.ndim == 1 else f)
  return jnp.where(jnp.isnan(score), jnp.inf, score)


def _keep_mask_pairwise(score_GxM: jax.Array, n: int) -> jax.Array:
  m = score_GxM.shape[-1]
  s_i = score_GxM[..., :, None]  # candidate
  s_j = score_GxM[..., None, :]  # competitor
  idx = jnp.arange(m)
  # [..., i, j]: j precedes i (leading unit axes: rank promotion may be set to raise).
  lower_index = (idx[None, :] < idx[:, None]).reshape((1,) * (s_i.ndim - 2) + (m, m))
  beats = (s_j > s_i) | ((s_j == s_i) & lower_index)
  rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)
  return rank < n


def _keep_mask_topk(score_GxM: jax.Array, n: int) -> jax.Array:
  # lax.top_k is stable: among equal values, the lower index comes first.
  _, idx = jax.lax.top_k(score_GxM, n)
  m = score_GxM.shape[-1]
  return jnp.any(idx[..., :, None] == jnp.arange(m).reshape((1,) * idx.ndim + (m,)), axis=-2)


def batcher_pairs(n: int) -> list[tuple[int, int]]:
  """Comparators of Batcher's odd-even merge sort for n a power of two."""
  pairs = []
  p = 1
  while p < n:
    k = p
    while k >= 1:
      for j in range(k % p, n - k, 2 * k):
        for i in range(min(k, n - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            pairs.append((i + j, i + j + k))
      k //= 2
    p *= 2
  return pairs


def selection_comparators(m: int, n: int) -> list[tuple[int, int]]:
  """Comparators of Batcher's sorting network for ``m`` (a power of 2) wires, descending,
  pruned to those that can reach output ``n - 1`` (the N-th largest): 53 of 63 at 8:16."""
  needed, kept = {n - 1}, []
  for a, b in reversed(batcher_pairs(m)):
    if a in needed or b in needed:
      needed |= {a, b}
      kept.append((a, b))
  return kept[::-1]


def _keep_mask_sortnet(score_GxM: jax.Array, n: int) -> jax.Array:
  # The N-th largest score of each group by a sorting network (min/max on the group's
  # columns), then: keep scores above it, and of those equal to it the lowest-index ones
  # until N are kept. Exact, and only ~M log^2 M min/max per group.
  m = score_GxM.shape[-1]
  width = 1 << (m - 1).bit_length()
  cols = [score_GxM[..., j] for j in range(m)]
  # Padding below every score (scores are >= 0 with valid factors; -inf is below any).
  cols += [jnp.full_like(cols[0], -jnp.inf)] * (width - m)
  for a, b in selection_comparators(width, n):
    cols[a], cols[b] = jnp.maximum(cols[a], cols[b]), jnp.minimum(cols[a], cols[b])
  threshold = cols[n - 1][..., None]
  above = score_GxM > threshold
  equal = score_GxM == threshold
  n_above = jnp.sum(above, axis=-1, dtype=jnp.int32, keepdims=True)
  equal_before = jnp.cumsum(equal, axis=-1, dtype=jnp.int32) - equal
  return above | (equal & (equal_before < n - n_above))


MASK_METHODS = ("pairwise", "topk", "sortnet")


def nm_mask(score: jax.Array, pattern: NMPattern, *, method: str = "auto") -> jax.Array:
  """Boolean keep-mask, same shape as ``score``: top-N per group of M on the last axis.

  ``method`` picks the algorithm (all exact, same result): "pairwise" ranks by all-pairs
  comparison in the group, "topk" uses lax.top_k, "sortnet" finds the N-th largest score
  with a sorting network; "auto" is the sorting network up to M = 128, top_k above.
  """
  # NaN counts as the largest score (as in nm_scores): without this the three methods would
  # disagree on NaN, and the sorting network's comparisons would keep fewer than N.
  return _mask_of_scores(jnp.where(jnp.isnan(score), jnp.inf, score), pattern, method)


def _mask_of_scores(score: jax.Array, pattern: NMPattern, method: str) -> jax.Array:
  """``nm_mask`` of scores without NaN (``nm_scores`` already mapped them)."""
  *lead, width = score.shape
  pattern.check_width(width, where="last-axis")
  score_GxM = score.reshape(*lead, width // pattern.m, pattern.m)
  if method == "auto":
    method = "sortnet" if pattern.m <= _SORTNET_MAX_M else "topk"
  if method == "pairwise":
    keep = _keep_mask_pairwise(score_GxM, pattern.n)
  elif method == "topk":
    keep = _keep_mask_topk(score_GxM, pattern.n)
  elif method == "sortnet":
    keep = _keep_mask_sortnet(score_GxM, pattern.n)
  else:
    raise ValueError(f"method must be 'auto' or one of {MASK_METHODS}, got {method!r}")
  return keep.reshape(score.shape)


def nm_keep(
  x: jax.Array,
  pattern: NMPattern,
  factors: jax.Array | None = None,
  *,
  channel_order: jax.Array | None = None,
  method: str = "auto",
) -> jax.Array:
  """The boolean keep mask of ``sparsify`` (same arguments), in ``x``'s channel order.

  With ``channel_order`` (a permutation of ``range(x.shape[-1])``) the groups are M consecutive
  entries of ``x[..., channel_order]``: group g holds channels ``channel_order[g*M:(g+1)*M]``.
  """
  score = nm_scores(x, factors)  # no NaN left: the mask needs no second mapping
  if channel_order is None:
    return _mask_of_scores(score, pattern, method)
  keep_ordered = _mask_of_scores(jnp.take(score, channel_order, axis=-1), pattern, method)
  return jnp.take(keep_ordered, jnp.argsort(channel_order), axis=-1)


def check_channel_order(channel_order, width: int, *, where: str = "channel_order") -> None:
  """ValueError naming ``where`` unless ``channel_order`` is a permutation of range(width).

  Needs a concrete array (call it on plans and inputs, not inside jit)."""
  order = np.asarray(channel_order)
  if order.shape != (width,) or not np.issubdtype(order.dtype, np.integer):
    raise ValueError(
      f"{where} must be an integer array of shape ({width},), got dtype {order.dtype} and "
      f"shape {order.shape}"
    )
  if not np.array_equal(np.sort(order), np.arange(width)):
    raise ValueError(f"{where} must be a permutation of 0..{width - 1} (each channel once)")


def sparsify(
  x: jax.Array,
  pattern: NMPattern | str | None,
  factors: jax.Array | None = None,
  *,
  channel_order: jax.Array | None = None,
  method: str = "auto",
) -> jax.Array:
  """Keeps the N largest-score entries of every M consecutive ones on the last axis.

  Args:
    x: activations, any leading shape; the last axis is the input-channel axis.
    pattern: an NMPattern or "N:M"; None returns ``x`` unchanged (dense).
    factors: optional per-channel score factors, shape ``[x.shape[-1]]`` or ``x.shape`` (one
      vector per row) (score = |x| * factors, e.g. the weight-aware score of Amber Pruner).
    channel_order: optional permutation of the channels, shape ``[x.shape[-1]]``: the groups
      of M are formed over ``x[..., channel_order]`` instead of ``x`` (see ``nm_keep``). The
      result stays in ``x``'s order. Not checked to be a permutation here (it may be traced):
      ``check_channel_order`` does that where plans are built.
    method: the mask algorithm (see ``nm_mask``); every method gives the same result.

  Returns:
    An array of the same shape and dtype; kept values are bit-identical to ``x``.
  """
  if pattern is None:
    return x
  pattern = NMPattern.parse(pattern)
  if x.ndim < 1:
    raise ValueError(f"sparsify needs at least 1 axis, got x.shape={x.shape}")
  if factors is not None and factors.shape not in ((x.shape[-1],), x.shape):
    raise ValueError(
      f"factors must have shape ({x.shape[-1]},) to match x's last axis, or x's shape "
      f"{x.shape} (per row), got factors.shape={factors.shape}"
    )
  if channel_order is not None and channel_order.shape != (x.shape[-1],):
    raise ValueError(
      f"channel_order must have shape ({x.shape[-1]},) to match x's last axis, "
      f"got channel_order.shape={channel_order.shape}"
    )
  keep = nm_keep(x, pattern, factors, channel_order=channel_order, method=method)
  return jnp.where(keep, x, jnp.zeros((), x.dtype))
