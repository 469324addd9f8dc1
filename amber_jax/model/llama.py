"""A functional Llama-family decoder: params pytree in, logits (and KV cache) out.

Layers are stacked along a leading axis and run with ``lax.scan``, so a
30-layer model compiles as one layer. Every linear goes through
``amber_jax.core.linear.site_linear`` with its row of the plan (the one injection point), or
through a caller's *site hook* (:func:`model_pass`), which is how calibration records or
overrides a site's input and output. :func:`model_pass` is the one harness (embed, positions,
mask, the layer scan) that every entry point here and every calibration pass runs. Prefill
honours the plan; decode never sparsifies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from amber_jax.core.hadamard import hadamard_transform
from amber_jax.core.linear import LinearSpec, site_linear
from amber_jax.model.config import LlamaConfig
from amber_jax.model.layers import apply_rope, attention, rms_norm, rope_inv_freq, rope_tables
from amber_jax.model.moe import moe_mlp
from amber_jax.plan.schema import SparsityPlan
from amber_jax.plan.sharding import constrain_batch

Params = dict[str, Any]
# hook(site name, x, weights, the hook's row for this layer, linear) -> (y, record or None):
# ``linear(x)`` is the site's own output under the plan; the hook may return it, or any other
# output (a calibration pass that overrides the site), and a record collected over layers. At
# an expert site x is the routed rows and ``weights["expert_rows"]`` their ExpertRows (use
# ``amber_jax.core.linear.site_product`` / ``row_factors`` for the hook's own products).
SiteHook = Callable[[str, jax.Array, dict, Any, Callable[[jax.Array], jax.Array]], tuple]


@struct.dataclass
class KVCache:
  """Keys and values of every layer, [L, B, S_max, n_kv_heads, head_dim]; ``length`` is filled."""

  k: jax.Array
  v: jax.Array
  length: jax.Array  # int32 scalar: positions [0, length) are filled
  # int32 [B]: row b's real tokens start at slot start[b] (left-padded prompts); None: all at 0
  start: jax.Array | None = None


def _decoder_layer(config, h, lin, cos, sin, kv_in, mask, norms):
  """One pre-norm decoder layer.

  ``lin(x, proj)`` is this layer's injection point (``lin(rows, proj, ExpertRows)`` for an
  expert site); ``kv_in`` is None (attend over the layer's own keys) or (k_cache, v_cache,
  index). ``norms`` holds the layer's norm weights (and the router's, with experts).
  """
  b, t, _ = h.shape
  attn_norm, mlp_norm = norms["attn_norm"], norms["mlp_norm"]
  x = rms_norm(h, attn_norm, config.norm_eps)
  q = lin(x, "q").reshape(b, t, config.n_heads, config.head_dim)
  k = lin(x, "k").reshape(b, t, config.n_kv_heads, config.head_dim)
  v = lin(x, "v").reshape(b, t, config.n_kv_heads, config.head_dim)
  if config.qk_norm:  # Qwen3: RMSNorm over each head, before RoPE
    q = rms_norm(q, norms["q_norm"], config.norm_eps)
    k = rms_norm(k, norms["k_norm"], config.norm_eps)
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
  gate_act = functools.partial(gated_activation, threshold=norms.get("gate_threshold"))
  if config.moe is not None:
    return h + moe_mlp(x, norms["router"], config.moe, lin, gate_act), kv_out
  gated = gate_act(lin(x, "gate")) * lin(x, "up")
  if config.mlp_hidden_hadamard:  # an online rotation: down's weight is rotated to match
    gated = hadamard_transform(gated)
  h = h + lin(gated, "down")
  return h, kv_out


def gated_activation(g: jax.Array, *, threshold: jax.Array | None = None) -> jax.Array:
  """``silu(g)``, the gated MLP's activation; with a CATS ``threshold`` its entries with
  ``|silu(g)| <= threshold`` are 0 (so ``down`` reads a sparse input and those entries of ``up``
  are not needed)."""
  a = jax.nn.silu(g)
  if threshold is None:
    return a
  return jnp.where(jnp.abs(a) > threshold.astype(a.dtype), a, jnp.zeros((), a.dtype))


def linear_spec(plan: SparsityPlan | None, *, sparse: bool = True) -> LinearSpec:
  """The static part of the sites' linears under ``plan`` (no N:M step when not ``sparse``)."""
  if plan is None:
    return LinearSpec()
  quant = plan.quant
  return LinearSpec(
    pattern=plan.pattern if sparse else None,
    backend=plan.impl,
    mask_method=plan.mask_method,
    act_mode="token" if quant is None else quant.act_mode,
    order="sparsify_first" if quant is None else quant.order,
  )


