"""A site's linear as a chain of small pure steps: the one injection point of the library.

    x --threshold--> --channel order--> --score, N:M mask--> --quantize--> --matmul backend-->
      --correction--> y

Each step is optional and reads its data from the site's *row* (this layer's slice of the plan,
``amber_jax.plan.schema.SparsityPlan.site_rows``):

* ``threshold``: the magnitude threshold of the input (TEAL): entries with ``|x| <= t`` become
  0 (unstructured, per token; t = 0 changes nothing), before every other step;
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

An *expert site* (a mixture-of-experts layer's gate/up/down) has a weight ``[E, d_in, d_out]``
and a row whose arrays carry the expert axis first (``factors [E, d_in]``, the W8A8 arrays
``[E, ...]``; ``enabled`` is one flag per layer, shared by the experts). Its input is the
routed rows, sorted by expert (``ExpertRows``): each row takes its expert's factors and
scales, and the product is one grouped matmul (``grouped_dot``: ``ragged_dot``'s semantics)
whose cost follows the rows, never all E experts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from amber_jax.core.backends import get_backend
from amber_jax.core.correction import corrected_sparse_matmul
from amber_jax.core.patterns import NMPattern
from amber_jax.core.quant import int8_rescaled_dot, quantize_activation, quantize_with_scale
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


class ExpertRows(NamedTuple):
  """The routed rows of an expert site, sorted by expert: ``group_sizes`` int32 [E] (rows of
  expert e follow those of e - 1) and ``expert_ids`` int32 [R] (each row's expert)."""

  group_sizes: jax.Array
  expert_ids: jax.Array


def _row_vector(a: jax.Array, like: jax.Array) -> jax.Array:
  """A per-input-channel vector [d_in] broadcastable against ``like`` [..., d_in]."""
  return a.astype(like.dtype).reshape((1,) * (like.ndim - 1) + (-1,))


def threshold_step(x: jax.Array, threshold: jax.Array | None) -> jax.Array:
  """``x`` with the entries of ``|x| <= threshold`` set to 0 (TEAL's magnitude sparsity; a
  threshold of 0 keeps everything, zeros stay zeros). None: x unchanged."""
  if threshold is None:
    return x
  return jnp.where(jnp.abs(x) > threshold.astype(x.dtype), x, jnp.zeros((), x.dtype))


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


def _per_row(a: jax.Array, rows: ExpertRows) -> jax.Array:
  """An expert-axis array [E, ...] as one entry per routed row [R, ...]."""
  return jnp.take(a, rows.expert_ids, axis=0)


def expert_nm_step(row: dict | None, spec: LinearSpec, rows: ExpertRows):
  """``nm_step`` of an expert site: where the site's ``enabled`` flag (one per layer, shared by
  its experts) is set, each routed row is sparsified with its expert's factors."""
  if row is None or spec.pattern is None or "enabled" not in row:
    return lambda v: v

  def step(v):
    def sparse(v_):
      return sparsify(v_, spec.pattern, _per_row(row["factors"], rows), method=spec.mask_method)

    return jax.lax.cond(row["enabled"], sparse, lambda v_: v_, v)

  return step


def site_product(x: jax.Array, weights: dict) -> jax.Array:
  """The plain product ``x @ w`` of a site in x's dtype (no bias, no transform): grouped per
  expert when ``weights`` carries ``expert_rows`` (what a site hook sees at an expert site)."""
  rows = weights.get("expert_rows")
  if rows is not None:
    return grouped_matmul(x, weights["w"], rows)
  return dense_matmul(x, weights["w"])


def row_factors(factors: jax.Array, weights: dict) -> jax.Array:
  """A site's score factors as ``sparsify`` takes them for x: ``[d_in]``, or one row per routed
  row (its expert's) when ``weights`` carries ``expert_rows``."""
  rows = weights.get("expert_rows")
  return factors if rows is None else _per_row(factors, rows)


def _tile_rows(n_rows: int, n_experts: int) -> int:
  """Rows per tile of ``grouped_dot``: about the mean group size (a power of two in 8..128),
  so the padding of the last tile of each group costs at most about one tile per expert."""
  mean = max(n_rows // max(n_experts, 1), 1)
  return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def grouped_dot(
  x_RxI: jax.Array, w_ExIxO: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None
) -> jax.Array:
  """``ragged_dot`` semantics (rows sorted by group, ``group_sizes`` [E]) at a cost that follows
  the rows: each group is cut into tiles of a few rows, and one ``[tile, I] @ [I, O]`` product
  runs per tile with that group's weight (``lax.map``; the unused tail tiles are skipped at run
  time). ``jax.lax.ragged_dot`` itself lowers on CPU to a product of every row with every
  group's weight (E times the work: 1.02 s against 0.07 s for E=128 vs 8, 4096 x 512 x 192,
  measured on 2 cores), which is what a mixture of experts must avoid."""
  r, d_in = x_RxI.shape
  e, _, d_out = w_ExIxO.shape
  tile = _tile_rows(r, e)
  n_tiles = -(-r // tile) + e  # every group's rows, each group's last tile partly filled
  sizes = group_sizes.astype(jnp.int32)
  tiles_of = (sizes + tile - 1) // tile
  tiles_end = jnp.cumsum(tiles_of)
  tile_ids = jnp.arange(n_tiles, dtype=jnp.int32)
  expert = jnp.searchsorted(tiles_end, tile_ids, side="right").astype(jnp.int32)  # E: unused
  used = expert < e
  expert_c = jnp.minimum(expert, e - 1)
  first = (tile_ids - (tiles_end - tiles_of)[expert_c]) * tile  # row offset inside the group
  offset = first[:, None] + jnp.arange(tile, dtype=jnp.int32)[None, :]  # [n_tiles, tile]
  valid = used[:, None] & (offset < sizes[expert_c][:, None])
  row = (jnp.cumsum(sizes) - sizes)[expert_c][:, None] + offset
  x_tiles = jnp.take(x_RxI, jnp.where(valid, row, 0), axis=0)
  x_tiles = jnp.where(valid[..., None], x_tiles, jnp.zeros((), x_RxI.dtype))
  out_dtype = preferred_element_type or x_RxI.dtype

  def one_tile(args):
    x_t, e_t, used_t = args
    zeros = jnp.zeros((tile, d_out), out_dtype)
    dot = lambda: jax.lax.dot(x_t, w_ExIxO[e_t], preferred_element_type=out_dtype)
    return jax.lax.cond(used_t, dot, lambda: zeros)

  y_tiles = jax.lax.map(one_tile, (x_tiles, expert_c, used))
  target = jnp.where(valid, row, r).reshape(-1)  # invalid slots land past the end: dropped
  out = jnp.zeros((r, d_out), out_dtype)
  return out.at[target].set(y_tiles.reshape(-1, d_out), mode="drop")


def grouped_matmul(x_RxI: jax.Array, w_ExIxO: jax.Array, rows: ExpertRows) -> jax.Array:
  """Each routed row times its expert's weight (``grouped_dot``) in x's dtype, [R, d_out]."""
  return grouped_dot(x_RxI, w_ExIxO.astype(x_RxI.dtype), rows.group_sizes)


def _expert_w8a8(x, w, row, spec, rows):
  """W8A8 of an expert site: each row divided by its expert's smoothing, int8 codes per token
  (or with its expert's static scale), one int8 grouped matmul with int32 accumulation, then
  the rows rescaled by their expert's weight scales. Experts flagged ``in_float`` keep their
  float weight (computed only when some expert is)."""
  q = row["quant"]
  sparse = expert_nm_step(row, spec, rows)
  xs = x / _per_row(q["act_div"], rows).astype(x.dtype)
  if spec.act_mode == "tensor":
    x_scale = _per_row(q["act_scale"], rows).astype(jnp.float32)[:, None]
    quantize = lambda v: (quantize_with_scale(v.astype(jnp.float32), x_scale), x_scale)
  else:
    quantize = lambda v: quantize_activation(v, mode="token")
  if spec.order == "sparsify_first":
    x_q, x_scale = quantize(sparse(xs))
  else:
    x_q, x_scale = quantize(xs)
    x_q = sparse(x_q)
  acc = grouped_dot(x_q, q["w_q"], rows.group_sizes, preferred_element_type=jnp.int32)
  y = (acc.astype(jnp.float32) * x_scale * _per_row(q["w_scale"], rows)).astype(x.dtype)

  def with_float(y_):
    unsmooth = _per_row(q["fold"] * q["act_div"], rows).astype(x.dtype)
    y_float = grouped_matmul(sparse(xs) * unsmooth, w, rows)
    return jnp.where(_per_row(q["in_float"], rows)[:, None], y_float, y_)

  return jax.lax.cond(jnp.any(q["in_float"]), with_float, lambda y_: y_, y)


def _expert_linear(x, weights, row, spec, rows: ExpertRows | None):
  """``site_linear`` of an expert site (see the module docstring)."""
  w = weights["w"]
  if rows is None or x.ndim != 2:
    raise ValueError(
      f"an expert site (weight {w.shape}) takes its routed rows [R, d_in] and their ExpertRows,"
      f" got x {x.shape} and rows={rows!r:.40}"
    )
  if spec.backend != "xla":
    raise ValueError(f"expert sites run on impl='xla' only (grouped matmul), got {spec.backend!r}")
  if row is not None and (row.get("correction") is not None or "channel_order" in row):
    raise ValueError("corrections and channel orders are not supported on expert sites")
  if row is not None and row.get("quant") is not None:
    y = _expert_w8a8(x, w, row, spec, rows)
  else:
    y = grouped_matmul(expert_nm_step(row, spec, rows)(x), w, rows)
  if "b" in weights:
    y = y + _per_row(weights["b"], rows).astype(y.dtype)
  return y


def site_linear(
  x: jax.Array,
  weights: dict[str, jax.Array],
  row: dict | None,
  spec: LinearSpec,
  experts: ExpertRows | None = None,
) -> jax.Array:
  """One site's output ``transform(x) @ w (+ b)``: x [..., d_in] -> [..., d_out].

  ``weights`` holds ``w`` [d_in, d_out] (and the bias ``b`` [d_out], if any); ``row`` this
  layer's slice of the plan for the site, or None for the dense product. An expert site
  (``w`` [E, d_in, d_out]) takes its routed rows x [R, d_in] and their ``experts``. Raises
  ValueError for a step the backend cannot run (a correction needs a backend with
  ``corrections``) or a correction with W8A8 (corrections are fitted on float sites).
  """
  if row is not None:
    x = threshold_step(x, row.get("threshold"))
  if weights["w"].ndim == 3:
    return _expert_linear(x, weights, row, spec, experts)
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
