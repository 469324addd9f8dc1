"""A functional Llama-family decoder: params pytree in, logits (and KV cache) out.

Layers are stacked along a leading axis and run with ``lax.scan``, so a
30-layer model compiles as one layer. Every linear projection goes through
:func:`project`, the single injection point that knows its site (layer,
projection) and applies the plan's activation transform to its input. Prefill
honours the plan; decode never sparsifies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from amber_jax.impl import kernel_options, pallas_nm_matmul
from amber_jax.model.config import LlamaConfig
from amber_jax.model.layers import apply_rope, attention, rms_norm, rope_inv_freq, rope_tables
from amber_jax.sparsity import sparsify

Params = dict[str, Any]

if TYPE_CHECKING:  # plan.py imports model.config; avoid the cycle at runtime.
  from amber_jax.plan import SparsityPlan


@struct.dataclass
class KVCache:
  """Keys and values of every layer, [L, B, S_max, n_kv_heads, head_dim]; ``length`` is filled."""

  k: jax.Array
  v: jax.Array
  length: jax.Array  # int32 scalar: positions [0, length) are valid


def project(
  x: jax.Array,
  weights: dict[str, jax.Array],
  *,
  proj: str,
  layer: jax.Array,
  plan_slice: dict[str, jax.Array] | None,
  pattern,
  impl: str = "xla",
  mask_method: str = "auto",
) -> jax.Array:
  """The injection point: ``transform(x) @ w (+ b)`` for site (layer, proj).

  ``plan_slice`` holds this layer's ``enabled`` flag and ``factors`` for ``proj``;
  None (decode, or a dense plan) means the input is used as is. ``impl`` "xla"
  sparsifies in jnp then calls XLA's dot; "pallas" calls the fused kernel (the
  mask is computed on each tile inside the matmul). ``layer`` is the traced layer
  index (kept for transforms that need the site identity).
  """
  del layer  # The plan slice is already this layer's row.
  w = weights["w"].astype(x.dtype)
  dense = lambda x_: jnp.einsum("...i,io->...o", x_, w)
  if plan_slice is None or pattern is None:
    y = dense(x)
  elif impl == "pallas":
    factors = plan_slice["factors"]

    def fused(x_):
      lead = x_.shape[:-1]
      y2d = pallas_nm_matmul(
        x_.reshape(-1, x_.shape[-1]), w, pattern=pattern, factors=factors, options=kernel_options()
      )
      return y2d.reshape(*lead, w.shape[1])

    y = jax.lax.cond(plan_slice["enabled"], fused, dense, x)
  else:
    factors = plan_slice["factors"]
    x = jax.lax.cond(
      plan_slice["enabled"],
      lambda x_: sparsify(x_, pattern, factors, method=mask_method),
      lambda x_: x_,
      x,
    )
    y = dense(x)
  if "b" in weights:
    y = y + weights["b"].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y


def _decoder_layer(config, h, lin, cos, sin, kv_in, mask, norms):
  """One pre-norm decoder layer.

  ``lin(x, proj)`` is this layer's injection point; ``kv_in`` is None (attend
  over the layer's own keys) or (k_cache, v_cache, index).
  """
  b, t, _ = h.shape
  attn_norm, mlp_norm = norms
  x = rms_norm(h, attn_norm, config.norm_eps)
  q = lin(x, "q").reshape(b, t, config.n_heads, config.head_dim)
  k = lin(x, "k").reshape(b, t, config.n_kv_heads, config.head_dim)
  v = lin(x, "v").reshape(b, t, config.n_kv_heads, config.head_dim)
  q = apply_rope(q, cos, sin)
  k = apply_rope(k, cos, sin)
  if kv_in is None:
    k_all, v_all, kv_out = k, v, (k, v)
  else:
    k_cache, v_cache, index = kv_in
    k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
    kv_out = (k_all, v_all)
  attn = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
  h = h + lin(attn, "o")
  x = rms_norm(h, mlp_norm, config.norm_eps)
  gated = jax.nn.silu(lin(x, "gate")) * lin(x, "up")
  h = h + lin(gated, "down")
  return h, kv_out


def plan_injection(plan: SparsityPlan | None):
  """The default injection point factory: (layer_params, plan row, layer) -> lin(x, proj).

  Also returns the per-layer rows of the plan to scan over (None for dense).
  """
  if plan is None or plan.pattern is None:
    plan_xs = None
  else:
    plan_xs = {p: {"enabled": plan.enabled[p], "factors": plan.factors[p]} for p in plan.enabled}
  pattern = None if plan is None else plan.pattern
  impl = "xla" if plan is None else plan.impl
  mask_method = "auto" if plan is None else plan.mask_method

  def make_lin(layer_params, plan_layer, layer):
    def lin(x, proj):
      return project(
        x,
        layer_params[proj],
        proj=proj,
        layer=layer,
        plan_slice=None if plan_layer is None else plan_layer[proj],
        pattern=pattern,
        impl=impl,
        mask_method=mask_method,
      )

    return lin, {}

  return make_lin, plan_xs


def run_layers(config, params, h, positions, mask, cache: KVCache | None, make_lin, layer_xs):
  """Scans the decoder layers. ``make_lin(layer_params, layer_x, layer) -> (lin, records)``.

  ``records`` is a dict the injection point may fill while the layer is traced
  (e.g. per-site statistics); it is returned stacked over layers.
  Returns (h, (k, v) per layer, records).
  """
  cos, sin = rope_tables(positions, rope_inv_freq(config))
  layer_ids = jnp.arange(config.n_layers)

  def body(h, xs):
    layer_params, layer_x, layer, kv = xs
    lin, records = make_lin(layer_params, layer_x, layer)
    kv_in = None if kv is None else (kv[0], kv[1], cache.length)
    norms = (layer_params["attn_norm"], layer_params["mlp_norm"])
    h, kv_out = _decoder_layer(config, h, lin, cos, sin, kv_in, mask, norms)
    return h, (kv_out, records)

  kv_xs = None if cache is None else (cache.k, cache.v)
  h, (kv, records) = jax.lax.scan(body, h, (params["layers"], layer_xs, layer_ids, kv_xs))
  return h, kv, records


def _run_layers(config, params, plan, h, positions, mask, cache: KVCache | None):
  make_lin, plan_xs = plan_injection(plan)
  h, kv, _ = run_layers(config, params, h, positions, mask, cache, make_lin, plan_xs)
  return h, kv


def _logits(config, params, h):
  h = rms_norm(h, params["final_norm"], config.norm_eps)
  if config.tie_embeddings:
    w_DxV = params["embed"].T
  else:
    w_DxV = params["lm_head"]
  return jnp.einsum("btd,dv->btv", h, w_DxV.astype(h.dtype), preferred_element_type=jnp.float32)


def embed(params, tokens, dtype):
  return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


def causal_mask(t: int, valid_BxT: jax.Array | None, b: int) -> jax.Array:
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  if valid_BxT is None:
    return jnp.broadcast_to(causal, (b, t, t))
  return causal & valid_BxT[:, None, :].astype(bool)


def forward_hidden(
  params: Params,
  tokens_BxT: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  valid_BxT: jax.Array | None = None,
  dtype=jnp.float32,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Prefill pass up to the last layer: (hidden [B,T,D] before the final norm, (K, V) per layer)."""
  b, t = tokens_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  h = embed(params, tokens_BxT, dtype)
  mask = causal_mask(t, valid_BxT, b)
  return _run_layers(config, params, plan, h, positions, mask, None)