def _plan_injection(
  plan: SparsityPlan | None, *, sparse: bool = True, hook: SiteHook | None = None
):
  """The injection point factory ``make_lin(layer_params, layer_x, layer) -> (lin, records)``
  for the layer scan of ``model_pass``, and the per-layer data to scan over (the plan's rows,
  ``SparsityPlan.site_rows``, under "plan"). With ``sparse=False`` (decode) the N:M transform
  is off; a W8A8 part of the plan stays on. With a ``hook``, each site calls it with its
  layer's row of ``layer_x["hook"]`` (see ``SiteHook``) and its records are collected.
  """
  spec = linear_spec(plan, sparse=sparse)
  plan_xs = None if plan is None else plan.site_rows(sparse=sparse)

  def make_lin(layer_params, layer_x, layer):
    del layer  # The rows are already this layer's.
    records = {}
    rows = None if layer_x["plan"] is None else layer_x["plan"]["sites"]
    hook_rows = layer_x["hook"]

    def lin(x, name, experts=None):
      weights = layer_params[name]
      row = None if rows is None else rows[name]

      def linear(x_):
        return site_linear(x_, weights, row, spec, experts)

      if hook is None:
        return linear(x)
      if experts is not None:  # the hook's products need the rows' experts (site_product)
        weights = {**weights, "expert_rows": experts}
      y, record = hook(name, x, weights, None if hook_rows is None else hook_rows[name], linear)
      if record is not None:
        records[name] = record
      return y

    return lin, records

  return make_lin, plan_xs


