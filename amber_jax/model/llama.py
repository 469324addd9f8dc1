"""A functional Llama-family decoder: params pytree in, logits (and KV cache) out.

Layers are stacked along a leading axis and run with ``lax.scan``, so a
30-layer model compiles as one layer. Every linear projection goes through
:func:`project`, the single injection point that knows its site (layer,
projection) and applies the plan's activation transform to its input. Prefill
honours the plan; decode never sparsifies.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from amber_jax.impl import (
  PALLAS_IMPLS,
  kernel_options,
  pallas_int8_matmul,
  pallas_sparse_matmul,
)
from amber_jax.model.config import LlamaConfig
from amber_jax.model.layers import apply_rope, attention, rms_norm, rope_inv_freq, rope_tables
from amber_jax.quant import int8_dot_general, quantize_activation
from amber_jax.sharding import constrain_batch
from amber_jax.sparsity import sparsify

Params = dict[str, Any]

if TYPE_CHECKING:  # plan.py imports model.config; avoid the cycle at runtime.
  from amber_jax.plan import SparsityPlan


@struct.dataclass
class KVCache:
  """Keys and values of every layer, [L, B, S_max, n_kv_heads, head_dim]; ``length`` is filled."""

  k: jax.Array
  v: jax.Array
  length: jax.Array  # int32 scalar: positions [0, length) are filled
  # int32 [B]: row b's real tokens start at slot start[b] (left-padded prompts); None: all at 0
  start: jax.Array | None = None


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
  quant_slice: dict[str, jax.Array] | None = None,
  act_mode: str = "token",
  order: str = "sparsify_first",
) -> jax.Array:
  """The injection point: ``transform(x) @ w (+ b)`` for site (layer, proj).

  ``plan_slice`` holds this layer's ``enabled`` flag and ``factors`` for ``proj``;
  None (decode, or a dense plan) means the input is used as is. ``impl`` "xla"
  sparsifies in jnp then calls XLA's dot; "pallas" calls the fused kernel (the
  mask is computed on each tile inside the matmul); "pallas_mask" runs the mask as its own
  Pallas pass, then XLA's dot. ``layer`` is the traced layer index (kept for transforms
  that need the site identity). A ``correction`` entry in
  ``plan_slice`` (``amber_jax.corrections``) corrects the sparse output of an enabled site
  (impl "xla", float weights only); without one the code path is exactly the plain N:M one.
  A ``channel_order`` entry (a permutation of the input channels) forms the N:M groups over
  ``x[..., order]`` (``amber_jax.sparsity.nm_keep``); the Pallas kernel then gets the
  permuted input, weight rows and factors, which is the same product.
  """
  del layer  # The plan slice is already this layer's row.
  correction = None if plan_slice is None else plan_slice.get("correction")
  channel_order = None if plan_slice is None else plan_slice.get("channel_order")
  if correction is not None and (quant_slice is not None or impl != "xla"):
    raise ValueError(
      "plan.correction needs impl='xla' and float weights (no W8A8 part), got "
      f"impl={impl!r}, quant={'yes' if quant_slice is not None else 'no'}"
    )
  if quant_slice is not None:
    y = _project_w8a8(
      x, weights, plan_slice, pattern, mask_method, quant_slice, act_mode, order, impl
    )
    if "b" in weights:
      y = y + weights["b"].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y
  w = weights["w"].astype(x.dtype)
  dense = lambda x_: jnp.einsum("...i,io->...o", x_, w)
  if plan_slice is None or pattern is None:
    y = dense(x)
  elif impl in PALLAS_IMPLS:
    factors = plan_slice["factors"]

    def fused(x_):
      lead = x_.shape[:-1]
      w_, factors_ = w, factors
      if channel_order is not None:  # the kernel's groups are consecutive: permute its operands
        x_ = jnp.take(x_, channel_order, axis=-1)
        w_, factors_ = jnp.take(w, channel_order, axis=0), jnp.take(factors, channel_order)
      x2d = x_.reshape(-1, x_.shape[-1])
      y2d = pallas_sparse_matmul(
        x2d, w_, impl=impl, pattern=pattern, factors=factors_, options=kernel_options()
      )
      return y2d.reshape(*lead, w.shape[1])

    y = jax.lax.cond(plan_slice["enabled"], fused, dense, x)
  elif correction is not None:
    # Imported here: amber_jax.corrections imports this module (its calibration runs the model).
    from amber_jax.corrections import corrected_sparse_matmul

    def corrected(x_):
      return corrected_sparse_matmul(
        x_,
        w,
        pattern,
        plan_slice["factors"],
        correction,
        channel_order=channel_order,
        method=mask_method,
      )

    y = jax.lax.cond(plan_slice["enabled"], corrected, dense, x)
  else:
    factors = plan_slice["factors"]
    x = jax.lax.cond(
      plan_slice["enabled"],
      lambda x_: sparsify(x_, pattern, factors, channel_order=channel_order, method=mask_method),
      lambda x_: x_,
      x,
    )
    y = dense(x)
  if "b" in weights:
    y = y + weights["b"].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y


def _project_w8a8(x, weights, plan_slice, pattern, mask_method, q, act_mode, order, impl):
  """W8A8 at the injection point, with the N:M transform before or after quantizing.

  With a Pallas ``impl`` the int8 product and its rescale run in the Pallas int8 kernel
  (``pallas_kernels.int8_matmul``: the same int32 sums and float32 rescale); the N:M mask and
  the quantization stay in jnp (the per-token scale needs the whole row).
  """

  def row(a):  # per-input-channel vector [d_in] -> broadcastable against x
    return a.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))

  def maybe_sparsify(v):
    if plan_slice is None or pattern is None:
      return v
    return jax.lax.cond(
      plan_slice["enabled"],
      lambda v_: sparsify(
        v_,
        pattern,
        plan_slice["factors"],
        channel_order=plan_slice.get("channel_order"),
        method=mask_method,
      ),
      lambda v_: v_,
      v,
    )

  def float_path(x_):
    # Select on the smoothed activation, as the int8 path does, then undo the smoothing
    # (the folded part and the divided part) for the float weight.
    xs = maybe_sparsify(x_ / row(q["act_div"])) * row(q["fold"] * q["act_div"])
    return jnp.einsum("...i,io->...o", xs, weights["w"].astype(x_.dtype))

  def int8_path(x_):
    xs = x_ / row(q["act_div"])
    static = q["act_scale"] if act_mode == "tensor" else None
    if order == "sparsify_first":
      x_q, x_scale = quantize_activation(maybe_sparsify(xs), mode=act_mode, static_scale=static)
    else:
      x_q, x_scale = quantize_activation(xs, mode=act_mode, static_scale=static)
      x_q = maybe_sparsify(x_q)
    if impl in PALLAS_IMPLS:
      lead, k = x_q.shape[:-1], x_q.shape[-1]
      x_scale_2d = jnp.broadcast_to(x_scale, lead + (1,)).reshape(-1, 1)
      y2d = pallas_int8_matmul(
        x_q.reshape(-1, k),
        q["w_q"],
        x_scale_2d,
        q["w_scale"].reshape(1, -1),
        out_dtype=x_.dtype,
        options=kernel_options(),
      )
      return y2d.reshape(*lead, y2d.shape[-1])
    acc = int8_dot_general(x_q, q["w_q"], (((x_q.ndim - 1,), (0,)), ((), ())))
    w_scale = q["w_scale"].reshape((1,) * (acc.ndim - 1) + (-1,))
    return (acc.astype(jnp.float32) * x_scale * w_scale).astype(x_.dtype)

  return jax.lax.cond(q["in_float"], float_path, int8_path, x)


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


def plan_injection(plan: SparsityPlan | None, *, sparse: bool = True):
  """The default injection point factory: (layer_params, plan row, layer) -> lin(x, proj).

  Also returns the per-layer rows of the plan to scan over (None for dense). With
  ``sparse=False`` (decode) the N:M transform is off; a W8A8 part of the plan stays on.
  """
  pattern = None if plan is None or not sparse else plan.pattern
  quant = None if plan is None else plan.quant
  if pattern is None and quant is None:
    plan_xs = None
  else:
    plan_xs = {"sites": {}, "norms": None}
    for p in plan.enabled:
      site = {}
      if pattern is not None:
        site.update(enabled=plan.enabled[p], factors=plan.factors[p])
        if plan.correction is not None:  # prefill only: decode (pattern None) stays uncorrected
          site["correction"] = plan.correction[p]
        if plan.channel_order is not None and p in plan.channel_order:
          site["channel_order"] = plan.channel_order[p]
      if quant is not None:
        site["quant"] = quant.sites[p]
      plan_xs["sites"][p] = site
    if quant is not None:
      plan_xs["norms"] = (quant.norms["attn_norm"], quant.norms["mlp_norm"])
  impl = "xla" if plan is None else plan.impl
  mask_method = "auto" if plan is None else plan.mask_method
  act_mode = "token" if quant is None else quant.act_mode
  order = "sparsify_first" if quant is None else quant.order

  def make_lin(layer_params, plan_layer, layer):
    def lin(x, proj):
      site = None if plan_layer is None else plan_layer["sites"][proj]
      return project(
        x,
        layer_params[proj],
        proj=proj,
        layer=layer,
        plan_slice=site if pattern is not None else None,
        pattern=pattern,
        impl=impl,
        mask_method=mask_method,
        quant_slice=None if site is None else site.get("quant"),
        act_mode=act_mode,
        order=order,
      )

    return lin, {}

  return make_lin, plan_xs


def run_layers(
  config,
  params,
  h,
  positions,
  mask,
  cache: KVCache | None,
  make_lin,
  layer_xs,
  *,
  first_layer: jax.Array | None = None,
  keep_inputs: bool = False,
):
  """Scans the decoder layers. ``make_lin(layer_params, layer_x, layer) -> (lin, records)``.

  ``records`` is a dict the injection point may fill while the layer is traced
  (e.g. per-site statistics); it is returned stacked over layers.
  Returns (h, (k, v) per layer, records), and with ``keep_inputs`` also the residual stream
  entering each layer, [L, B, T, D].

  ``first_layer`` (int32 scalar, may be traced): ``h`` is the residual stream entering that
  layer, and the layers before it are skipped at run time (``lax.cond``; their K/V are zeros),
  so one compiled function resumes a pass from any layer. No cache, no records with it.
  """
  if first_layer is not None and cache is not None:
    raise ValueError("first_layer resumes a prefill pass: it takes no KV cache")
  # A pass over more tokens than the context (or a sliding window, which this model does not
  # implement) would differ silently from the checkpoint's. Static shape: free under jit. (A
  # KV cache's length is not checked here: its slots beyond the tokens written are masked; the
  # generation entry points check prompt plus new tokens.)
  if cache is None:
    config.check_seq_len(h.shape[1])
  cos, sin = rope_tables(positions, rope_inv_freq(config))
  layer_ids = jnp.arange(config.n_layers)

  def body(h, xs):
    layer_params, layer_x, layer, kv = xs
    h = constrain_batch(h)  # batch over "data" when a mesh is set (amber_jax.sharding); else no-op
    h_in = h
    lin, records = make_lin(layer_params, layer_x, layer)
    kv_in = None if kv is None else (kv[0], kv[1], cache.length)
    norms = (layer_params["attn_norm"], layer_params["mlp_norm"])
    if isinstance(layer_x, dict) and layer_x.get("norms") is not None:
      norms = layer_x["norms"]  # RMSNorm weights with smoothing folded in (W8A8 plans)

    def run(h_):
      return _decoder_layer(config, h_, lin, cos, sin, kv_in, mask, norms)

    if first_layer is None:
      h, kv_out = run(h)
    else:
      kv_shape = jax.eval_shape(run, h)[1]

      def skip(h_):
        return h_, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), kv_shape)

      h, kv_out = jax.lax.cond(layer >= first_layer, run, skip, h)
    return h, (kv_out, records, h_in if keep_inputs else None)

  kv_xs = None if cache is None else (cache.k, cache.v)
  h, (kv, records, inputs) = jax.lax.scan(body, h, (params["layers"], layer_xs, layer_ids, kv_xs))
  if keep_inputs:
    return h, kv, records, inputs
  return h, kv, records


def _run_layers(config, params, plan, h, positions, mask, cache: KVCache | None, sparse=True):
  make_lin, plan_xs = plan_injection(plan, sparse=sparse)
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
  """Token embeddings [B, T, D] of ``tokens`` [B, T], in ``dtype``."""
  return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


def causal_mask(t: int, valid_BxT: jax.Array | None, b: int) -> jax.Array:
  """Boolean attention mask [b, t, t]: causal, and (with ``valid_BxT``) no attention to
  invalid (padding) keys."""
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  if valid_BxT is None:
    return jnp.broadcast_to(causal, (b, t, t))
  return causal & valid_BxT[:, None, :].astype(bool)


def left_padded_layout(start_B: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
  """(positions [B, T], attention mask [B, T, T]) of left-padded rows whose real tokens start at
  slot ``start_B[b]``: real tokens at positions 0, 1, ..., no key before the start attended."""
  slots = jnp.arange(t, dtype=jnp.int32)
  positions = jnp.maximum(slots[None, :] - start_B[:, None], 0)
  return positions, causal_mask(t, slots[None, :] >= start_B[:, None], start_B.shape[0])


def forward_hidden(
  params: Params,
  tokens_BxT: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  valid_BxT: jax.Array | None = None,
  dtype=jnp.float32,
  positions_BxT: jax.Array | None = None,
  attn_mask_BxTxT: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Prefill pass up to the last layer: (hidden [B,T,D] before the final norm, (K, V) per layer).

  By default token ``t`` sits at position ``t`` and attends causally to the valid keys.
  ``positions_BxT`` and ``attn_mask_BxTxT`` (query x key, True = attend) replace both, for
  packed rows: several continuations sharing one context in one row, each at the positions it
  would have alone and seeing only the context and itself (see ``eval.multiple_choice``). The
  N:M masks are per token, so packing changes no token's sparsity.
  """
  b, t = tokens_BxT.shape
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if attn_mask_BxTxT is None:
    mask = causal_mask(t, valid_BxT, b)
  elif valid_BxT is not None:
    raise ValueError("pass either valid_BxT or attn_mask_BxTxT (which already masks padding)")
  else:
    mask = attn_mask_BxTxT.astype(bool)
  h = embed(params, tokens_BxT, dtype)
  return _run_layers(config, params, plan, h, positions_BxT, mask, None)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def layer_inputs(params: Params, tokens_BxT: jax.Array, *, config: LlamaConfig, dtype=jnp.float32):
  """The dense model's residual stream entering each layer, [L, B, T, D] (causal, no padding):
  with ``forward_from_layer`` it lets a pass that changes only layer l and later start at l."""
  b, t = tokens_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  make_lin, plan_xs = plan_injection(None)
  h = embed(params, tokens_BxT, dtype)
  *_, inputs = run_layers(
    config,
    params,
    h,
    positions,
    causal_mask(t, None, b),
    None,
    make_lin,
    plan_xs,
    keep_inputs=True,
  )
  return inputs


