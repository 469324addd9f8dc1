"""Channel orders: which input channels of a site share an N:M group.

By default a group is M consecutive input channels. For the o-projection those lie inside one
attention head (head_dim is a multiple of M), and heads differ a lot in output size from token
to token: a group inside a loud head must drop M - N large outputs, while a group inside a quiet
head keeps N near-zero ones. Grouping channels of different heads removes much of that loss. On
SmolLM2-135M (RESULTS.md "front-notes"), with a fixed random order of the o input per layer, the
KL cost of sparsifying one o site alone falls to a median 0.57x (0.17-1.04x over the 30 layers)
at 8:16 and 0.66x (0.18-0.85x) at 2:4, and the site search then sparsifies o in 26 layers
instead of 9. The same random order changes nothing for the residual-stream and MLP inputs
(output error 0.98-1.02x), whose neighbouring channels are not related
(``experiments/error_floor.py`` measures both).

The order is data of the plan (``SparsityPlan.channel_order``); the weights are untouched, only
which channels compete in a group changes. What it costs: the XLA path gathers the scores and
the mask (a [tokens, d] permutation per layer, no matmul work); a fused attention kernel can
write its output in that order directly, and the N:M matmul then reads the o weight with its
rows permuted once (``amber_jax.core.linear.site_linear`` permutes them per call on the Pallas
path).
"""

from __future__ import annotations

import numpy as np

from amber_jax.model.config import LlamaConfig

# "heads": the natural layout, groups of M consecutive channels of one head;
# "mixed": a fixed random permutation per layer (seeded), so groups mix heads.
O_ORDERS = ("heads", "mixed")


def check_o_order(o_order: str) -> str:
  """``o_order`` unchanged if it is one of ``O_ORDERS``, else ValueError listing them."""
  if o_order not in O_ORDERS:
    raise ValueError(f"o_order must be one of {', '.join(O_ORDERS)}, got {o_order!r}")
  return o_order


def mixed_order(n_layers: int, width: int, *, seed: int = 0) -> np.ndarray:
  """int32 [n_layers, width]: an independent random permutation per layer, reproducible
  from ``seed`` (layer l uses ``numpy.random.default_rng([seed, l])``). Plans store the
  orders they use, so a saved plan does not depend on numpy's generator staying the same."""
  return np.stack(
    [np.random.default_rng([seed, l]).permutation(width) for l in range(n_layers)]
  ).astype(np.int32)


def model_channel_order(
  config: LlamaConfig, o_order: str, *, seed: int = 0
) -> dict[str, np.ndarray] | None:
  """The plan's ``channel_order`` for ``o_order``: None for "heads" (natural order
  everywhere); for "mixed", a fixed random order of the input of every site whose input is
  concatenated attention heads (``Site.heads``; o for Llama: {"o": [L, n_heads * head_dim]})."""
  check_o_order(o_order)
  if o_order == "heads":
    return None
  return {s.name: mixed_order(config.n_layers, s.d_in, seed=seed) for s in config.sites if s.heads}
