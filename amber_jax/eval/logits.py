"""The LM head applied chunk by chunk: per-token statistics without [B, T, V] logits in memory."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from amber_jax.model.config import LlamaConfig
from amber_jax.model.layers import rms_norm

# Tokens whose logits are materialised at once (the full [B, T, V] float32 logits of a 49k
# vocabulary would be 100 MB per row of 512 tokens).
LOGIT_CHUNK = 128


def map_logit_chunks(
  config: LlamaConfig,
  params,
  h_BxTxD: jax.Array,
  targets_BxT: jax.Array,
  fn: Callable[[jax.Array, jax.Array], object],
  chunk: int = LOGIT_CHUNK,
):
  """Final norm + LM head on chunks of ``chunk`` positions; ``fn(logits_BxCxV, targets_BxC)``
  returns a pytree of [B, C] arrays, given back as [B, T] arrays (padding removed)."""
  b, t, d = h_BxTxD.shape
  h = rms_norm(h_BxTxD, params["final_norm"], config.norm_eps)
  w_DxV = params["embed"].T if config.tie_embeddings else params["lm_head"]
  chunk = min(chunk, t)
  pad = (-t) % chunk
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  tg = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  h_NxBxCxD = h.reshape(b, n, chunk, d).swapaxes(0, 1)
  tg_NxBxC = tg.reshape(b, n, chunk).swapaxes(0, 1)

  def one(args):
    h_c, tg_c = args
    logits = jnp.einsum(
      "bcd,dv->bcv", h_c, w_DxV.astype(h_c.dtype), preferred_element_type=jnp.float32
    )
    return fn(logits, tg_c)

  out = jax.lax.map(one, (h_NxBxCxD, tg_NxBxC))
  return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], out)