def forward_from_layer(
  params: Params,
  h_BxTxD: jax.Array,
  first_layer: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  dtype=jnp.float32,
) -> jax.Array:
  """Logits [B, T, V] of a causal prefill pass resumed at ``first_layer`` (int32, may be
  traced) from ``h_BxTxD``, the residual stream entering it (``layer_inputs(...)[first_layer]``).
  Equals ``forward`` when the plan changes nothing before ``first_layer`` (no sparse site and
  no W8A8 part there: a W8A8 plan quantizes every layer); the skipped layers cost nothing at
  run time."""
  b, t, _ = h_BxTxD.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  make_lin, plan_xs = plan_injection(plan)
  h, _, _ = run_layers(
    config,
    params,
    h_BxTxD.astype(dtype),
    positions,
    causal_mask(t, None, b),
    None,
    make_lin,
    plan_xs,
    first_layer=jnp.asarray(first_layer, jnp.int32),
  )
  return _logits(config, params, h)


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


def prefill_hidden(
  params: Params,
  tokens_BxT: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  max_len: int | None = None,
  dtype=jnp.float32,
  start_B: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
  """:func:`prefill` without the LM head: the last layer's hidden states [B, T, D] and the KV
  cache, for callers that need the logits of some positions only (e.g. the last one)."""
  b, t = tokens_BxT.shape
  max_len = t if max_len is None else max_len
  if max_len < t:
    raise ValueError(f"max_len={max_len} must be >= the prompt length {t}")
  positions = mask = None
  if start_B is not None:
    start_B = jnp.asarray(start_B, jnp.int32)
    positions, mask = left_padded_layout(start_B, t)
  h, (k, v) = forward_hidden(
    params,
    tokens_BxT,
    config=config,
    plan=plan,
    dtype=dtype,
    positions_BxT=positions,
    attn_mask_BxTxT=mask,
  )
  pad = ((0, 0), (0, 0), (0, max_len - t), (0, 0), (0, 0))
  cache = KVCache(
    k=jnp.pad(k, pad), v=jnp.pad(v, pad), length=jnp.asarray(t, jnp.int32), start=start_B
  )
  return h, cache


def prefill(
  params: Params,
  tokens_BxT: jax.Array,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  max_len: int | None = None,
  dtype=jnp.float32,
  start_B: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
  """Sparse (per plan) prefill: logits [B, T, V] and a KV cache of ``max_len`` positions.

  ``start_B`` (optional) left-pads prompts of different lengths into one batch: row b's tokens
  before ``start_B[b]`` are padding, its real tokens sit at positions 0, 1, ... and no real
  token attends to the padding (the N:M masks and W8A8 scales are per token, so padding changes
  no real activation). Logits of padding positions are meaningless; decode keeps the offsets.
  """
  h, cache = prefill_hidden(
    params, tokens_BxT, config=config, plan=plan, max_len=max_len, dtype=dtype, start_B=start_B
  )
  return _logits(config, params, h), cache


def decode_step(
  params: Params,
  tokens_BxT: jax.Array,
  cache: KVCache,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  dtype=jnp.float32,
) -> tuple[jax.Array, KVCache]:
  """Decode of T new tokens (usually 1) against the cache: logits and the new cache.

  Never sparsified: only the W8A8 part of ``plan`` (if any) applies. The cache must have room
  for the T tokens (``prefill``'s ``max_len``): a concrete ``cache.length`` beyond it raises
  ValueError; under ``jit``, where the length is traced, an overflowing step returns NaN logits
  (the cache write would be clamped and the result silently wrong otherwise).
  """
  b, t = tokens_BxT.shape
  s_max = cache.k.shape[2]
  if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + t > s_max:
    raise ValueError(
      f"decode_step: the cache holds {s_max} positions (prefill's max_len) and {int(cache.length)}"
      f" are used, so {t} more tokens do not fit; prefill with a larger max_len"
    )
  slots = cache.length + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  key_slot = jnp.arange(s_max, dtype=jnp.int32)
  mask = key_slot[None, None, :] <= slots[:, :, None]
  positions = slots
  if cache.start is not None:  # left-padded rows: skip their padding, shift their positions
    mask = mask & (key_slot[None, None, :] >= cache.start[:, None, None])
    positions = slots - cache.start[:, None]
  h = embed(params, tokens_BxT, dtype)
  # Decode never sparsifies (sparse=False); W8A8 weights stay int8.
  h, (k, v) = _run_layers(config, params, plan, h, positions, mask, cache, sparse=False)
  new_cache = KVCache(k=k, v=v, length=cache.length + t, start=cache.start)
  # Only reachable with a traced length (see above). Poisoned before the LM head: [B, T, D]
  # is far smaller than the logits, and the NaN reaches every logit through it.
  h = jnp.where(cache.length + t > s_max, jnp.nan, h)
  return _logits(config, params, h), new_cache


def dense_pass_records(params, tokens_BxT, *, config: LlamaConfig, dtype, site_xs, record):
  """A dense prefill in which every site also reports statistics of its input.

  ``record(x, weights, site_x)`` is called at each site with its input, its weights and its
  row of ``site_xs`` (proj -> data stacked over layers, or None); the returned pytree is
  collected as proj -> stats stacked over layers. Calibration and sensitivity use this.
  """
  b, t = tokens_BxT.shape
  h = embed(params, tokens_BxT, dtype)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def make_lin(layer_params, layer_x, layer):
    records = {}

    def lin(x, proj):
      records[proj] = record(x, layer_params[proj], None if layer_x is None else layer_x[proj])
      return project(x, layer_params[proj], proj=proj, layer=layer, plan_slice=None, pattern=None)

    return lin, records

  _, _, records = run_layers(
    config, params, h, positions, causal_mask(t, None, b), None, make_lin, site_xs
  )
  return records
