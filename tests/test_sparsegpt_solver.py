"""SparseGPT's solver on one random linear: the jitted lazy-block solve against the direct
float64 OBS loop, the N:M and unstructured invariants, the OBS update's benefit, dead inputs and
bad input."""

from __future__ import annotations

import numpy as np
import pytest

from amber_jax.baselines.sparsegpt_solver import (
  block_columns,
  sparsegpt_prune,
  sparsegpt_prune_reference,
)
from amber_jax.core.patterns import NMPattern

D_IN, D_OUT, TOKENS = 64, 48, 256
OUTLIERS = [3, 17, 40]  # input channels scaled up, as LLM activations have


def _inputs(tokens=TOKENS, d_in=D_IN, seed=0):
  rng = np.random.default_rng(seed)
  # Correlated channels (a random mixing), so that the OBS updates move the weights a lot and
  # the lazy-block order of updates is tested against the direct one.
  mix = np.eye(d_in) + 0.3 * rng.standard_normal((d_in, d_in))
  x = rng.standard_normal((tokens, d_in)) @ mix
  x[:, [c for c in OUTLIERS if c < d_in]] *= 10.0
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
  x = _inputs()
  w = np.random.default_rng(1).standard_normal((D_IN, D_OUT)).astype(np.float32)
  return x, w, x.T @ x


def _compare(got, want_w, want_mask, want_loss, what):
  got_w, got_mask = np.asarray(got.weight, np.float64), np.asarray(got.mask)
  assert got.weight.shape == want_w.shape and got_mask.dtype == bool
  flipped = (got_mask != want_mask).mean()
  assert flipped <= 0.01, f"{what}: {flipped:.3%} of the mask differs from the reference"
  if flipped == 0:  # a flipped near-tie changes every later update of its output
    err = np.abs(got_w - want_w).max()
    scale = np.abs(want_w).max()
    assert err <= 2e-5 * scale, f"{what}: max weight difference {err:.2e} (max |w| {scale:.2f})"
    np.testing.assert_allclose(float(got.loss), want_loss, rtol=1e-4, err_msg=what)
  assert (got_w[~got_mask] == 0).all(), what
  assert np.isfinite(got_w).all(), what


