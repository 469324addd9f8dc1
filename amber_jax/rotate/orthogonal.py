"""Exact orthogonal changes of basis of a Llama-family model's params (QuaRot-style folding).

Each function returns params that compute the same function (up to float rounding) with a
different basis at one place, so the N:M groups of the sites reading that place see
different channels:

* ``rotate_residual(Q)``: the residual stream h -> h Q. Every weight that writes it (the
  embedding, the sites with ``writes == "residual"``: o and down) right-multiplies by Q; every
  weight that reads the normed stream (the sites with ``folds_into``, the router, the LM head)
  left-multiplies by Q^T. Needs the norms folded first (``amber_jax.rotate.fold``).
  Inference cost: none.
* ``rotate_heads(R)``: each value head's output v_g -> v_g R_g (v's output columns), and each
  query head h of group g reads its attention output through R_g^T (o's input rows of head h).
  Attention mixes value vectors over positions only, so the rotation passes through it.
  Inference cost: none.
* ``permute_mlp_hidden(perm)``: the MLP's hidden channels reordered (gate and up output
  columns, down input rows). Inference cost: none.
* ``hadamard_mlp_hidden(signs)``: down's input x -> (x * s) H / sqrt(n), the signs folded into
  up's columns and H^T diag(s) into down's rows; the model applies the Hadamard transform
  online (``LlamaConfig.mlp_hidden_hadamard``), a cost measured in BENCHMARKS.md.

Products are taken in float64 on the host, one leaf at a time, and cast back to each leaf's
dtype: the rotated float32 weights are then the correctly rounded ones, and the dense model's
float32 logits move by rounding in the forward pass only (``amber_jax.rotate.dense_logit_gap``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.core.hadamard import hadamard_matrix
from amber_jax.model.config import LlamaConfig
from amber_jax.rotate.fold import norms_folded


def check_orthogonal(q: np.ndarray, n: int, *, arg: str, atol: float = 1e-4) -> np.ndarray:
  """``q`` as float64 if it is [..., n, n] and orthogonal to ``atol``, else ValueError."""
  q = np.asarray(q, np.float64)
  if q.shape[-2:] != (n, n):
    raise ValueError(f"{arg} must be [..., {n}, {n}], got shape {q.shape}")
  err = np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(n)).max()
  if not err <= atol:
    raise ValueError(f"{arg} is not orthogonal: max |Q^T Q - I| = {err:.2e} > {atol:g}")
  return q


def _f64(a) -> np.ndarray:
  return np.asarray(a, np.float64)


def _cast(new, like):
  return jnp.asarray(np.asarray(new).astype(like.dtype))


def rotate_residual(params, config: LlamaConfig, q_DxD: np.ndarray) -> dict:
  """``params`` with the residual stream rotated by the orthogonal ``q_DxD`` (module docstring).
  ValueError unless the norms are folded (``fold_norms``) and ``q_DxD`` is orthogonal."""
  q = check_orthogonal(q_DxD, config.d_model, arg="q_DxD")
  check_residual_rotatable(params, config)
  return _residual_rotated(params, config, q, np, _f64, _cast)


def rotate_residual_traced(params, config: LlamaConfig, q_DxD: jax.Array) -> dict:
  """``rotate_residual`` in float32 jnp, differentiable in ``q_DxD`` and usable under ``jit``
  (no checks: the caller checks the params once, ``check_residual_rotatable``, and keeps Q
  orthogonal by construction, e.g. a Cayley transform)."""
  to32 = lambda a: jnp.asarray(a).astype(jnp.float32)  # noqa: E731
  return _residual_rotated(
    params, config, q_DxD, jnp, to32, lambda new, like: new.astype(like.dtype)
  )


def check_residual_rotatable(params, config: LlamaConfig) -> None:
  """ValueError unless the norm weights are folded and the LM head is untied (``fold_norms``)."""
  if config.tie_embeddings or "lm_head" not in params or not norms_folded(params):
    raise ValueError(
      "rotate_residual needs the norm weights folded into their readers and an untied LM head: "
      "call amber_jax.rotate.fold.fold_norms first"
    )


def _residual_rotated(params, config, q, xp, up, cast) -> dict:
  """The residual rotation with array module ``xp``: ``up`` converts a leaf to the compute
  dtype, ``cast(new, like)`` back to the leaf's."""
  layers = dict(params["layers"])
  for site in config.sites:
    weights = dict(layers[site.name])
    w = weights["w"]
    if site.folds_into is not None:  # reads the normed stream: Q^T W
      weights["w"] = cast(xp.einsum("ji,...jo->...io", q, up(w)), w)
    if site.writes == "residual":  # adds to the stream: W Q (and its bias)
      weights["w"] = cast(up(weights["w"]) @ q, w)
      if "b" in weights:
        weights["b"] = cast(up(weights["b"]) @ q, weights["b"])
    layers[site.name] = weights
  if "router" in layers:
    r = layers["router"]
    layers["router"] = cast(xp.einsum("ji,ljo->lio", q, up(r)), r)
  embed, head = params["embed"], params["lm_head"]
  return {
    **params,
    "layers": layers,
    "embed": cast(up(embed) @ q, embed),
    "lm_head": cast(q.T @ up(head), head),
  }


