"""``lax.dot_general``-compatible N:M transforms for any JAX/Flax codebase.

    dense = nn.Dense(128, dot_general=amber_jax.nm_dot_general(pattern="8:16"))
    layer = nnx.Linear(64, 128, dot_general=amber_jax.nm_dot_general(pattern="2:4",
                                                                     score="weight"), rngs=rngs)

The activation (lhs) operand is sparsified along its contracting axis, keeping N
of every M consecutive entries by score; the weight (rhs) stays dense. With
``pattern=None`` the callable is plain ``lax.dot_general`` (exactly the dense
baseline), as in AQT's ``make_dot_general(None)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amber_jax.patterns import NMPattern
from amber_jax.scores import channel_factors, check_score
from amber_jax.sparsity import sparsify


@dataclasses.dataclass(frozen=True)
class NMDotGeneral:
  """A frozen (hashable, compared by value) dot_general that sparsifies its lhs."""

  pattern: NMPattern
  score: str = "naive"
  robust_clip: bool = True

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
    x = sparsify(x, self.pattern, factors)
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
  pattern: NMPattern | str | None = "8:16", score: str = "naive", *, robust_clip: bool = True
):
  """A ``lax.dot_general`` replacement applying N:M sparsity to the activation operand.

  Args:
    pattern: "N:M", an NMPattern, or None (returns ``jax.lax.dot_general`` itself).
    score: "naive" (|x|), "weight" (|x| * column norms of the weight) or "robust"
      (the same on the standardised weight).
    robust_clip: for "robust", clip the weight to its 0.5/99.5 percentile range.
  """
  check_score(score)
  if pattern is None:
    return jax.lax.dot_general
  return NMDotGeneral(pattern=NMPattern.parse(pattern), score=score, robust_clip=robust_clip)
