"""Weight masks: N:M along the input axis per output channel, or unstructured per output channel.

A linear's weight is ``[d_in, d_out]`` (``x @ w``). Weight N:M sparsity, as Wanda, SparseGPT
and sparse tensor cores define it, keeps N of every M consecutive *input* weights of each
output channel (each column here); unstructured pruning at sparsity s removes the
``int(d_in * s)`` lowest-scored weights of each output channel (Wanda's per-output comparison
group). Both keep ties deterministically (the lower index wins, as a stable sort).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import nm_mask


def check_sparsity(sparsity: float, *, name: str = "sparsity") -> float:
  """``sparsity`` as a float in (0, 1); ValueError naming ``name`` otherwise."""
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
    raise ValueError(f"{name} must be a number in (0, 1), got {sparsity!r}")
  if not 0.0 < float(sparsity) < 1.0:
    raise ValueError(f"{name} must be in (0, 1) (the share of entries set to zero), got {sparsity}")
  return float(sparsity)


def check_pattern_or_sparsity(pattern, sparsity) -> tuple[NMPattern | None, float | None]:
  """Exactly one of an N:M ``pattern`` and an unstructured ``sparsity``, parsed and checked."""
  if (pattern is None) == (sparsity is None):
    raise ValueError(
      f"give exactly one of pattern (N:M) and sparsity (unstructured), got pattern={pattern!r}, "
      f"sparsity={sparsity!r}"
    )
  if pattern is not None:
    return NMPattern.parse(pattern), None
  return None, check_sparsity(sparsity)


def nm_weight_mask(score_IxO: jax.Array, pattern: NMPattern) -> jax.Array:
  """bool [d_in, d_out]: per output channel, the N largest scores of every M consecutive
  inputs. ValueError (naming d_in) unless M divides d_in."""
  pattern.check_width(score_IxO.shape[0], where="weight input (d_in)")
  return nm_mask(score_IxO.T, pattern, method="topk").T


def unstructured_weight_mask(score_IxO: jax.Array, sparsity: float) -> jax.Array:
  """bool [d_in, d_out]: per output channel, all but the ``int(d_in * sparsity)`` lowest scores
  (a stable sort: among equal scores the lower input index is pruned first)."""
  d_in = score_IxO.shape[0]
  k = int(d_in * sparsity)
  order = jnp.argsort(score_IxO, axis=0, stable=True)  # ascending per column
  ranks = jnp.argsort(order, axis=0, stable=True)
  return ranks >= k


def weight_mask(score_IxO: jax.Array, pattern: NMPattern | None, sparsity: float | None):
  """``nm_weight_mask`` with a pattern, else ``unstructured_weight_mask``."""
  if pattern is not None:
    return nm_weight_mask(score_IxO, pattern)
  return unstructured_weight_mask(score_IxO, sparsity)


def expert_weight_mask(score_ExIxO, pattern, sparsity):
  """``weight_mask`` of each expert of an expert site's scores [E, d_in, d_out]."""
  return jax.vmap(lambda s: weight_mask(s, pattern, sparsity))(score_ExIxO)
