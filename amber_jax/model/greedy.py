"""Greedy generation: sparse (per plan) prefill, then dense decode against the KV cache."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import decode_step, prefill

if TYPE_CHECKING:  # plan.py imports model.config; avoid the cycle at runtime.
  from amber_jax.plan.schema import SparsityPlan


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "dtype"))
def generate_greedy(
  params,
  prompt_BxT: jax.Array,
  *,
  config: LlamaConfig,
  max_new_tokens: int,
  plan: SparsityPlan | None = None,
  dtype=jnp.float32,
  start_B: jax.Array | None = None,
) -> jax.Array:
  """Greedy continuation [B, max_new_tokens] of equal-length (or left-padded) prompts.

  ``start_B`` marks left padding: row b's prompt is ``prompt_BxT[b, start_B[b]:]`` (see
  :func:`amber_jax.model.llama.prefill`); each row then generates what it would alone.

  Deterministic: argmax with ties to the lowest token id, no sampling state.
  Stop tokens are not special-cased (callers trim at EOS), so every row has the
  same length and the whole loop is one compiled ``lax.scan``.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  t = prompt_BxT.shape[1]
  # The last generated token is never fed back: the attention spans t + max_new_tokens - 1.
  config.check_seq_len(t + max_new_tokens - 1)
  logits, cache = prefill(
    params,
    prompt_BxT,
    config=config,
    plan=plan,
    max_len=t + max_new_tokens,
    dtype=dtype,
    start_B=start_B,
  )
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token_B, cache = carry
    logits, cache = decode_step(
      params, token_B[:, None], cache, config=config, plan=plan, dtype=dtype
    )
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, cache), token_B

  (last, _), tokens = jax.lax.scan(step, (first, cache), None, length=max_new_tokens - 1)
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)
