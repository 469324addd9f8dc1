"""``lax.dot_general``-compatible N:M transforms for any JAX/Flax codebase.

    dense = nn.Dense(128, dot_general=amber_jax.nm_dot_general(pattern="8:16"))
    layer = nnx.Linear(64, 128, dot_general=amber_jax.nm_dot_general(pattern="2:4",
                                                                     score="weight"), rngs=rngs)

The activation (lhs) operand is sparsified along its contracting axis, keeping N
of every M consecutive entries by score (or of every M consecutive entries of a given channel
order: ``channel_order``, see ``amber_jax.plan.channel_order``); the weight (rhs) stays dense. With
``pattern=None`` the callable is plain ``lax.dot_general`` (exactly the dense
baseline), as in AQT's ``make_dot_general(None)``.

``w8a8_dot_general`` is the W8A8 (and, with a pattern, Outstanding-sparse) version: the weight
is quantized per output channel and the activation per token on every call, the product is an
int8 dot with int32 accumulation, rescaled in float32, through the same steps as the model's
sites (``amber_jax.core.linear.site_linear``):

    layer = nnx.Linear(64, 128, dot_general=amber_jax.w8a8_dot_general(pattern="8:16"), rngs=rngs)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.core.linear import LinearSpec, site_linear
from amber_jax.core.patterns import NMPattern
from amber_jax.core.quant import quantize_weight
from amber_jax.core.scores import channel_factors, check_score
from amber_jax.core.sparsity import check_channel_order, sparsify

ORDERS = ("sparsify_first", "quantize_first")


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
      of an output projection, ``amber_jax.plan.channel_order``).

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


def _single_contraction(dimension_numbers, lhs, rhs, op: str) -> tuple[int, int]:
  """(lhs axis, rhs axis) of a dot_general with one contracting axis per operand and no batch
  axes (what a dense layer computes); ValueError naming the op otherwise."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if len(lhs_contract) != 1 or len(rhs_contract) != 1 or lhs_batch or rhs_batch:
    raise ValueError(
      f"{op} needs exactly one contracting axis per operand and no batch axes, got "
      f"dimension_numbers={dimension_numbers}"
    )
  return lhs_contract[0] % lhs.ndim, rhs_contract[0] % rhs.ndim


@dataclasses.dataclass(frozen=True)
class W8A8DotGeneral:
  """A frozen dot_general computing W8A8 (with an N:M pattern: Outstanding-sparse) on the fly."""

  pattern: NMPattern | None
  order: str = "sparsify_first"
  score: str = "naive"
  robust_clip: bool = True

  def __call__(
    self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
  ):
    del precision, kwargs  # the product is an int8 dot: there is no float precision to choose
    axis, rhs_axis = _single_contraction(dimension_numbers, lhs, rhs, "w8a8_dot_general")
    x = jnp.moveaxis(lhs, axis, -1)
    w_kxo = jnp.moveaxis(rhs, rhs_axis, 0)
    out_shape = w_kxo.shape[1:]
    w = w_kxo.reshape(w_kxo.shape[0], -1).astype(jnp.float32)
    w_q, w_scale = quantize_weight(w)
    ones = jnp.ones((w.shape[0],), jnp.float32)
    quant = {
      "w_q": w_q,
      "w_scale": w_scale,
      "act_div": ones,  # no smoothing: a layer's weight is all this callable sees
      "fold": ones,
      "act_scale": jnp.float32(1.0),  # unused: per-token scales
      "in_float": jnp.asarray(False),
    }
    row = {"quant": quant}
    if self.pattern is not None:
      factors = ones
      if self.score != "naive":
        factors = jax.lax.stop_gradient(
          channel_factors(w, self.score, robust_clip=self.robust_clip)
        )
      row.update(enabled=jnp.asarray(True), factors=factors)
    spec = LinearSpec(pattern=self.pattern, order=self.order)
    y = site_linear(x, {"w": w}, row, spec).reshape(*x.shape[:-1], *out_shape)
    return y if preferred_element_type is None else y.astype(preferred_element_type)


def w8a8_dot_general(
  pattern: NMPattern | str | None = None,
  *,
  order: str = "sparsify_first",
  score: str = "naive",
  robust_clip: bool = True,
) -> W8A8DotGeneral:
  """A ``lax.dot_general`` replacement computing W8A8 (symmetric int8 weights per output
  channel, int8 activations per token, int32 accumulation, float32 rescale), and with
  ``pattern`` the N:M transform of the activation before quantizing ("sparsify_first", the
  paper's Outstanding-sparse order) or on the int8 codes ("quantize_first").

  The weight is quantized on every call (no state, the param stays float: what AQT calls
  dynamic quantization); a model served in int8 stores ``quantize_weight``'s codes instead, as
  ``amber_jax.plan.quant_state`` does for our model. No smoothing: it needs calibration statistics.

  Raises:
    ValueError: a bad pattern, order or score; at call time, dimension numbers with batch axes
      or more than one contracting axis.
  """
  check_score(score)
  if order not in ORDERS:
    raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
  pattern = None if pattern is None else NMPattern.parse(pattern)
  return W8A8DotGeneral(pattern=pattern, order=order, score=score, robust_clip=robust_clip)
