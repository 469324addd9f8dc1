"""Fold the RMSNorm weights into the linears that read them, so the residual stream can rotate.

An RMSNorm with weight g computes (x / rms(x)) * g. The weight is a diagonal scale of the
normalised vector, so it folds exactly into every linear that reads the norm's output: W'
= diag(g) W (the rows of each reading weight; the router of a mixture of experts too; the LM
head for the final norm). The norms are then weightless (g = 1), and a weightless RMSNorm
commutes with any orthogonal Q: rms(x Q) = rms(x), so norm(x Q) = norm(x) Q. That is what lets
``amber_jax.rotate.orthogonal.rotate_residual`` rotate the whole residual stream for free.

Folding changes no N:M choice either: a site's input channel j loses g_j and its weight row j
gains it, and the scores multiply |x_j| by a positively homogeneous row statistic of W
(``amber_jax.core.scores``).

A tied LM head (the embedding's transpose) stops being one: the head takes diag(g) E^T while
the embedding keeps E, so the folded params carry their own ``lm_head`` and the config says
``tie_embeddings=False`` (Vocabulary x d_model more parameters; 28 M for SmolLM2-135M).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from amber_jax.model.config import LlamaConfig

NORMS = ("attn_norm", "mlp_norm")


def _rows_scaled(w, g_Lxd):
  """``w`` [L, (E,) d_in, d_out] with row i of layer l scaled by g[l, i] (float64, host)."""
  g = np.asarray(g_Lxd, np.float64)
  g = g.reshape(g.shape[0], *([1] * (w.ndim - 3)), g.shape[1], 1)
  return np.asarray(w, np.float64) * g


def _as(new, like):
  return jnp.asarray(np.asarray(new).astype(like.dtype))


def norms_folded(params) -> bool:
  """True if every residual-stream RMSNorm weight of ``params`` is 1 (folded, or never set)."""
  leaves = [params["layers"][n] for n in NORMS] + [params["final_norm"]]
  return all(bool(jnp.all(jnp.asarray(g) == 1)) for g in leaves)


def fold_norms(params, config: LlamaConfig) -> tuple[dict, LlamaConfig]:
  """(params, config) computing the same function with every residual-stream norm weight
  folded into its readers (module docstring): the sites with ``folds_into``, the router, the
  LM head (untied). Leaves keep their dtypes; the products are taken in float64 on the host. Qwen3's
  per-head q/k norms read a projection's output, not the residual stream, and stay."""
  layers = dict(params["layers"])
  for site in config.sites:
    if site.folds_into is None:
      continue
    w = layers[site.name]["w"]
    layers[site.name] = {
      **layers[site.name],
      "w": _as(_rows_scaled(w, layers[site.folds_into]), w),
    }
  if "router" in layers:  # reads the MLP norm's output, as the expert sites do
    r = layers["router"]
    g = np.asarray(layers["mlp_norm"], np.float64)[..., None]
    layers["router"] = _as(np.asarray(r, np.float64) * g, r)
  for name in NORMS:
    layers[name] = jnp.ones_like(layers[name])
  head = params["embed"].T if config.tie_embeddings else params["lm_head"]
  g = np.asarray(params["final_norm"], np.float64)[:, None]
  out = {
    **params,
    "layers": layers,
    "final_norm": jnp.ones_like(params["final_norm"]),
    "lm_head": _as(np.asarray(head, np.float64) * g, head),
  }
  return out, dataclasses.replace(config, tie_embeddings=False)
