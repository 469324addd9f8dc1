"""Configurations of well-known checkpoints (for coverage accounting and random-weight benchmarks).

These are the published shapes; no weights come with them. ``init_random_params``
draws weights of the right shapes, for throughput measurements where the values do
not matter (e.g. on a machine that cannot fetch the real checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amber_jax.model.config import LlamaConfig, MixtureOfExperts, RopeScaling

PRESETS: dict[str, LlamaConfig] = {
  "smollm2-135m": LlamaConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    rope_theta=100000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
  ),
  "llama-3.1-8b": LlamaConfig(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=14336,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(),
    norm_eps=1e-5,
    max_seq_len=131072,
  ),
  "qwen2-7b": LlamaConfig(
    vocab_size=152064,
    d_model=3584,
    n_layers=28,
    n_heads=28,
    n_kv_heads=4,
    head_dim=128,
    d_ff=18944,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    architecture="qwen2",
    max_seq_len=32768,
  ),
  "qwen2-0.5b": LlamaConfig(
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    d_ff=4864,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
    architecture="qwen2",
    max_seq_len=32768,
  ),
  "qwen3-8b": LlamaConfig(
    vocab_size=151936,
    d_model=4096,
    n_layers=36,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=12288,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    architecture="qwen3",
    max_seq_len=40960,
  ),
  "qwen3-30b-a3b": LlamaConfig(
    vocab_size=151936,
    d_model=2048,
    n_layers=48,
    n_heads=32,
    n_kv_heads=4,
    head_dim=128,
    d_ff=6144,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    moe=MixtureOfExperts(n_experts=128, n_active=8, d_ff=768, norm_topk_prob=True),
    architecture="qwen3_moe",
    max_seq_len=40960,
  ),
}


def preset(name: str) -> LlamaConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
  return PRESETS[name]


def init_random_params(config: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16) -> dict:
  """Random params in our layout (normal, std 0.02; norms 1), created on the default device."""
  keys = iter(jax.random.split(key, 4 * len(config.sites) + 8))
  L = config.n_layers

  def normal(*shape):
    return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  layers = {
    "attn_norm": jnp.ones((L, config.d_model), dtype),
    "mlp_norm": jnp.ones((L, config.d_model), dtype),
  }
  if config.qk_norm:
    layers["q_norm"] = jnp.ones((L, config.head_dim), dtype)
    layers["k_norm"] = jnp.ones((L, config.head_dim), dtype)
  for site in config.sites:
    experts = (site.experts,) if site.experts else ()
    layers[site.name] = {"w": normal(L, *experts, *site.shape)}
    if config.qkv_bias and site.name in ("q", "k", "v"):
      layers[site.name]["b"] = normal(L, site.d_out)
  if config.moe is not None:
    layers["router"] = normal(L, config.d_model, config.moe.n_experts)
  params = {
    "embed": normal(config.vocab_size, config.d_model),
    "layers": layers,
    "final_norm": jnp.ones((config.d_model,), dtype),
  }
  if not config.tie_embeddings:
    params["lm_head"] = normal(config.d_model, config.vocab_size)
  return params
