"""Building blocks of the Llama-family decoder: RMSNorm, RoPE, grouped-query attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.model.config import LlamaConfig, RopeScaling


def rms_norm(x_BxTxD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, cast back to the input dtype (HF Llama convention)."""
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  w_11D = w_D.astype(x_BxTxD.dtype).reshape((1,) * (x_BxTxD.ndim - 1) + (-1,))
  return x.astype(x_BxTxD.dtype) * w_11D


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim/2], with optional Llama-3 scaling (its parameters, or
  the per-frequency divisors a Llama-3.1 GGUF stores)."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if config.rope_scaling is not None:
    inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
  if config.rope_freq_factors is not None:
    inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
  return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  # Same piecewise rule as HF's _compute_llama3_parameters: long wavelengths are
  # divided by `factor`, short ones kept, and the band between interpolated.
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled)


def rope_tables(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, head_dim] for the rotate-half convention."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxHxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
  """Rotates query/key heads (HF rotate_half convention), in float32."""
  x = x_BxTxHxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]
  return out.astype(x_BxTxHxD.dtype)


def attention(
  q_BxTxHxD: jax.Array,
  k_BxSxKxD: jax.Array,
  v_BxSxKxD: jax.Array,
  mask_BxTxS: jax.Array,
) -> jax.Array:
  """Grouped-query attention; softmax in float32. Returns [B, T, H*D]."""
  b, t, h, d = q_BxTxHxD.shape
  kv_heads = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)
  logits_BxKxGxTxS = jnp.einsum(
    "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
  )
  logits_BxKxGxTxS = logits_BxKxGxTxS / np.sqrt(d).astype(np.float32)
  big_neg = jnp.finfo(jnp.float32).min
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, big_neg)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(b, t, h * d)
