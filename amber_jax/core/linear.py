"""A site's linear as a chain of small pure steps: the one injection point of the library.

    x --channel order--> --score, N:M mask--> --quantize--> --matmul backend--> --correction--> y

Each step is optional and reads its data from the site's *row* (this layer's slice of the plan,
``amber_jax.plan.schema.SparsityPlan.site_rows``):

* ``enabled``, ``factors`` (and ``channel_order``): the N:M transform of the input, kept only
  where ``enabled`` (a traced bool: one compiled function serves every site choice). The
  channel order forms the groups of M over ``x[..., order]`` (``amber_jax.core.sparsity.nm_keep``);
* ``quant``: W8A8, the input divided by its smoothing, int8 codes per token (or with a static
  scale), the N:M transform before or after quantizing (``LinearSpec.order``), an int8 product
  with int32 accumulation and a float32 rescale; ``in_float`` keeps the site's float weight;
* ``correction``: the output correction of an enabled site (``amber_jax.core.correction``);
* the matmul runs on a registered backend (``amber_jax.core.backends``: ``xla``, ``pallas``,
  ``pallas_mask``): a backend with its own sparse product gets the permuted operands, one with
  its own int8 product gets the int8 codes; asking for a combination it cannot run (e.g. a
  correction on a Pallas backend) is a ValueError.

A row of None (decode, a dense plan) is the plain ``x @ w (+ b)``. The model calls only
``site_linear``; ``amber_jax.core.dot_general`` exports the same steps for other Flax code.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amber_jax.core.backends import get_backend
from amber_jax.core.correction import corrected_sparse_matmul
from amber_jax.core.patterns import NMPattern
from amber_jax.core.quant import int8_rescaled_dot, quantize_activation
from amber_jax.core.sparsity import sparsify


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSpec:
  """The static choices of a site's linear (they fix the compiled code): the N:M pattern
  (None: no N:M step), the matmul backend, the mask algorithm of the jnp mask, and the W8A8
  activation mode ("token" | "tensor") and order ("sparsify_first" | "quantize_first")."""

  pattern: NMPattern | None = None
  backend: str = "xla"
  mask_method: str = "auto"
  act_mode: str = "token"
  order: str = "sparsify_first"


def _row_vector(a: jax.Array, like: jax.Array) -> jax.Array:
  """A per-input-channel vector [d_in] broadcastable against ``like`` [..., d_in]."""
  return a.astype(like.dtype).reshape((1,) * (like.ndim - 1) + (-1,))


def nm_step(row: dict | None, spec: LinearSpec):
  """The score and N:M mask step (channel order included) as ``v -> v'``: identity without a
  pattern or an ``enabled`` entry, else ``sparsify`` where the row's ``enabled`` flag is set."""
  if row is None or spec.pattern is None or "enabled" not in row:
    return lambda v: v

  def step(v):
    return jax.lax.cond(
      row["enabled"],
      lambda v_: sparsify(
        v_,
        spec.pattern,
        row["factors"],
        channel_order=row.get("channel_order"),
        method=spec.mask_method,
      ),
      lambda v_: v_,
      v,
    )

  return step


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [..., d_in] @ w [d_in, d_out]`` in x's dtype (the dense baseline's product)."""
  return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


def _float_product(x, w, row, spec, backend):
  """The float weight's product with the N:M step, on ``backend`` (and the correction)."""
  if row is None or spec.pattern is None or "enabled" not in row:
    return dense_matmul(x, w)
  w = w.astype(x.dtype)
  correction, order = row.get("correction"), row.get("channel_order")
  dense = lambda x_: jnp.einsum("...i,io->...o", x_, w)
  if correction is not None:

    def corrected(x_):
      return corrected_sparse_matmul(
        x_,
        w,
        spec.pattern,
        row["factors"],
        correction,
        channel_order=order,
        method=spec.mask_method,
      )

    return jax.lax.cond(row["enabled"], corrected, dense, x)
  if backend.sparse_matmul is not None:

    def fused(x_):
      lead = x_.shape[:-1]
      w_, factors_ = w, row["factors"]
      if order is not None:  # the kernel's groups are consecutive: permute its operands
        x_ = jnp.take(x_, order, axis=-1)
        w_, factors_ = jnp.take(w, order, axis=0), jnp.take(factors_, order)
      y2d = backend.sparse_matmul(
        x_.reshape(-1, x_.shape[-1]), w_, pattern=spec.pattern, factors=factors_
      )
      return y2d.reshape(*lead, w.shape[1])

    return jax.lax.cond(row["enabled"], fused, dense, x)
  return dense(nm_step(row, spec)(x))


