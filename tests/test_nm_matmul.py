"""Fused N:M matmul kernel: interpret mode vs reference, exact-N mask, lowering, bad inputs.

Pallas runs in interpret mode on CPU (each grid step costs milliseconds), so the block sizes
here are coarse. Errors are reported, not only asserted: run with ``-s`` to see the
``[nm_matmul] ...`` lines (also stored as junit properties via ``record_property``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import sparsify
from pallas_kernels.common import (
  TUNED_BLOCK_SIZES,
  BlockSizes,
  check_block_sizes,
  default_block_sizes,
)
from pallas_kernels.nm_matmul import nm_mask_in_kernel, nm_matmul, nm_matmul_reference

PATTERNS = ("2:4", "4:8", "8:16")
DTYPES = (jnp.float32, jnp.bfloat16)
# (rtol, atol) per dtype: fp32 differs only by summation order; bf16 outputs are rounded
# from fp32 sums, so a 1-ulp flip (2**-7 relative) is expected.
TOLERANCES = {jnp.dtype(jnp.float32): (1e-5, 5e-4), jnp.dtype(jnp.bfloat16): (1.6e-2, 1e-2)}

# Coarse blocks: few grid steps in the interpreter.
TRITON_BLOCKS = {
  "coarse": lambda m: BlockSizes(block_m=64, block_n=256, block_k=m * 32),
  "fine": lambda m: BlockSizes(block_m=32, block_n=128, block_k=m * 16),
}
TPU_BLOCKS = {
  "coarse": lambda m: BlockSizes(block_m=64, block_n=256, block_k=512),
  "fine": lambda m: BlockSizes(block_m=32, block_n=128, block_k=256),
}


# Interpret-mode checks run on CPU hosts (CI); a GPU/TPU host runs the compiled-kernel tests
# below instead (the interpreter there would only spend device time on the same checks).
cpu_interpret = pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="interpret-mode check: runs on CPU hosts"
)


def _data(shape_mkn, dtype, seed=0, with_factors=False):
  m_tokens, k, n = shape_mkn
  kx, kw, kf = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m_tokens, k), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  f = jax.random.uniform(kf, (k,), jnp.float32, 0.25, 4.0) if with_factors else None
  return x, w, f


def _errors(out, ref):
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
  return float(diff.max()), float(diff.mean())


@pytest.fixture
def report(record_property):
  """Prints and records (junit property) the max/mean abs error of one comparison."""

  def _report(label, out, ref):
    max_err, mean_err = _errors(out, ref)
    record_property("max_abs_err", max_err)
    record_property("mean_abs_err", mean_err)
    print(f"\n[nm_matmul] {label}: max_abs_err={max_err:.3e} mean_abs_err={mean_err:.3e}")
    return max_err, mean_err

  return _report


def _check_close(out, ref, dtype):
  assert out.dtype == ref.dtype == jnp.dtype(dtype)
  rtol, atol = TOLERANCES[jnp.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)


# (tokens, K, N): the default model's widths; 37 tokens and N=192 are not block multiples.
CASES = [
  # pattern x dtype on an unaligned shape, coarse Triton blocks.
  *[("triton", p, d, (37, 576, 192), "coarse", False) for p in PATTERNS for d in DTYPES],
  # aligned model shapes, second block size.
  ("triton", "8:16", jnp.bfloat16, (64, 1536, 576), "fine", False),
  ("triton", "8:16", jnp.float32, (64, 576, 1536), "coarse", False),
  ("triton", "2:4", jnp.bfloat16, (128, 576, 1536), "coarse", False),
  ("triton", "4:8", jnp.float32, (37, 1536, 192), "fine", False),
  # weight-aware score factors.
  ("triton", "8:16", jnp.bfloat16, (37, 576, 192), "coarse", True),
  ("triton", "2:4", jnp.float32, (37, 576, 192), "fine", True),
  # the Mosaic TPU kernel body (lane rolls), interpreted.
  *[("mosaic_tpu", p, jnp.bfloat16, (37, 576, 192), "coarse", False) for p in PATTERNS],
  ("mosaic_tpu", "8:16", jnp.float32, (64, 1536, 576), "fine", True),
]


@pytest.mark.parametrize(
  "backend,pattern,dtype,shape,blocks,with_factors",
  CASES,
  ids=[
    f"{b}-{p}-{jnp.dtype(d).name}-{'x'.join(map(str, s))}-{bl}{'-factors' if f else ''}"
    for b, p, d, s, bl, f in CASES
  ],
)
@cpu_interpret
def test_matches_reference(backend, pattern, dtype, shape, blocks, with_factors, report):
  x, w, f = _data(shape, dtype, with_factors=with_factors)
  m = NMPattern.parse(pattern).m
  bs = (TRITON_BLOCKS if backend == "triton" else TPU_BLOCKS)[blocks](m)
  out = nm_matmul(x, w, pattern=pattern, factors=f, block_sizes=bs, interpret=True, backend=backend)
  ref = nm_matmul_reference(x, w, pattern=pattern, factors=f)
  assert out.shape == (shape[0], shape[2])
  report(
    f"{backend} {pattern} {jnp.dtype(dtype).name} {shape} {blocks} factors={with_factors}", out, ref
  )
  _check_close(out, ref, dtype)


@cpu_interpret
def test_default_block_sizes_and_outer_jit(report):
  x, w, _ = _data((37, 576, 192), jnp.bfloat16, seed=1)
  fn = jax.jit(functools.partial(nm_matmul, pattern="8:16", interpret=True))
  out = fn(x, w)
  ref = nm_matmul_reference(x, w, pattern="8:16")
  report("default blocks under jit, bf16 8:16 (37, 576, 192)", out, ref)
  _check_close(out, ref, jnp.bfloat16)


@cpu_interpret
def test_non_power_of_two_m(report):
  """M=6: the Mosaic TPU body handles it; the Triton kernel refuses it clearly."""
  x, w, _ = _data((16, 576, 64), jnp.float32, seed=2)
  bs = BlockSizes(block_m=16, block_n=128, block_k=384)
  out = nm_matmul(x, w, pattern="3:6", block_sizes=bs, interpret=True, backend="mosaic_tpu")
  ref = nm_matmul_reference(x, w, pattern="3:6")
  report("mosaic_tpu 3:6 float32 (16, 576, 64)", out, ref)
  _check_close(out, ref, jnp.float32)
  with pytest.raises(ValueError, match="power-of-2 pattern M"):
    nm_matmul(x, w, pattern="3:6", interpret=True, backend="triton")


def _tied_input(dtype, shape=(32, 576), seed=3):
  """Many exact ties and zeros: values in {-2, -1, 0, 1, 2}."""
  v = jax.random.randint(jax.random.key(seed), shape, -2, 3)
  return v.astype(dtype)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("pattern", PATTERNS)
@cpu_interpret
def test_exact_n_invariant_with_ties(pattern, dtype, backend, record_property):
  """The kernel's effective mask: exactly min(N, nonzeros) survivors per group, as sparsify."""
  pat = NMPattern.parse(pattern)
  x = _tied_input(dtype)
  factors = None
  if pattern == "4:8":  # ties in the weighted score too
    factors = jnp.tile(jnp.array([1.0, 2.0, 1.0, 0.5], jnp.float32), x.shape[1] // 4)
  bs = (TRITON_BLOCKS if backend == "triton" else TPU_BLOCKS)["coarse"](pat.m)
  masked = nm_mask_in_kernel(
    x, pattern=pat, factors=factors, block_sizes=bs, interpret=True, backend=backend
  )
  expected = sparsify(x, pat, factors)
  np.testing.assert_array_equal(np.asarray(masked, np.float32), np.asarray(expected, np.float32))
  groups = np.asarray(x, np.float32).reshape(x.shape[0], -1, pat.m)
  kept = np.asarray(masked, np.float32).reshape(groups.shape)
  survivors = (kept != 0).sum(-1)
  nonzeros = (groups != 0).sum(-1)
  np.testing.assert_array_equal(survivors, np.minimum(pat.n, nonzeros))
  # Kept values are bit-identical to the input.
  assert np.all((kept == 0) | (kept == groups))
  record_property("groups_checked", int(survivors.size))
  print(
    f"\n[nm_matmul] exact-N {backend} {pattern} {jnp.dtype(dtype).name}: {survivors.size} groups ok"
  )


@cpu_interpret
def test_nan_and_inf_rows_match_reference():
  x, w, _ = _data((16, 576, 64), jnp.float32, seed=4)
  x = x.at[3, 5].set(jnp.nan).at[7, 100].set(jnp.inf)
  out = nm_matmul(x, w, pattern="8:16", interpret=True, backend="triton")
  ref = nm_matmul_reference(x, w, pattern="8:16")
  out, ref = np.asarray(out), np.asarray(ref)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
  assert np.all(np.isnan(out[3]))  # a NaN activation is kept and propagates
  # The inf is kept too: row 7 is +-inf (or NaN where inf meets a zero weight) as in the
  # reference, entry by entry, with the same signs.
  assert np.isinf(ref[7]).any()
  np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))
  inf = np.isinf(ref)
  np.testing.assert_array_equal(np.sign(out[inf]), np.sign(ref[inf]))
  finite = np.isfinite(ref)
  np.testing.assert_allclose(out[finite], ref[finite], 1e-5, 5e-4)