def _scan_layers(
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
  """Scans the decoder layers (the body of ``model_pass``).
  ``make_lin(layer_params, layer_x, layer) -> (lin, records)``.

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
    h = constrain_batch(
      h
    )  # batch over "data" when a mesh is set (amber_jax.plan.sharding); else no-op
    h_in = h
    lin, records = make_lin(layer_params, layer_x, layer)
    kv_in = None if kv is None else (kv[0], kv[1], cache.length)
    norms = {"attn_norm": layer_params["attn_norm"], "mlp_norm": layer_params["mlp_norm"]}
    plan_x = layer_x["plan"] if isinstance(layer_x, dict) and "plan" in layer_x else None
    if plan_x is not None and plan_x.get("norms") is not None:
      norms = dict(plan_x["norms"])  # RMSNorm weights with smoothing folded in (W8A8 plans)
    if plan_x is not None and plan_x.get("gate_threshold") is not None:
      norms["gate_threshold"] = plan_x["gate_threshold"]  # this layer's CATS threshold
    for name in ("q_norm", "k_norm"):  # Qwen3's per-head norms (never folded)
      if name in layer_params:
        norms[name] = layer_params[name]
    if "router" in layer_params:
      norms["router"] = layer_params["router"]

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


@dataclasses.dataclass(frozen=True)
class ModelPass:
  """What ``model_pass`` returns: the last layer's hidden states [B, T, D] (before the final
  norm), the (K, V) each layer wrote, the site hook's records (name -> stacked over layers) and,
  with ``keep_inputs``, the residual stream entering each layer [L, B, T, D]."""

  hidden: jax.Array
  kv: tuple[jax.Array, jax.Array]
  records: dict
  inputs: jax.Array | None = None


def model_pass(
  params: Params,
  tokens_BxT: jax.Array | None = None,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  sparse: bool = True,
  dtype=jnp.float32,
  hook: SiteHook | None = None,
  hook_xs: Any = None,
  positions_BxT: jax.Array | None = None,
  attn_mask_BxTxT: jax.Array | None = None,
  h_BxTxD: jax.Array | None = None,
  first_layer: jax.Array | None = None,
  cache: KVCache | None = None,
  keep_inputs: bool = False,
) -> ModelPass:
  """The one harness: embed, positions, attention mask, then the layer scan with every site's
  linear under ``plan`` (and ``hook``, if given). Every forward, prefill and decode entry point
  and every calibration pass (``amber_jax.calibrate``) runs this.

  ``tokens_BxT`` are embedded, or ``h_BxTxD`` (the residual stream entering ``first_layer``)
  is used instead. Positions default to 0..T-1, the mask to causal; give both for packed rows
  or a KV cache. ``hook`` (see ``SiteHook``) sees each site's input and its output under the
  plan and may replace the output; ``hook_xs`` are its per-site data, site name -> arrays
  stacked over layers (each layer's row is passed to the hook). ``first_layer`` skips the
  layers before it at run time (``_scan_layers``).
  """
  if (tokens_BxT is None) == (h_BxTxD is None):
    raise ValueError("model_pass: give exactly one of tokens_BxT and h_BxTxD")
  h = embed(params, tokens_BxT, dtype) if h_BxTxD is None else h_BxTxD.astype(dtype)
  b, t = h.shape[:2]
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = causal_mask(t, None, b) if attn_mask_BxTxT is None else attn_mask_BxTxT.astype(bool)
  make_lin, plan_xs = _plan_injection(plan, sparse=sparse, hook=hook)
  out = _scan_layers(
    config,
    params,
    h,
    positions_BxT,
    mask,
    cache,
    make_lin,
    {"plan": plan_xs, "hook": hook_xs},
    first_layer=first_layer,
    keep_inputs=keep_inputs,
  )
  return ModelPass(*out)


def lm_head(config: LlamaConfig, params: Params, h_BxTxD: jax.Array) -> jax.Array:
  """float32 logits [B, T, V] of the last layer's hidden states: final norm, then the LM head
  (the tied embedding where the checkpoint ties them)."""
  h = rms_norm(h_BxTxD, params["final_norm"], config.norm_eps)
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
  if attn_mask_BxTxT is None:
    attn_mask_BxTxT = causal_mask(t, valid_BxT, b)
  elif valid_BxT is not None:
    raise ValueError("pass either valid_BxT or attn_mask_BxTxT (which already masks padding)")
  out = model_pass(
    params,
    tokens_BxT,
    config=config,
    plan=plan,
    dtype=dtype,
    positions_BxT=positions_BxT,
    attn_mask_BxTxT=attn_mask_BxTxT,
  )
  return out.hidden, out.kv


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def layer_inputs(params: Params, tokens_BxT: jax.Array, *, config: LlamaConfig, dtype=jnp.float32):
  """The dense model's residual stream entering each layer, [L, B, T, D] (causal, no padding):
  with ``forward_from_layer`` it lets a pass that changes only layer l and later start at l."""
  return model_pass(params, tokens_BxT, config=config, dtype=dtype, keep_inputs=True).inputs


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
  out = model_pass(
    params,
    config=config,
    plan=plan,
    dtype=dtype,
    h_BxTxD=h_BxTxD,
    first_layer=jnp.asarray(first_layer, jnp.int32),
  )
  return lm_head(config, params, out.hidden)


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
  return lm_head(config, params, h)


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
  return lm_head(config, params, h), cache


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
  # Decode never sparsifies (sparse=False); W8A8 weights stay int8.
  out = model_pass(
    params,
    tokens_BxT,
    config=config,
    plan=plan,
    sparse=False,
    dtype=dtype,
    positions_BxT=positions,
    attn_mask_BxTxT=mask,
    cache=cache,
  )
  h, (k, v) = out.hidden, out.kv
  new_cache = KVCache(k=k, v=v, length=cache.length + t, start=cache.start)
  # Only reachable with a traced length (see above). Poisoned before the LM head: [B, T, D]
  # is far smaller than the logits, and the NaN reaches every logit through it.
  h = jnp.where(cache.length + t > s_max, jnp.nan, h)
  return lm_head(config, params, h), new_cache