@pytest.mark.parametrize(
  "pattern, block_size",
  [("2:4", 128), ("2:4", 16), ("4:8", 32), ("1:4", 8), ("3:4", 32)],
)
def test_nm_matches_direct_obs_loop(data, pattern, block_size):
  _, w, h = data
  got = sparsegpt_prune(w, h, pattern=pattern, block_size=block_size)
  _compare(got, *sparsegpt_prune_reference(w, h, pattern=pattern, block_size=block_size), pattern)
  p = NMPattern.parse(pattern)
  kept = np.asarray(got.mask).reshape(D_IN // p.m, p.m, D_OUT).sum(axis=1)
  assert (kept == p.n).all(), f"{pattern}: kept per group of {p.m} inputs: {np.unique(kept)}"


@pytest.mark.parametrize("sparsity, block_size", [(0.5, 16), (0.3, 128), (0.3, 24)])
def test_unstructured_matches_direct_obs_loop(data, sparsity, block_size):
  _, w, h = data
  got = sparsegpt_prune(w, h, sparsity=sparsity, block_size=block_size)
  want = sparsegpt_prune_reference(w, h, sparsity=sparsity, block_size=block_size)
  _compare(got, *want, f"sparsity {sparsity}")
  block = block_columns(D_IN, block_size, None)
  elems = block * D_OUT
  mask = np.asarray(got.mask)
  for i in range(0, D_IN, block):
    # Kept share exactly 1 - int(elems * sparsity) / elems in every block (counted: exact).
    kept = int(mask[i : i + block].sum())
    assert kept == elems - int(elems * sparsity), f"block at input {i}: {kept} of {elems} kept"


def test_block_columns():
  two_four, four_eight = NMPattern.parse("2:4"), NMPattern.parse("4:8")
  assert block_columns(64, 128, None) == 64
  assert block_columns(64, 24, None) == 16  # the largest divisor of d_in up to block_size
  assert block_columns(60, 128, two_four) == 60
  assert block_columns(96, 40, four_eight) == 32  # a divisor of 96 and a multiple of 8
  assert block_columns(64, 3, four_eight) == 8  # never below M: groups stay whole
  with pytest.raises(ValueError, match="block_size"):
    block_columns(64, 0, None)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_obs_update_beats_magnitude_pruning(data, pattern):
  x, w, h = data
  p = NMPattern.parse(pattern)
  got = sparsegpt_prune(w, h, pattern=pattern)
  # Magnitude N:M: the N largest |w| of every M inputs per output, no update.
  groups = np.abs(w).reshape(D_IN // p.m, p.m, D_OUT)
  ranks = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable")
  magnitude = np.where((ranks < p.n).reshape(D_IN, D_OUT), w, 0)
  dense = x @ w
  err_obs = np.linalg.norm(dense - x @ np.asarray(got.weight))
  err_magnitude = np.linalg.norm(dense - x @ magnitude)
  err_same_mask = np.linalg.norm(dense - x @ np.where(np.asarray(got.mask), w, 0))
  assert err_obs < err_magnitude, f"{pattern}: OBS {err_obs:.1f} vs magnitude {err_magnitude:.1f}"
  assert err_obs < err_same_mask, f"{pattern}: the update must help on its own mask"


def test_dead_input_channel_is_zeroed(data):
  x, w, _ = data
  x = x.copy()
  x[:, 5] = 0.0
  h = x.T @ x
  for kwargs in ({"pattern": "2:4"}, {"sparsity": 0.5}):
    got = sparsegpt_prune(w, h, **kwargs)
    weight = np.asarray(got.weight)
    assert np.isfinite(weight).all() and np.isfinite(float(got.loss)), kwargs
    assert (weight[5] == 0).all(), kwargs
    _compare(got, *sparsegpt_prune_reference(w, h, **kwargs), f"dead input {kwargs}")


def test_too_few_tokens_raises_or_stays_finite():
  x = _inputs(tokens=3)
  w = np.random.default_rng(2).standard_normal((D_IN, D_OUT)).astype(np.float32)
  try:
    got = sparsegpt_prune(w, x.T @ x, pattern="2:4", damp=1e-12)
  except ValueError as e:
    assert "not positive definite after dampening damp=1e-12" in str(e)
    assert "too few calibration tokens" in str(e)
  else:
    assert np.isfinite(np.asarray(got.weight)).all() and np.isfinite(float(got.loss))


def test_nan_hessian_raises_not_nan(data):
  _, w, _ = data
  with pytest.raises(ValueError, match="w_IxO and hessian_IxI must be finite"):
    sparsegpt_prune(w, np.full((D_IN, D_IN), np.nan, np.float32), pattern="2:4")


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"sparsity": 0.0}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": 1.5}, r"sparsity must be in \(0, 1\)"),
    ({"pattern": "2:4", "sparsity": 0.5}, r"exactly one of pattern .* and sparsity"),
    ({}, r"exactly one of pattern .* and sparsity"),
    ({"pattern": "4:4"}, r"1 <= N < M"),
    ({"pattern": "2:4", "damp": 0.0}, r"damp must be > 0"),
    ({"pattern": "2:4", "damp": -1.0}, r"damp must be > 0"),
    ({"pattern": "2:4", "block_size": 0}, r"block_size must be >= 1"),
  ],
)
def test_bad_arguments(data, kwargs, match):
  _, w, h = data
  for prune in (sparsegpt_prune, sparsegpt_prune_reference):
    with pytest.raises(ValueError, match=match):
      prune(w, h, **kwargs)


def test_bad_shapes(data):
  _, w, h = data
  w66 = np.ones((66, D_OUT), np.float32)
  with pytest.raises(ValueError, match=r"pattern 2:4: M=4 must divide d_in=66"):
    sparsegpt_prune(w66, np.eye(66, dtype=np.float32), pattern="2:4")
  with pytest.raises(ValueError, match=r"hessian_IxI must have shape \(64, 64\).*\(48, 48\)"):
    sparsegpt_prune(w, h[:48, :48], pattern="2:4")
  with pytest.raises(ValueError, match=r"w_IxO must be a non-empty \[d_in, d_out\] matrix"):
    sparsegpt_prune(w[:, 0], h, pattern="2:4")