@cpu_interpret
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_zero_tokens_give_an_empty_result(backend):
  x = jnp.zeros((0, 256), jnp.bfloat16)
  out = nm_matmul(
    x, jnp.ones((256, 96), jnp.bfloat16), pattern="8:16", interpret=True, backend=backend
  )
  assert out.shape == (0, 96) and out.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# Compiled Triton kernel (only where a GPU is the default backend).

needs_gpu = pytest.mark.skipif(
  jax.default_backend() != "gpu", reason="runs the compiled Triton kernel: needs a GPU"
)
GPU_TOLERANCES = {  # the kernel or XLA may use TF32 for float32 dots on GPUs
  jnp.dtype(jnp.float32): (1e-2, 1e-2),
  jnp.dtype(jnp.bfloat16): (1.6e-2, 1e-2),
}
_ALT = BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3)
# float32 tiles take twice the shared memory: 64x128x128 in 3 stages would not fit in 227 KB.
_ALT_F32 = BlockSizes(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
GPU_CASES = [
  *[(p, d, (37, 576, 192), False, None) for p in PATTERNS for d in DTYPES],
  ("8:16", jnp.bfloat16, (1024, 4096, 1536), False, None),
  ("8:16", jnp.bfloat16, (1024, 4096, 1536), True, _ALT),
  ("2:4", jnp.float32, (300, 1536, 576), True, _ALT_F32),
]


@needs_gpu
@pytest.mark.parametrize(
  "pattern,dtype,shape,with_factors,bs",
  GPU_CASES,
  ids=[
    f"{p}-{jnp.dtype(d).name}-{'x'.join(map(str, s))}{'-factors' if f else ''}{'-alt' if b else ''}"
    for p, d, s, f, b in GPU_CASES
  ],
)
def test_compiled_gpu_matches_reference(pattern, dtype, shape, with_factors, bs, report):
  x, w, f = _data(shape, dtype, with_factors=with_factors)
  out = jax.block_until_ready(nm_matmul(x, w, pattern=pattern, factors=f, block_sizes=bs))
  with jax.default_matmul_precision("highest"):
    ref = nm_matmul_reference(x, w, pattern=pattern, factors=f)
  report(f"GPU triton {pattern} {jnp.dtype(dtype).name} {shape} factors={with_factors}", out, ref)
  rtol, atol = GPU_TOLERANCES[jnp.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compiled_gpu_exact_n_invariant(pattern, dtype):
  """Integer-valued ties: exact through the identity dot even with TF32."""
  pat = NMPattern.parse(pattern)
  x = _tied_input(dtype, shape=(64, 576))
  masked = nm_mask_in_kernel(x, pattern=pat)
  np.testing.assert_array_equal(
    np.asarray(masked, np.float32), np.asarray(sparsify(x, pat), np.float32)
  )
  kept = np.asarray(masked, np.float32).reshape(64, -1, pat.m)
  nonzeros = (np.asarray(x, np.float32).reshape(kept.shape) != 0).sum(-1)
  np.testing.assert_array_equal((kept != 0).sum(-1), np.minimum(pat.n, nonzeros))


# ------------------------------------------------------------------------------------------
# Lowering for other platforms on this CPU host (no device needed).


def _lower(fn, *args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("with_factors", [False, True], ids=["plain", "factors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_lowers_for_cuda_triton(pattern, dtype, with_factors):
  x = jax.ShapeDtypeStruct((2048, 4096), dtype)
  w = jax.ShapeDtypeStruct((4096, 1536), dtype)
  f = jax.ShapeDtypeStruct((4096,), jnp.float32) if with_factors else None
  fn = functools.partial(nm_matmul, pattern=pattern, backend="triton")
  text = _lower(lambda x, w, f: fn(x, w, factors=f), x, w, f, platform="cuda")
  assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_lowers_for_cuda_unaligned_and_all_tuned_entries(dtype):
  x = jax.ShapeDtypeStruct((37, 576), dtype)
  w = jax.ShapeDtypeStruct((576, 192), dtype)
  for bs in [None, *[v for (b, d, _, _), v in TUNED_BLOCK_SIZES.items() if b == "triton"]]:
    fn = functools.partial(nm_matmul, pattern="8:16", block_sizes=bs, backend="triton")
    assert "__gpu$xla.gpu.triton" in _lower(fn, x, w, platform="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_lowers_for_tpu_mosaic(pattern, dtype):
  """Pallas -> Mosaic lowering only; Mosaic's own compile runs on a TPU host."""
  x = jax.ShapeDtypeStruct((2048, 4096), dtype)
  w = jax.ShapeDtypeStruct((4096, 1536), dtype)
  f = jax.ShapeDtypeStruct((4096,), jnp.float32)
  fn = functools.partial(nm_matmul, pattern=pattern, backend="mosaic_tpu")
  text = _lower(lambda x, w, f: fn(x, w, factors=f), x, w, f, platform="tpu")
  assert "tpu_custom_call" in text


# ------------------------------------------------------------------------------------------
# Block sizes and bad inputs.


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_default_block_sizes_are_valid(backend):
  for pattern in ("2:4", "4:8", "8:16", "16:32", "3:6"):
    pat = NMPattern.parse(pattern)
    if backend == "triton" and pat.m == 6:
      continue  # refused by the Triton kernel (tested above)
    for dtype in DTYPES:
      for m_tokens, k, n in [(1, 96, 8), (37, 576, 192), (2048, 4096, 14336), (8192, 14400, 96)]:
        if k % pat.m:
          continue
        bs = default_block_sizes(backend, dtype, m_tokens, k, n, pat)
        check_block_sizes(bs, backend, dtype, m=pat.m, op="test")


def test_block_sizes_is_frozen_and_hashable():
  a = BlockSizes(block_m=64, block_n=128, block_k=256)
  assert a == BlockSizes(block_m=64, block_n=128, block_k=256) and hash(a) == hash(
    BlockSizes(block_m=64, block_n=128, block_k=256)
  )
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.block_m = 32


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(block_m=0, block_n=64, block_k=256), "block_m must be a positive int"),
    (dict(block_m=64, block_n=-1, block_k=256), "block_n must be a positive int"),
    (dict(block_m=64, block_n=64, block_k=2.5), "block_k must be a positive int"),
    (dict(block_m=64, block_n=64, block_k=256, num_warps=3), "num_warps"),
    (dict(block_m=64, block_n=64, block_k=256, num_stages=0), "num_stages"),
  ],
)
def test_bad_block_sizes_dataclass(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BlockSizes(**kwargs)


@pytest.mark.parametrize(
  "backend,bs,match",
  [
    ("triton", BlockSizes(block_m=64, block_n=64, block_k=200), "multiple of the pattern's M"),
    ("triton", BlockSizes(block_m=48, block_n=64, block_k=256), "block_m must be a power of 2"),
    ("triton", BlockSizes(block_m=64, block_n=8, block_k=256), "block_n must be a power of 2"),
    ("triton", BlockSizes(block_m=64, block_n=64, block_k=96), "block_k must be a power of 2"),
    ("mosaic_tpu", BlockSizes(block_m=64, block_n=100, block_k=256), "multiple of 128"),
    ("mosaic_tpu", BlockSizes(block_m=8, block_n=128, block_k=256), "multiple of 16"),
  ],
)
def test_bad_block_sizes_for_backend(backend, bs, match):
  x, w, _ = _data((16, 576, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    nm_matmul(x, w, pattern="8:16", block_sizes=bs, interpret=True, backend=backend)


def test_bad_inputs():
  x, w, _ = _data((16, 576, 64), jnp.float32)
  kw = dict(interpret=True, backend="triton")
  with pytest.raises(ValueError, match=r"M=16 must divide K.*x.shape=\(16, 584\)"):
    nm_matmul(jnp.ones((16, 584)), jnp.ones((584, 64)), pattern="8:16", **kw)
  with pytest.raises(ValueError, match=r"x.shape=\(16, 576\), w.shape=\(512, 64\)"):
    nm_matmul(x, w[:512], pattern="8:16", **kw)
  with pytest.raises(ValueError, match="x must be"):
    nm_matmul(x[0], w, pattern="8:16", **kw)
  with pytest.raises(TypeError, match="w must have x's dtype"):
    nm_matmul(x, w.astype(jnp.bfloat16), pattern="8:16", **kw)
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    nm_matmul(x.astype(jnp.int8), w.astype(jnp.int8), pattern="8:16", **kw)
  with pytest.raises(ValueError, match=r"factors must have shape \(576,\)"):
    nm_matmul(x, w, pattern="8:16", factors=jnp.ones((64,)), **kw)
  with pytest.raises(ValueError, match="N:M|1 <= N < M"):
    nm_matmul(x, w, pattern="16:8", **kw)
  with pytest.raises(ValueError, match="backend must be one of"):
    nm_matmul(x, w, pattern="8:16", interpret=True, backend="cuda")
  with pytest.raises(NotImplementedError, match="mosaic_gpu"):
    nm_matmul(x, w, pattern="8:16", interpret=True, backend="mosaic_gpu")
  with pytest.raises(TypeError, match="BlockSizes"):
    nm_matmul(x, w, pattern="8:16", block_sizes=(64, 64, 256), **kw)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-host error")
def test_interpret_required_on_cpu():
  x, w, _ = _data((16, 576, 64), jnp.float32)
  with pytest.raises(ValueError, match="interpret=True"):
    nm_matmul(x, w, pattern="8:16")
