"""The mixture-of-experts MLP of Qwen3-MoE: a dense router, then grouped experts.

Each token's router logits (a plain float linear, never transformed: the router is not a site)
go through a float32 softmax over all experts; the top ``n_active`` are kept (renormalised to
sum to 1 with ``norm_topk_prob``), as transformers' ``Qwen3MoeTopKRouter``. The token-expert
assignments are then sorted by expert, so that each expert site (gate, up, down) is one grouped
matmul over the routed rows (``amber_jax.core.linear.grouped_dot``, ragged_dot semantics):
the work follows the ``T * n_active`` assignments, never all E experts. The outputs are
weighted and summed back per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amber_jax.core.linear import ExpertRows
from amber_jax.model.config import MixtureOfExperts


def route(x_NxD: jax.Array, router_DxE: jax.Array, moe: MixtureOfExperts):
  """(weights [N, k] in x's dtype, expert ids int32 [N, k]) of each token's top-k experts."""
  logits = jnp.einsum("nd,de->ne", x_NxD, router_DxE.astype(x_NxD.dtype))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_p, top_e = jax.lax.top_k(probs, moe.n_active)
  if moe.norm_topk_prob:
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  return top_p.astype(x_NxD.dtype), top_e.astype(jnp.int32)


def dispatch(top_e_NxK: jax.Array, n_experts: int) -> tuple[jax.Array, ExpertRows]:
  """(order [N*k]: the assignments sorted by expert, stably; their ``ExpertRows``)."""
  flat = top_e_NxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
  return order, ExpertRows(group_sizes=sizes, expert_ids=flat[order])


def _every_expert(top_p_NxK, top_e_NxK, n_experts: int):
  """``moe.dispatch == "every"``: (per-row weights [E*N], rows, token of each row), every
  token once per expert, weighted 0 where the router did not pick that expert."""
  n = top_e_NxK.shape[0]
  picked = top_e_NxK[None, :, :] == jnp.arange(n_experts)[:, None, None]  # [E, N, k]
  gain = jnp.sum(jnp.where(picked, top_p_NxK[None], 0), axis=-1).reshape(-1)
  sizes = jnp.full((n_experts,), n, jnp.int32)
  rows = ExpertRows(group_sizes=sizes, expert_ids=jnp.repeat(jnp.arange(n_experts), n))
  return gain, rows, jnp.tile(jnp.arange(n), n_experts)


def moe_mlp(
  x_BxTxD: jax.Array, router_DxE: jax.Array, moe: MixtureOfExperts, expert_lin, gate_act=None
):
  """The MoE MLP's output [B, T, D]. ``expert_lin(rows_RxI, name, ExpertRows)`` is the
  layer's injection point for the expert sites ("gate", "up", "down"); ``gate_act`` the gated
  activation (default silu; the model passes its CATS-thresholded one)."""
  gate_act = jax.nn.silu if gate_act is None else gate_act
  b, t, d = x_BxTxD.shape
  x = x_BxTxD.reshape(b * t, d)
  top_p, top_e = route(x, router_DxE, moe)
  if moe.dispatch == "every":
    gain, rows, token = _every_expert(top_p, top_e, moe.n_experts)
  else:
    order, rows = dispatch(top_e, moe.n_experts)
    token = order // moe.n_active  # the token of each sorted assignment
    gain = jnp.take(top_p.reshape(-1), order)
  xs = jnp.take(x, token, axis=0)
  hidden = gate_act(expert_lin(xs, "gate", rows)) * expert_lin(xs, "up", rows)
  y = expert_lin(hidden, "down", rows) * gain[:, None].astype(x.dtype)
  out = jnp.zeros_like(x).at[token].add(y.astype(x.dtype))
  return out.reshape(b, t, d)
