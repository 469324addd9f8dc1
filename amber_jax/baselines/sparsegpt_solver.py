"""SparseGPT's solver for one linear (Frantar & Alistarh, arXiv 2301.00774): prune to N:M or an
unstructured sparsity with optimal-brain-surgeon (OBS) updates of the weights not yet pruned.

It follows ``fasterprune`` of the reference code (github.com/IST-DASLab/sparsegpt) step by step,
with our weight layout ``[d_in, d_out]`` (the reference's ``W`` is its transpose; the solver
works on that transpose internally so that the code reads like the reference) and our pattern
convention (N:M keeps N of every M consecutive inputs, so M - N are pruned per group):

1. dead inputs (``H[j, j] == 0``) get ``H[j, j] = 1`` and zero weights;
2. ``H += damp * mean(diag H) * I``; ``U`` = the upper Cholesky factor of ``H^-1``;
3. column blocks of ``block_columns(...)`` inputs; inside a block, column by column: for N:M,
   at the first column of each group of M the M - N entries of each output with the smallest
   ``w^2 / U[j, j]^2`` (on the weights as updated so far) are pruned; for unstructured pruning
   the block's mask is chosen at its start: the ``int(block_elems * sparsity)`` entries of the
   block (all its outputs together) with the smallest ``w^2 / U[j, j]^2``; then
   ``err = (w - q) / U[i, i]`` and the remaining columns of the block take ``-= err * U[i, :]``;
   after the block, the later columns take ``-= Err @ U[block, later]`` (the lazy update).

One deliberate difference: the reference prunes ``tmp <= sort(tmp)[k]``, that is k + 1 entries
per block; here exactly ``k = int(block_elems * sparsity)`` are pruned (ties: the lower flat
index first), so the kept share is exact, as in ``weight_masks.unstructured_weight_mask``.

``sparsegpt_prune`` is jitted (a static loop over blocks, ``lax.fori_loop`` over each block's
columns, float32, matmuls at HIGHEST precision); ``sparsegpt_prune_reference`` is a direct
float64 numpy loop without the lazy block updates (mathematically the same result).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.baselines.weight_masks import check_pattern_or_sparsity
from amber_jax.core.patterns import NMPattern

# TPUs and GPUs would otherwise run float32 matmuls in bf16 / TF32 passes, far from the float64
# reference after a few blocks of updates.
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SparseGPTResult:
  """The result of ``sparsegpt_prune``.

  ``weight``: [d_in, d_out] float32, pruned and OBS-updated, zero where ``mask`` is False;
  ``mask``: bool [d_in, d_out], True = kept; ``loss``: float32 scalar, the summed OBS loss
  ``sum((w - q)^2 / U[i, i]^2) / 2``.
  """

  weight: jax.Array
  mask: jax.Array
  loss: jax.Array


def block_columns(d_in: int, block_size: int, pattern: NMPattern | None) -> int:
  """Columns per lazy-update block: the largest ``b <= block_size`` dividing ``d_in`` (so all
  blocks are equal and the unstructured per-block share is the same everywhere) that, for N:M,
  is also a multiple of M (no group of M straddles two blocks). With a ``block_size`` below M the
  block is M itself, the smallest that keeps groups whole. ValueError unless block_size >= 1."""
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  step = 1 if pattern is None else pattern.m
  for b in range(min(int(block_size), d_in) // step * step, 0, -step):
    if d_in % b == 0:
      return b
  return step  # only for N:M with block_size < M (M divides d_in, checked before)


def _check(w_IxO, hessian_IxI, pattern, sparsity, damp):
  pattern, sparsity = check_pattern_or_sparsity(pattern, sparsity)
  if np.ndim(w_IxO) != 2 or 0 in np.shape(w_IxO):
    raise ValueError(f"w_IxO must be a non-empty [d_in, d_out] matrix, got {np.shape(w_IxO)}")
  d_in = np.shape(w_IxO)[0]
  if np.shape(hessian_IxI) != (d_in, d_in):
    raise ValueError(
      f"hessian_IxI must have shape ({d_in}, {d_in}) (the weight's d_in), got "
      f"{np.shape(hessian_IxI)}"
    )
  if pattern is not None and d_in % pattern.m:
    raise ValueError(f"pattern {pattern}: M={pattern.m} must divide d_in={d_in}")
  if isinstance(damp, bool) or not isinstance(damp, (int, float, np.number)) or not damp > 0:
    raise ValueError(f"damp must be > 0 (a share of the Hessian's mean diagonal), got {damp!r}")
  return pattern, sparsity


def _not_positive_definite(d_in, damp):
  return ValueError(
    f"Hessian of width d_in={d_in} is not positive definite after dampening damp={damp}: too "
    "few calibration tokens (or increase damp)"
  )


def _upper_inverse_factor(h, damp):
  """(live: bool [d_in], inputs with a nonzero Hessian diagonal; U: the upper Cholesky factor
  of (H + damp * mean(diag H) * I)^-1, NaN where H is not positive definite)."""
  d = h.shape[0]
  eye = jnp.eye(d, dtype=h.dtype)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(h.dtype))  # H[dead, dead] = 1
  h = h + damp * jnp.mean(jnp.diag(h)) * eye
  low = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((low, True), eye)  # torch.cholesky_inverse
  return ~dead, jnp.linalg.cholesky(h_inv).T


def _group_prune(tmp, n_prune):
  """bool, the ``n_prune`` smallest of each row of ``tmp`` (ties: the lower index)."""
  ranks = jnp.argsort(jnp.argsort(tmp, axis=-1, stable=True), axis=-1, stable=True)
  return ranks < n_prune


@functools.partial(jax.jit, static_argnames=("pattern", "sparsity", "block"))
def _solve(w_OxI, h, damp, *, pattern, sparsity, block):
  rows, d = w_OxI.shape
  live, u = _upper_inverse_factor(h, damp)
  w = jnp.where(live[None, :], w_OxI, 0.0)
  prune_blocks, loss = [], jnp.zeros((), jnp.float32)
  for i1 in range(0, d, block):
    i2 = i1 + block  # block divides d
    w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
    diag1 = jnp.diag(u1)
    if pattern is None:
      tmp = w1**2 / diag1[None, :] ** 2
      k = int(tmp.size * sparsity)
      prune1 = _group_prune(tmp.reshape(-1), k).reshape(rows, block)
    else:
      prune1 = jnp.zeros((rows, block), bool)

    def column(i, carry, u1=u1, diag1=diag1):
      w1, q1, err1, prune1, loss = carry
      if pattern is not None:
        m = pattern.m

        def choose(prune1):
          # From the weights as updated by the columns before i, as the reference does.
          group = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2
          group = group / jax.lax.dynamic_slice(diag1, (i,), (m,))[None, :] ** 2
          return jax.lax.dynamic_update_slice(prune1, _group_prune(group, m - pattern.n), (0, i))

        prune1 = jax.lax.cond(i % m == 0, choose, lambda p: p, prune1)
      col = w1[:, i]
      d_i = u1[i, i]
      q = jnp.where(prune1[:, i], 0.0, col)
      loss = loss + jnp.sum((col - q) ** 2) / d_i**2 / 2
      err = (col - q) / d_i
      # U is upper triangular: its row i is 0 before column i, so the update touches only the
      # columns from i on, as the reference's W1[:, i:] -= err * U1[i, i:].
      w1 = w1 - err[:, None] * u1[i][None, :]
      return w1, q1.at[:, i].set(q), err1.at[:, i].set(err), prune1, loss

    zeros = jnp.zeros_like(w1)
    _, q1, err1, prune1, loss = jax.lax.fori_loop(
      0, block, column, (w1, zeros, zeros, prune1, loss)
    )
    w = w.at[:, i1:i2].set(q1)
    if i2 < d:
      w = w.at[:, i2:].add(-jnp.matmul(err1, u[i1:i2, i2:], precision=_HI))
    prune_blocks.append(prune1)
  keep = ~jnp.concatenate(prune_blocks, axis=1)
  inputs_finite = jnp.isfinite(w_OxI).all() & jnp.isfinite(h).all()
  return w, keep, loss, inputs_finite, jnp.isfinite(u).all() & jnp.isfinite(w).all()


def sparsegpt_prune(
  w_IxO,
  hessian_IxI,
  *,
  pattern: NMPattern | str | None = None,
  sparsity: float | None = None,
  damp: float = 0.01,
  block_size: int = 128,
) -> SparseGPTResult:
  """SparseGPT on one weight ``w_IxO`` [d_in, d_out] given ``hessian_IxI`` = X^T X of its
  calibration inputs X [tokens, d_in] (any positive scale: only ``damp`` is relative to it, a
  share of its mean diagonal), to an N:M ``pattern`` (keep N of every M consecutive inputs per
  output) or an unstructured ``sparsity`` in (0, 1) (exactly one). ``block_size`` bounds the
  lazy-update block (see ``block_columns``).

  Raises ValueError naming the argument for bad input, and for a Hessian that is not positive
  definite after dampening (too few calibration tokens for its width) instead of returning NaN
  weights. That check needs concrete values: under an outer ``jax.jit`` it is skipped.
  """
  pattern, sparsity = _check(w_IxO, hessian_IxI, pattern, sparsity, damp)
  d_in = np.shape(w_IxO)[0]
  w, keep, loss, inputs_finite, finite = _solve(
    jnp.asarray(w_IxO, jnp.float32).T,
    jnp.asarray(hessian_IxI, jnp.float32),
    jnp.float32(damp),
    pattern=pattern,
    sparsity=sparsity,
    block=block_columns(d_in, block_size, pattern),
  )
  if not isinstance(finite, jax.core.Tracer):
    if not bool(inputs_finite):
      raise ValueError("w_IxO and hessian_IxI must be finite, got NaN or inf entries")
    if not bool(finite):
      raise _not_positive_definite(d_in, damp)
  return SparseGPTResult(weight=w.T, mask=keep.T, loss=loss)


def sparsegpt_prune_reference(
  w_IxO,
  hessian_IxI,
  *,
  pattern: NMPattern | str | None = None,
  sparsity: float | None = None,
  damp: float = 0.01,
  block_size: int = 128,
):
  """The same pruning as a direct float64 numpy loop, for tests: after each column every later
  column is updated (no lazy blocks); the unstructured mask is chosen at the start of each block
  of ``block_columns(d_in, block_size, pattern)`` columns from the weights as updated so far.
  Returns (weight [d_in, d_out] float64, keep-mask bool [d_in, d_out], loss float)."""
  pattern, sparsity = _check(w_IxO, hessian_IxI, pattern, sparsity, damp)
  w = np.array(w_IxO, np.float64).T.copy()  # [d_out, d_in], the reference's layout
  h = np.array(hessian_IxI, np.float64)
  rows, d = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += damp * np.mean(np.diag(h)) * np.eye(d)
  try:
    low_inv = np.linalg.inv(np.linalg.cholesky(h))
    u = np.linalg.cholesky(low_inv.T @ low_inv).T  # upper factor of H^-1
  except np.linalg.LinAlgError as e:
    raise _not_positive_definite(d, damp) from e
  block = block_columns(d, block_size, pattern)
  diag = np.diag(u)
  prune = np.zeros_like(w, bool)
  loss = 0.0
  for i in range(d):
    if pattern is None and i % block == 0:
      tmp = (w[:, i : i + block] ** 2 / diag[None, i : i + block] ** 2).reshape(-1)
      flat = np.zeros(tmp.size, bool)
      flat[np.argsort(tmp, kind="stable")[: int(tmp.size * sparsity)]] = True
      prune[:, i : i + block] = flat.reshape(rows, block)
    if pattern is not None and i % pattern.m == 0:
      m = pattern.m
      tmp = w[:, i : i + m] ** 2 / diag[None, i : i + m] ** 2
      order = np.argsort(tmp, axis=1, kind="stable")[:, : m - pattern.n]
      group = np.zeros_like(tmp, bool)
      np.put_along_axis(group, order, True, axis=1)
      prune[:, i : i + m] = group
    q = np.where(prune[:, i], 0.0, w[:, i])
    loss += np.sum((w[:, i] - q) ** 2) / u[i, i] ** 2 / 2
    err = (w[:, i] - q) / u[i, i]
    w[:, i + 1 :] -= np.outer(err, u[i, i + 1 :])
    w[:, i] = q
  return w.T, ~prune.T, float(loss)
