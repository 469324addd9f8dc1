"""``lax.dot_general``-compatible N:M transforms for any JAX/Flax codebase.

    dense = nn.Dense(128, dot_general=amber_jax.nm_dot_general(pattern="8:16"))
    layer = nnx.Linear(64, 128, dot_general=amber_jax.nm_dot_general(pattern="2:4",
                                                                     score="weight"), rngs=rngs)

The activation (lhs) operand is sparsified along its contracting axis, keeping N
of every M consecutive entries by score (or of every M consecutive entries of a given channel
order: ``channel_order``, see ``amber_jax.channel_order``); the weight (rhs) stays dense. With
``pattern=None`` the callable is plain ``lax.dot_general`` (exactly the dense
baseline), as in AQT's ``make_dot_general(None)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.patterns import NMPattern
from amber_jax.scores import channel_factors, check_score
from amber_jax.sparsity import check_channel_order, sparsify


@dataclasses.dataclass(frozen=True)
class NMDotGeneral:
  """A frozen (hashable, compared by value) dot_general that sparsifies its lhs."""

  pattern: NMPattern
  score: str = "naive"
  robust_clip: bool = True
  channel_order: tuple[int, ...] | None = None  # a tuple, so the callable stays hashable

  def __call__(
    self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
  ):
    (lhs_contract, rhs_contract), _ = dimension_numbers
    if len(lhs_contract) != 1 or len(rhs_contract) != 1:
      raise ValueError(
        "nm_dot_general needs exactly one contracting axis per operand, got "
        f"dimension_numbers={dimension_numbers}"
      )
    axis = lhs_contract[0] % lhs.ndim
    factors = None
    if self.score != "naive":
      # Computed from the weight on every call (cheap next to the matmul and fused
      # by XLA), so the callable holds no state and the weight is never changed.
      other = tuple(d for d in range(rhs.ndim) if d != rhs_contract[0] % rhs.ndim)
      rhs_ixo = jnp.transpose(rhs, (rhs_contract[0] % rhs.ndim, *other))
      factors = jax.lax.stop_gradient(
        channel_factors(rhs_ixo, self.score, robust_clip=self.robust_clip)
      )
    x = jnp.moveaxis(lhs, axis, -1)
    order = None if self.channel_order is None else jnp.asarray(self.channel_order, jnp.int32)
    x = sparsify(x, self.pattern, factors, channel_order=order)
    lhs = jnp.moveaxis(x, -1, axis)
    return jax.lax.dot_general(
      lhs,
      rhs,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
      **kwargs,
    )


def nm_dot_general(
  pattern: NMPattern | str | None = "8:16",
  score: str = "naive",
  *,
  robust_clip: bool = True,
  channel_order: Sequence[int] | np.ndarray | None = None,
):
  """A ``lax.dot_general`` replacement applying N:M sparsity to the activation operand.

  Args:
    pattern: "N:M", an NMPattern, or None (returns ``jax.lax.dot_general`` itself).
    score: "naive" (|x|), "weight" (|x| * column norms of the weight) or "robust"
      (the same on the standardised weight).
    robust_clip: for "robust", clip the weight to its 0.5/99.5 percentile range.
    channel_order: optional permutation of the contracting axis: the groups of M are formed
      over the activation's channels in this order (e.g. mixing attention heads in the input
      of an output projection, ``amber_jax.channel_order``).

  Raises:
    ValueError: a bad score, pattern or channel order (not a permutation of 0..K-1).
  """
  check_score(score)
  if pattern is None:
    return jax.lax.dot_general
  order = None
  if channel_order is not None:
    check_channel_order(channel_order, len(channel_order))
    order = tuple(int(c) for c in np.asarray(channel_order))
  return NMDotGeneral(
    pattern=NMPattern.parse(pattern), score=score, robust_clip=robust_clip, channel_order=order
  )
