"""Rotation bases and channel orders: fixed (random, Hadamard) or from calibration statistics.

N:M sparsity keeps N of every M consecutive input channels, per token. After a change of
basis the question is which channels share a group. Two layouts of a basis whose channels are
ranked by calibrated energy (an eigenvalue of the input covariance, or a channel's mean x^2):

* "consecutive": groups of M consecutive ranks. The loudest group then holds the M loudest
  channels and must drop M - N of them.
* "strided" (``strided_order``): rank r goes to group r mod G, slot r // G (G = width / M
  groups), so every group holds one channel of each energy tier: its top N slots are the
  N * G loudest channels of the whole width, and what it drops is the quietest tiers. This is
  the order every calibrated basis here uses.

``collect_rotation_stats`` gathers what the calibrated bases need in one dense pass: the
covariance of the normed residual stream (what q/k/v/gate/up read, pooled over layers and both
norms: one Q serves every layer), the covariance of each value head's attention output
(o's input, pooled over the query heads of the group), and the energy of each MLP hidden
channel (down's input). Run it on folded params (``amber_jax.rotate.fold``): the folded
readers see the normed stream without the norm weights, which is what the rotation acts on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.harness import check_windows, site_records, windows_in_batches
from amber_jax.core.hadamard import hadamard_matrix, random_signs
from amber_jax.model.config import LlamaConfig


def strided_order(energy: np.ndarray, m: int) -> np.ndarray:
  """int32 [..., width]: position c = g * m + s holds the channel of rank s * G + g (ranks by
  descending ``energy`` along the last axis, G = width / m), so each group of m consecutive
  positions holds one channel of each of the m energy tiers (module docstring)."""
  energy = np.asarray(energy)
  width = energy.shape[-1]
  if m < 1 or width % m:
    raise ValueError(f"the group size m={m} must divide the width {width}")
  ranked = np.argsort(-energy, axis=-1, kind="stable")
  g, s = np.divmod(np.arange(width), m)  # position -> (group, slot)
  return np.take(ranked, s * (width // m) + g, axis=-1).astype(np.int32)


def pca_basis(cov: np.ndarray, m: int) -> np.ndarray:
  """float64 [..., n, n] orthogonal: the eigenvectors of the symmetric ``cov`` [..., n, n] as
  columns, laid out by ``strided_order`` of their eigenvalues."""
  cov = np.asarray(cov, np.float64)
  evals, evecs = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
  order = strided_order(evals, m)
  return np.take_along_axis(evecs, order[..., None, :], axis=-1)


def permutation_basis(order: np.ndarray) -> np.ndarray:
  """float64 [n, n]: the permutation matrix P with (x P)[c] = x[order[c]]."""
  n = len(order)
  p = np.zeros((n, n))
  p[order, np.arange(n)] = 1.0
  return p


def random_orthogonal(n: int, *, seed: int, lead: tuple[int, ...] = ()) -> np.ndarray:
  """float64 [*lead, n, n] Haar-random orthogonal matrices (QR of a Gaussian, signs fixed)."""
  z = np.random.default_rng(seed).normal(size=(*lead, n, n))
  q, r = np.linalg.qr(z)
  return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def random_hadamard(n: int, *, seed: int) -> np.ndarray:
  """float64 [n, n]: diag(s) H / sqrt(n), random signs s (QuaRot's randomised Hadamard)."""
  return random_signs(n, seed=seed)[:, None] * hadamard_matrix(n) / np.sqrt(n)


@dataclasses.dataclass(frozen=True)
class RotationStats:
  """Second moments of the dense model's activations over calibration tokens (float64)."""

  residual_cov: np.ndarray  # [D, D]: E[x x^T] of the normed residual stream, all layers
  head_cov: np.ndarray  # [L, n_kv_heads, head_dim, head_dim]: E[a a^T] of the attention output
  hidden_energy: np.ndarray  # [L, d_ff]: E[x_j^2] of the MLP hidden activation
  tokens: int


def _moments(name, x, config: LlamaConfig):
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  if name in ("q", "gate"):  # the normed stream, as the attention and MLP read it
    return jnp.einsum("ti,tj->ij", x, x)
  if name == "o":
    a = x.reshape(-1, config.n_kv_heads, config.n_heads // config.n_kv_heads, config.head_dim)
    return jnp.einsum("tgqi,tgqj->gij", a, a)
  if name == "down":
    return jnp.sum(x * x, axis=0)
  return None


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_moments(params, tokens_BxT, *, config, dtype):
  def hook(name, x, weights, row, linear):
    del weights, row
    return linear(x), _moments(name, x, config)

  return site_records(params, tokens_BxT, config=config, dtype=dtype, hook=hook)


def collect_rotation_stats(
  params,
  windows: np.ndarray,
  *,
  config: LlamaConfig,
  batch_size: int = 2,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> RotationStats:
  """``RotationStats`` of the dense model over ``windows`` [W, T] token ids (the module
  docstring says which activations; mixture-of-experts hidden activations are per expert and
  not collected: ``hidden_energy`` is then zeros)."""
  windows = check_windows(windows)
  c = config
  res = np.zeros((c.d_model, c.d_model))
  heads = np.zeros((c.n_layers, c.n_kv_heads, c.head_dim, c.head_dim))
  hidden = np.zeros((c.n_layers, c.d_ff))
  tokens = 0
  for rows in windows_in_batches(
    windows, batch_size, desc="rotation statistics", show_progress=show_progress
  ):
    rec = _batch_moments(params, rows, config=config, dtype=dtype)
    res += np.asarray(rec["q"], np.float64).sum(0) + np.asarray(rec["gate"], np.float64).sum(0)
    heads += np.asarray(rec["o"], np.float64)
    if c.moe is None:
      hidden += np.asarray(rec["down"], np.float64)
    tokens += int(rows.size)
  return RotationStats(
    residual_cov=res / (2 * c.n_layers * tokens),
    head_cov=heads / (tokens * (c.n_heads // c.n_kv_heads)),
    hidden_energy=hidden / tokens,
    tokens=tokens,
  )
