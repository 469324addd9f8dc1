"""Shared test setup: strict rank promotion (nanodo convention), the real-model cache dir, and
the tiny model configs and random weights several test files share.

Module-level constants are imported by the tests (``from conftest import TINY_CONFIG``: pytest
puts this directory on ``sys.path``); ``tiny_params`` is a fixture."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.model import LlamaConfig

# Implicit rank promotion hides shape bugs (a [B] array meeting a [B, T] one); make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops every compiled executable after each test module.

  XLA:CPU maps each executable's code on its own (about three memory mappings each). The whole
  suite in one process compiles enough to reach Linux's default ``vm.max_map_count`` (65530
  mappings, measured at 64274 just before): the next compile then fails to map its code and the
  process dies with a segmentation fault inside ``backend_compile`` (exit 139 in CI).
  ``jax.clear_caches`` releases them (measured: 300 executables, 966 mappings, all freed).
  """
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def cache_dir() -> pathlib.Path:
  """Where the real model and texts are fetched to: $AMBER_JAX_CACHE, else ~/.cache/amber_jax.

  Tests may read the environment; the library never does (it is given this path).
  """
  path = os.environ.get("AMBER_JAX_CACHE")
  path = pathlib.Path(path) if path else pathlib.Path.home() / ".cache" / "amber_jax"
  path.mkdir(parents=True, exist_ok=True)
  return path


# 2 layers, 4 query heads on 2 KV heads of width 8 (q 32 wide, k/v 16), d_ff 64: the calibration
# passes (site search, channel order, learned factors) on random weights (``tiny_params``).
TINY_CONFIG = LlamaConfig(
  vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
# The same shapes with a 64-token vocabulary: plan schema, checkpoints, sharding specs.
TINY_V64_CONFIG = dataclasses.replace(TINY_CONFIG, vocab_size=64)
# Wider heads (16: q 64 wide, k/v 32), d_ff 128, q/k/v biases: implementations and W8A8, with
# ``random_params`` weights.
SMALL_CONFIG = LlamaConfig(
  vocab_size=97,
  d_model=64,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  head_dim=16,
  d_ff=128,
  qkv_bias=True,
)
# SMALL_CONFIG without biases, its vocabulary covering the tiny HF tokenizer's 435 ids
# (tests/fixtures/hf/tiny-llama): multiple-choice scoring and the lm-eval adapter.
SMALL_TOKENIZER_CONFIG = dataclasses.replace(SMALL_CONFIG, vocab_size=448, qkv_bias=False)


def random_params(config: LlamaConfig, rng: np.random.Generator, scale: float = 0.2) -> dict:
  """float32 numpy weights N(0, scale) (norms 1 + N(0, scale)), drawn from ``rng`` in a fixed
  order (embed, final_norm, lm_head, the norms, then each projection's w and bias): larger than
  an initialisation, so that distributions are peaked and choices not decided by rounding.
  ``rng`` goes on from there (tests draw their tokens from it next)."""
  L, D, F, V = config.n_layers, config.d_model, config.d_ff, config.vocab_size
  q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim

  def w(*s):
    return rng.normal(size=s).astype(np.float32) * scale

  def proj(d_in, d_out, bias=False):
    return {"w": w(L, d_in, d_out), "b": w(L, d_out)} if bias else {"w": w(L, d_in, d_out)}

  return {
    "embed": w(V, D),
    "final_norm": 1 + w(D),
    "lm_head": w(D, V),
    "layers": {
      "attn_norm": 1 + w(L, D),
      "mlp_norm": 1 + w(L, D),
      "q": proj(D, q_dim, config.qkv_bias),
      "k": proj(D, kv_dim, config.qkv_bias),
      "v": proj(D, kv_dim, config.qkv_bias),
      "o": proj(q_dim, D),
      "gate": proj(D, F),
      "up": proj(D, F),
      "down": proj(F, D),
    },
  }


def init_params(config: LlamaConfig, seed: int = 0) -> dict:
  """Random float32 params in the library's layout (layers stacked on a leading axis), scaled
  as an initialisation (1/sqrt(fan-in)); no lm_head for tied embeddings."""
  rng = np.random.default_rng(seed)
  L, D = config.n_layers, config.d_model

  def normal(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  layers = {
    "attn_norm": 1.0 + normal(L, D, scale=0.1),
    "mlp_norm": 1.0 + normal(L, D, scale=0.1),
  }
  for proj, (d_in, d_out) in config.linear_shapes().items():
    layers[proj] = {"w": normal(L, d_in, d_out, scale=1.0 / math.sqrt(d_in))}
    if config.qkv_bias and proj in ("q", "k", "v"):
      layers[proj]["b"] = normal(L, d_out, scale=0.5)
  params = {
    "embed": normal(config.vocab_size, D),
    "layers": layers,
    "final_norm": 1.0 + normal(D, scale=0.1),
  }
  if not config.tie_embeddings:
    params["lm_head"] = normal(D, config.vocab_size, scale=1.0 / math.sqrt(D))
  return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="session")
def tiny_params() -> dict:
  """TINY_CONFIG's preset initialisation (key 0, float32) with the projection weights x 8 (a
  less flat model)."""
  from amber_jax.model.presets import init_random_params

  params = init_random_params(TINY_CONFIG, jax.random.key(0), dtype=jnp.float32)
  return jax.tree.map(lambda a: a * 8 if a.ndim == 3 else a, params)
