"""Llama-family decoder (Llama, Llama-3, Mistral, Qwen2, SmolLM2) as pure functions."""

from amber_jax.model.config import PROJECTIONS, LlamaConfig, RopeScaling
from amber_jax.model.greedy import generate_greedy
from amber_jax.model.llama import (
  KVCache,
  decode_step,
  forward,
  forward_hidden,
  lm_head,
  model_pass,
  prefill,
  prefill_hidden,
)

__all__ = [
  "PROJECTIONS",
  "KVCache",
  "LlamaConfig",
  "RopeScaling",
  "decode_step",
  "forward",
  "forward_hidden",
  "generate_greedy",
  "prefill",
  "prefill_hidden",
  "lm_head",
  "model_pass",
]
