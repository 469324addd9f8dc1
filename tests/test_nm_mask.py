"""The standalone N:M mask kernel and the two-pass sparse matmul: interpret mode against
``sparsify`` / ``nm_matmul_reference``, the exact-N invariant, lowering, bad inputs.

Errors are reported, not only asserted: run with ``-s`` to see the ``[nm_mask] ...`` lines.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import selection_comparators, sparsify
from pallas_kernels.common import keep_from_group_slices, tile_scores
from pallas_kernels.nm_mask import (
  MaskBlockSizes,
  check_mask_block_sizes,
  default_mask_block_sizes,
  nm_mask,
  nm_matmul_two_pass,
)
from pallas_kernels.nm_matmul import nm_matmul_reference

cpu_interpret = pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="interpret-mode check: runs on CPU hosts"
)
BLOCKS = {
  "triton": MaskBlockSizes(block_m=32, block_k=256),
  "mosaic_tpu": MaskBlockSizes(block_m=16, block_k=256),
}


def _activation(shape, dtype, seed=0):
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
  # Exact ties inside groups exercise the lower-index rule.
  return x.at[:, 1].set(x[:, 0]).at[:, 18].set(-x[:, 17])


def _factors(k, seed=1):
  return jax.random.uniform(jax.random.key(seed), (k,), jnp.float32, 0.25, 4.0)


@pytest.mark.parametrize("method", ["pairwise", "threshold", "auto"])
@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
def test_keep_from_group_slices_equals_sparsify_for_every_n(m, method):
  """The in-kernel selection (pruned sorting network + tie count) on plain arrays, for every
  N, on scores with many exact ties (small integers) and +inf (from NaN)."""
  rng = np.random.default_rng(m)
  x = rng.integers(-3, 4, size=(64, 8 * m)).astype(np.float32)
  x[rng.random(x.shape) < 0.02] = np.nan
  x = jnp.asarray(x)
  for n in range(1, m):  # N < M
    parts = [x[:, p::m] for p in range(m)]
    keeps = keep_from_group_slices([tile_scores(xp, None) for xp in parts], n, method=method)
    keep = jnp.stack(keeps, axis=-1).reshape(x.shape)
    ref = sparsify(x, NMPattern.parse(f"{n}:{m}"))
    assert bool(jnp.array_equal(jnp.where(keep, x, 0.0), ref, equal_nan=True)), (n, m)
    assert int(keep.reshape(64, -1, m).sum(-1).min()) == n


def test_keep_from_group_slices_bad_method():
  with pytest.raises(ValueError, match="method must be one of"):
    keep_from_group_slices([jnp.ones(4)] * 4, 2, method="sort")


def test_selection_comparators_are_pruned_to_the_nth_output():
  assert len(selection_comparators(16, 8)) == 53  # of Batcher's 63
  assert len(selection_comparators(4, 1)) == 3  # the maximum: a tournament
  assert len(selection_comparators(2, 1)) == 1


CASES = [
  (backend, pattern, dtype, shape, with_factors)
  for backend in ("triton", "mosaic_tpu")
  for pattern, dtype, shape, with_factors in (
    ("2:4", jnp.float32, (37, 576), False),
    ("8:16", jnp.bfloat16, (37, 576), True),
    ("4:8", jnp.bfloat16, (64, 1536), False),
    ("8:16", jnp.float32, (16, 256), True),
  )
]


@cpu_interpret
@pytest.mark.parametrize(
  "backend,pattern,dtype,shape,with_factors",
  CASES,
  ids=[
    f"{b}-{p}-{jnp.dtype(d).name}-{'x'.join(map(str, s))}{'-factors' if f else ''}"
    for b, p, d, s, f in CASES
  ],
)
def test_nm_mask_equals_sparsify(backend, pattern, dtype, shape, with_factors):
  x = _activation(shape, dtype)
  factors = _factors(shape[1]) if with_factors else None
  out = nm_mask(
    x, pattern=pattern, factors=factors, block_sizes=BLOCKS[backend], interpret=True,
    backend=backend,
  )  # fmt: skip
  ref = sparsify(x, NMPattern.parse(pattern), factors)
  mismatches = int(jnp.sum(out != ref))
  print(f"\n[nm_mask] {backend} {pattern} {jnp.dtype(dtype).name} {shape}: {mismatches} mismatches")
  assert out.dtype == x.dtype and out.shape == x.shape
  assert mismatches == 0
  nm = NMPattern.parse(pattern)
  kept = np.asarray(out != 0).reshape(shape[0], -1, nm.m).sum(-1)
  assert (kept == nm.n).all()  # no zeros in x: exactly N survive in every group


@cpu_interpret
def test_nm_mask_nan_counts_as_largest():
  x = _activation((16, 256), jnp.float32).at[2, 3].set(jnp.nan).at[5, 40].set(-jnp.inf)
  out = nm_mask(x, pattern="2:4", block_sizes=BLOCKS["triton"], interpret=True, backend="triton")
  ref = sparsify(x, NMPattern.parse("2:4"))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert np.isnan(out[2, 3]) and out[5, 40] == -jnp.inf


@cpu_interpret
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_nm_mask_keeps_inf_under_a_zero_factor(backend):
  # inf * 0 is NaN, and NaN counts as largest anyway; the explicit rule (an inf activation
  # scores +inf whatever its factor) must give the same mask in the kernel and in sparsify.
  x = _activation((16, 256), jnp.float32).at[5, 40].set(-jnp.inf).at[6, 9].set(jnp.inf)
  factors = _factors(256).at[40].set(0.0).at[9].set(0.0)
  out = nm_mask(
    x, pattern="2:4", factors=factors, block_sizes=BLOCKS[backend], interpret=True,
    backend=backend,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(out), np.asarray(sparsify(x, "2:4", factors)))
  assert out[5, 40] == -jnp.inf and out[6, 9] == jnp.inf


@cpu_interpret
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_two_pass_matmul_matches_reference(dtype):
  x = _activation((37, 576), dtype, seed=2)
  w = (jax.random.normal(jax.random.key(3), (576, 192)) / 24).astype(dtype)
  factors = _factors(576)
  out = nm_matmul_two_pass(
    x, w, pattern="8:16", factors=factors, block_sizes=BLOCKS["triton"], interpret=True,
    backend="triton",
  )  # fmt: skip
  ref = nm_matmul_reference(x, w, pattern="8:16", factors=factors)
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
  print(
    f"\n[nm_mask] two-pass {jnp.dtype(dtype).name}: max={diff.max():.3e} mean={diff.mean():.3e}"
  )
  # Same masked operand and the same XLA dot: identical up to the dot's own determinism.
  assert diff.max() <= (1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
@pytest.mark.parametrize("pattern", ["2:4", "8:16"])
def test_nm_mask_lowers(platform, backend, pattern):
  x = jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4096, 1536), jnp.bfloat16)
  f = jax.ShapeDtypeStruct((4096,), jnp.float32)

  def fn(x, w, f):
    return nm_matmul_two_pass(x, w, pattern=pattern, factors=f, backend=backend)

  text = jax.jit(fn).trace(x, w, f).lower(lowering_platforms=(platform,)).as_text()
  assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
  x_odd = jax.ShapeDtypeStruct((37, 576), jnp.float32)  # padded shapes
  fn = functools.partial(nm_mask, pattern=pattern, backend=backend)
  text = jax.jit(fn).trace(x_odd).lower(lowering_platforms=(platform,)).as_text()
  assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled kernel: needs a GPU")
@pytest.mark.parametrize("pattern", ["2:4", "8:16"])
def test_compiled_gpu_nm_mask_equals_sparsify(pattern):
  x = _activation((1000, 4096), jnp.bfloat16)
  out = nm_mask(x, pattern=pattern, factors=_factors(4096))
  ref = sparsify(x, NMPattern.parse(pattern), _factors(4096))
  assert int(jnp.sum(out != ref)) == 0


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled kernel: needs a GPU")
def test_compiled_gpu_two_pass_matches_reference():
  x = _activation((1000, 4096), jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(3), (4096, 1536)) / 64).astype(jnp.bfloat16)
  out = nm_matmul_two_pass(x, w, pattern="8:16", factors=_factors(4096))
  ref = nm_matmul_reference(x, w, pattern="8:16", factors=_factors(4096))
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
  print(f"\n[nm_mask] compiled two-pass bf16: max={diff.max():.3e} mean={diff.mean():.3e}")
  assert diff.max() <= 1e-2  # the same masked operand and XLA dot: bf16 output rounding


def test_nm_mask_bad_inputs():
  x = _activation((16, 576), jnp.float32)
  kw = dict(interpret=True, backend="triton")
  with pytest.raises(ValueError, match="M=16 must divide K"):
    nm_mask(x[:, :568], pattern="8:16", **kw)
  with pytest.raises(ValueError, match="power-of-2 pattern M"):
    nm_mask(x, pattern="2:6", block_sizes=MaskBlockSizes(block_m=16, block_k=192), **kw)
  with pytest.raises(ValueError, match="power-of-2 pattern M"):  # with the default blocks too
    nm_mask(x, pattern="2:6", **kw)
  with pytest.raises(ValueError, match="block_k must be a multiple"):
    nm_mask(x, pattern="8:16", block_sizes=MaskBlockSizes(block_m=16, block_k=24), **kw)
  with pytest.raises(ValueError, match="on Triton block_m must be a power of 2"):
    nm_mask(x, pattern="2:4", block_sizes=MaskBlockSizes(block_m=24, block_k=64), **kw)
  with pytest.raises(ValueError, match="on TPU block_m must be a multiple of 8"):
    bs = MaskBlockSizes(block_m=12, block_k=128)
    nm_mask(x, pattern="2:4", block_sizes=bs, interpret=True, backend="mosaic_tpu")
  with pytest.raises(TypeError, match="MaskBlockSizes"):
    nm_mask(x, pattern="2:4", block_sizes=(16, 64), **kw)
  with pytest.raises(ValueError, match=r"factors must have shape \(576,\)"):
    nm_mask(x, pattern="2:4", factors=jnp.ones(575), **kw)
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    nm_mask(x.astype(jnp.float16), pattern="2:4", **kw)
  with pytest.raises(ValueError, match="positive int"):
    MaskBlockSizes(block_m=0)
  with pytest.raises(ValueError, match="num_warps must be a power of 2"):
    MaskBlockSizes(num_warps=6)
  with pytest.raises(ValueError, match="num_warps must be a power of 2"):
    MaskBlockSizes(num_warps=8.0)
  with pytest.raises(TypeError, match="w must have x's dtype"):
    nm_matmul_two_pass(x, jnp.ones((576, 8), jnp.bfloat16), pattern="2:4", **kw)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_default_mask_block_sizes_are_valid(backend):
  for pattern in ("2:4", "4:8", "8:16", "16:32", "3:6", "2:3", "5:10"):
    m = NMPattern.parse(pattern).m
    if backend == "triton" and not m & (m - 1) == 0:
      continue  # refused by the Triton kernel (test_nm_mask_bad_inputs)
    for dtype in (jnp.float32, jnp.bfloat16):
      for m_tokens, k in [(1, 96), (37, 576), (2048, 4096), (8192, 14400), (16, 1152)]:
        if k % m:
          continue
        bs = default_mask_block_sizes(backend, m_tokens, k, m)
        check_mask_block_sizes(bs, backend, dtype, m, op="test")
        assert bs.block_k <= max(512, m * 128), bs


@cpu_interpret
def test_nm_mask_tpu_non_power_of_2_m_with_default_blocks():
  # M = 6: the K tile must be a multiple of lcm(128, 6) = 384; K = 1152 takes three of them.
  x = _activation((16, 1152), jnp.float32)
  out = nm_mask(x, pattern="3:6", factors=_factors(1152), interpret=True, backend="mosaic_tpu")
  ref = sparsify(x, NMPattern.parse("3:6"), _factors(1152))
  mismatches = int(jnp.sum(out != ref))
  print(f"\n[nm_mask] mosaic_tpu 3:6 (16, 1152), default blocks: {mismatches} mismatches")
  assert mismatches == 0


@cpu_interpret
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_nm_mask_and_two_pass_accept_zero_tokens(backend):
  x = jnp.zeros((0, 256), jnp.bfloat16)
  w = jnp.ones((256, 64), jnp.bfloat16)
  out = nm_mask(x, pattern="2:4", interpret=True, backend=backend)
  assert out.shape == (0, 256) and out.dtype == jnp.bfloat16
  y = nm_matmul_two_pass(x, w, pattern="2:4", interpret=True, backend=backend)
  assert y.shape == (0, 64) and y.dtype == jnp.bfloat16