def int8_product(x_q, x_scale, w_q, w_scale, *, out_dtype, backend) -> jax.Array:
  """``x_q [..., K] int8 @ w_q [K, N] int8`` accumulated in int32, rescaled in float32 by
  ``x_scale`` (per token [..., 1] or a scalar) and ``w_scale`` [N]; on ``backend``'s int8
  kernel if it has one, else XLA's int8 dot."""
  if backend.int8_matmul is not None:
    lead, k = x_q.shape[:-1], x_q.shape[-1]
    x_scale_2d = jnp.broadcast_to(x_scale, lead + (1,)).reshape(-1, 1)
    y2d = backend.int8_matmul(
      x_q.reshape(-1, k), w_q, x_scale_2d, w_scale.reshape(1, -1), out_dtype=out_dtype
    )
    return y2d.reshape(*lead, y2d.shape[-1])
  return int8_rescaled_dot(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype)


def _w8a8_product(x, w, row, spec, backend):
  """W8A8 with the N:M step before or after quantizing (``spec.order``); a site whose
  ``in_float`` flag is set keeps its float weight and selects on the same smoothed input."""
  q = row["quant"]
  sparse = nm_step(row, spec)

  def float_path(x_):
    # Select on the smoothed activation, as the int8 path does, then undo the smoothing
    # (the folded part and the divided part) for the float weight.
    xs = sparse(x_ / _row_vector(q["act_div"], x_)) * _row_vector(q["fold"] * q["act_div"], x_)
    return dense_matmul(xs, w)

  def int8_path(x_):
    xs = x_ / _row_vector(q["act_div"], x_)
    static = q["act_scale"] if spec.act_mode == "tensor" else None
    if spec.order == "sparsify_first":
      x_q, x_scale = quantize_activation(sparse(xs), mode=spec.act_mode, static_scale=static)
    else:
      x_q, x_scale = quantize_activation(xs, mode=spec.act_mode, static_scale=static)
      x_q = sparse(x_q)
    return int8_product(x_q, x_scale, q["w_q"], q["w_scale"], out_dtype=x_.dtype, backend=backend)

  return jax.lax.cond(q["in_float"], float_path, int8_path, x)


def site_linear(
  x: jax.Array, weights: dict[str, jax.Array], row: dict | None, spec: LinearSpec
) -> jax.Array:
  """One site's output ``transform(x) @ w (+ b)``: x [..., d_in] -> [..., d_out].

  ``weights`` holds ``w`` [d_in, d_out] (and the bias ``b`` [d_out], if any); ``row`` this
  layer's slice of the plan for the site, or None for the dense product. Raises ValueError for
  a step the backend cannot run (a correction needs a backend with ``corrections``) or a
  correction with W8A8 (corrections are fitted on float sites).
  """
  backend = get_backend(spec.backend)
  quant = None if row is None else row.get("quant")
  if row is not None and row.get("correction") is not None and spec.pattern is not None:
    if quant is not None or not backend.corrections:
      raise ValueError(
        "plan.correction needs a backend that runs corrections (impl='xla') and float weights "
        f"(no W8A8 part), got impl={spec.backend!r}, quant={'yes' if quant is not None else 'no'}"
      )
  if quant is not None:
    y = _w8a8_product(x, weights["w"], row, spec, backend)
  else:
    y = _float_product(x, weights["w"], row, spec, backend)
  if "b" in weights:
    y = y + weights["b"].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y