def forward(
  params: Params,
  tokens_BxT: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  valid_BxT: jax.Array | None = None,
  dtype=jnp.float32,
) -> jax.Array:
  """Full-sequence (prefill-mode) forward pass: float32 logits [B, T, V].

  ``plan`` None or a plan with pattern None is the dense model. ``valid_BxT``
  (optional) marks real tokens of right-padded rows; padded keys are masked out.
  """
  h, _ = forward_hidden(
    params, tokens_BxT, config=config, plan=plan, valid_BxT=valid_BxT, dtype=dtype
  )
  return _logits(config, params, h)


def prefill(
  params: Params,
  tokens_BxT: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  max_len: int | None = None,
  dtype=jnp.float32,
) -> tuple[jax.Array, KVCache]:
  """Sparse (per plan) prefill: logits [B, T, V] and a KV cache of ``max_len`` positions."""
  b, t = tokens_BxT.shape
  max_len = t if max_len is None else max_len
  if max_len < t:
    raise ValueError(f"max_len={max_len} must be >= the prompt length {t}")
  h, (k, v) = forward_hidden(params, tokens_BxT, config=config, plan=plan, dtype=dtype)
  pad = ((0, 0), (0, 0), (0, max_len - t), (0, 0), (0, 0))
  cache = KVCache(k=jnp.pad(k, pad), v=jnp.pad(v, pad), length=jnp.asarray(t, jnp.int32))
  return _logits(config, params, h), cache


def decode_step(
  params: Params,
  tokens_BxT: jax.Array,
  cache: KVCache,
  *,
  config: LlamaConfig,
  dtype=jnp.float32,
) -> tuple[jax.Array, KVCache]:
  """Dense decode of T new tokens (usually 1) against the cache: logits and the new cache."""
  b, t = tokens_BxT.shape
  s_max = cache.k.shape[2]
  positions = cache.length + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  key_pos = jnp.arange(s_max, dtype=jnp.int32)
  mask = key_pos[None, None, :] <= positions[:, :, None]
  h = embed(params, tokens_BxT, dtype)
  # Decode is always dense: no plan is passed to the layers.
  h, (k, v) = _run_layers(config, params, None, h, positions, mask, cache)
  new_cache = KVCache(k=k, v=v, length=cache.length + t)
  return _logits(config, params, h), new_cache
