"""Hadamard matrices and the fast orthonormal Hadamard transform along the last axis.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal
and spreads every coordinate evenly over all n outputs (QuaRot, arXiv 2404.00456). Sylvester's
construction gives the powers of two; model widths are often not one (SmolLM2: 576 = 72 x 8,
1536 = 12 x 128; Llama-3.1-8B's d_ff 14336 = 28 x 512; Qwen3-30B-A3B's expert width 768 =
12 x 64), so an order n = p * 2^k is built as the Kronecker product of a Paley matrix of order
p (Paley I for p - 1 a prime = 3 mod 4, Paley II for p / 2 - 1 a prime = 1 mod 4) and
Sylvester's of order 2^k, as QuaRot does with its stored matrices of order 12, 20, 28, ....

``hadamard_transform`` applies ``x @ hadamard_matrix(n) / sqrt(n)`` in O(n (p + log2 n))
operations per row: a p x p product on the Paley factor, then log2(2^k) butterfly stages on
the Sylvester factor (the fast Walsh-Hadamard transform). ``hadamard_reference`` is the dense
product it is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _is_prime(q: int) -> bool:
  return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = the Legendre symbol of (j - i) mod q, for a prime q."""
  squares = {(x * x) % q for x in range(1, q)}
  chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley(p: int) -> np.ndarray | None:
  """A Hadamard matrix of order p from Paley's constructions, or None if neither applies."""
  if p in (1, 2):
    return sylvester(p)
  q = p - 1
  if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1^T], [-1, Q]]
    s = np.zeros((p, p), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(p, dtype=np.int64)
  q = p // 2 - 1
  if p % 2 == 0 and q % 4 == 1 and _is_prime(q):  # Paley II: from the symmetric conference C
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
      np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )
  return None


def sylvester(n: int) -> np.ndarray:
  """Sylvester's Hadamard matrix of order ``n`` (a power of two), int64 +-1."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Sylvester's construction needs a power of two, got n={n}")
  h = np.ones((1, 1), np.int64)
  while len(h) < n:
    h = np.block([[h, h], [h, -h]])
  return h


@functools.lru_cache(maxsize=64)
def hadamard_factors(n: int) -> tuple[int, int]:
  """(p, 2^k) with n = p * 2^k, p the smallest order with a Paley matrix (1 for a power of
  two); ValueError naming n if no such split exists."""
  if not isinstance(n, int | np.integer) or n < 1:
    raise ValueError(f"a Hadamard order must be a positive int, got {n!r}")
  two = 1
  while n % (two * 2) == 0:
    two *= 2
  # p must be 1, 2 or a multiple of 4: try the odd part times 1, 2, 4, ..., up to the whole of n.
  p = n // two
  while True:
    if _paley(p) is not None:
      return p, n // p
    if p == n:
      break
    p *= 2
  raise ValueError(
    f"no Hadamard matrix of order {n} from Sylvester's and Paley's constructions (n = p * 2^k "
    "needs p = 1, 2, q + 1 for a prime q = 3 mod 4, or 2(q + 1) for a prime q = 1 mod 4)"
  )


def hadamard_matrix(n: int) -> np.ndarray:
  """A Hadamard matrix of order ``n`` (int64 +-1, H H^T = n I): Paley x Sylvester."""
  p, two = hadamard_factors(n)
  return np.kron(_paley(p), sylvester(two))


def hadamard_reference(x: jax.Array) -> jax.Array:
  """``x @ H / sqrt(n)`` along the last axis with the dense matrix (the plain reference)."""
  n = x.shape[-1]
  h = jnp.asarray(hadamard_matrix(n) / np.sqrt(n), jnp.float32)
  return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h).astype(x.dtype)


def hadamard_transform(x: jax.Array) -> jax.Array:
  """``x @ hadamard_matrix(n) / sqrt(n)`` along the last axis (n = x.shape[-1]), fast: the
  Paley factor (p x p) as a small product, the Sylvester factor as butterfly stages. Computed
  in float32, returned in x's dtype. The transform is orthogonal and symmetric up to the Paley
  factor, so its inverse is ``x @ H^T / sqrt(n)``."""
  n = x.shape[-1]
  p, two = hadamard_factors(n)
  lead = x.shape[:-1]
  y = x.astype(jnp.float32).reshape(*lead, p, two)
  if p > 1:  # row index of kron(P, S) is (a, b) -> a * two + b: P acts on a
    y = jnp.einsum("...ab,ac->...cb", y, jnp.asarray(_paley(p), jnp.float32))
  h = 1
  while h < two:  # butterflies on b: pairs (b, b + h) inside blocks of 2h
    y = y.reshape(*lead, p, two // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return (y.reshape(*lead, n) / np.sqrt(n)).astype(x.dtype)


def random_signs(n: int, *, seed: int) -> np.ndarray:
  """float64 [n] of +-1, reproducible from ``seed`` (a randomised Hadamard is diag(s) H)."""
  return np.where(np.random.default_rng(seed).random(n) < 0.5, -1.0, 1.0)