def rotate_heads(params, config: LlamaConfig, r_LxGxHdxHd: np.ndarray) -> dict:
  """``params`` with value head g of layer l rotated by the orthogonal ``r[l, g]``
  [head_dim, head_dim] (v's output columns and bias) and o's input rows of every query head
  of that group rotated back (module docstring)."""
  c = config
  r = check_orthogonal(r_LxGxHdxHd, c.head_dim, arg="r_LxGxHdxHd")
  if r.shape[:2] != (c.n_layers, c.n_kv_heads):
    raise ValueError(
      f"r_LxGxHdxHd must be [n_layers={c.n_layers}, n_kv_heads={c.n_kv_heads}, {c.head_dim}, "
      f"{c.head_dim}], got {r.shape}"
    )
  layers = dict(params["layers"])
  v, o = dict(layers["v"]), dict(layers["o"])
  w_v = _f64(v["w"]).reshape(c.n_layers, c.d_model, c.n_kv_heads, c.head_dim)
  v["w"] = _cast(np.einsum("ldgi,lgij->ldgj", w_v, r).reshape(v["w"].shape), v["w"])
  if "b" in v:
    b = _f64(v["b"]).reshape(c.n_layers, c.n_kv_heads, c.head_dim)
    v["b"] = _cast(np.einsum("lgi,lgij->lgj", b, r).reshape(v["b"].shape), v["b"])
  group = np.arange(c.n_heads) // (c.n_heads // c.n_kv_heads)  # query head -> its value head
  r_q = r[:, group]  # [L, n_heads, hd, hd]
  w_o = _f64(o["w"]).reshape(c.n_layers, c.n_heads, c.head_dim, c.d_model)
  o["w"] = _cast(np.einsum("lhij,lhio->lhjo", r_q, w_o).reshape(o["w"].shape), o["w"])
  layers["v"], layers["o"] = v, o
  return {**params, "layers": layers}


def _mlp_sites(config: LlamaConfig) -> tuple[list[str], str]:
  """(the sites writing the MLP hidden activation, the one reading it)."""
  readers = [s.name for s in config.sites if s.reads == "mlp_hidden"]
  writers = [s.name for s in config.sites if s.reads == "mlp_norm"]
  if len(readers) != 1 or not writers:
    raise ValueError(f"expected one site reading the MLP hidden activation, got {readers}")
  return writers, readers[0]


def permute_mlp_hidden(params, config: LlamaConfig, perm: np.ndarray) -> dict:
  """``params`` with the MLP hidden channels reordered: new channel c is old ``perm[l, c]``
  (``perm`` int [L, d_ff], or [L, E, d_ff] per expert)."""
  perm = np.asarray(perm)
  width = config.mlp_width
  lead = (config.n_layers,) + ((config.moe.n_experts,) if config.moe is not None else ())
  if perm.shape not in ((config.n_layers, width), (*lead, width)):
    raise ValueError(f"perm must be [{', '.join(map(str, lead))}, {width}], got {perm.shape}")
  if not np.array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(width), perm.shape)):
    raise ValueError("perm must hold a permutation of 0..d_ff-1 in every row")
  writers, reader = _mlp_sites(config)
  layers = dict(params["layers"])
  for name in (*writers, reader):
    w = layers[name]["w"]
    p = jnp.asarray(perm.reshape(perm.shape[0], *([1] * (w.ndim - 1 - perm.ndim)), *perm.shape[1:]))
    if name == reader:  # rows
      new = jnp.take_along_axis(w, p[..., :, None], axis=-2)
    else:  # columns
      new = jnp.take_along_axis(w, p[..., None, :], axis=-1)
    layers[name] = {**layers[name], "w": new}
  return {**params, "layers": layers}


def hadamard_mlp_hidden(params, config: LlamaConfig, signs: np.ndarray) -> tuple[dict, LlamaConfig]:
  """(params, config) with down's input rotated by diag(s) H / sqrt(d_ff) (module docstring):
  ``signs`` [L, d_ff] of +-1 folded into up's columns, the rotation into down's rows, and
  ``config.mlp_hidden_hadamard`` set so the model applies H online."""
  if config.moe is not None:
    raise ValueError("hadamard_mlp_hidden: mixture-of-experts MLPs are not supported")
  if config.mlp_hidden_hadamard:
    raise ValueError("hadamard_mlp_hidden: this model's MLP hidden activation is already rotated")
  width = config.d_ff
  signs = np.asarray(signs, np.float64)
  if signs.shape != (config.n_layers, width) or not np.all(np.abs(signs) == 1):
    raise ValueError(f"signs must be [{config.n_layers}, {width}] of +-1, got shape {signs.shape}")
  writers, reader = _mlp_sites(config)
  gated = [s for s in writers if s != "gate"]  # the factor that multiplies silu(gate): up
  if len(gated) != 1:
    raise ValueError(f"expected gate and one other MLP input site, got {writers}")
  h = hadamard_matrix(width) / np.sqrt(width)
  layers = dict(params["layers"])
  up = layers[gated[0]]["w"]
  layers[gated[0]] = {**layers[gated[0]], "w": _cast(_f64(up) * signs[:, None, :], up)}
  down = layers[reader]["w"]
  rotated = np.einsum("ji,lj,ljo->lio", h, signs, _f64(down))  # H^T diag(s) W
  layers[reader] = {**layers[reader], "w": _cast(rotated, down)}
  return {**params, "layers": layers}, dataclasses.replace(config, mlp_hidden_hadamard=True)
