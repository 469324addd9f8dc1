"""W8A8 int8 kernel and its N:M variant: interpret mode vs references, lowering, bad inputs.

Errors are reported, not only asserted: run with ``-s`` to see the ``[int8_matmul] ...``
lines (also stored as junit properties via ``record_property``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.core.patterns import NMPattern
from pallas_kernels.common import BlockSizes
from pallas_kernels.int8_matmul import (
  MAX_K,
  int8_matmul,
  int8_matmul_reference,
  nm_int8_matmul,
  nm_int8_matmul_reference,
  quantize_per_channel,
  quantize_per_token,
  sparsify_quantize_per_token,
)
from pallas_kernels.int8_matmul_mgpu import check_mgpu_device, int8_matmul_mgpu_padded
from pallas_kernels.nm_matmul import nm_matmul_reference

SHAPES = [(37, 576, 192), (64, 1536, 576), (128, 576, 1536)]
TRITON_BLOCKS = {
  "coarse": BlockSizes(block_m=64, block_n=256, block_k=512),
  "fine": BlockSizes(block_m=32, block_n=128, block_k=128),
}
TPU_BLOCKS = {
  "coarse": BlockSizes(block_m=64, block_n=256, block_k=512),
  "fine": BlockSizes(block_m=32, block_n=128, block_k=256),
}
# The int32 accumulation is exact in both; only the final cast to out_dtype can differ.
TOLERANCES = {jnp.dtype(jnp.float32): (1e-6, 1e-6), jnp.dtype(jnp.bfloat16): (8e-3, 1e-6)}


# Interpret-mode checks run on CPU hosts (CI); a GPU/TPU host runs the compiled-kernel tests
# below instead (the interpreter there would only spend device time on the same checks).
cpu_interpret = pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="interpret-mode check: runs on CPU hosts"
)


def _data(shape_mkn, x_dtype=jnp.float32, seed=0):
  m_tokens, k, n = shape_mkn
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m_tokens, k), jnp.float32).astype(x_dtype)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  return x, w


def _errors(out, ref):
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
  return float(diff.max()), float(diff.mean())


@pytest.fixture
def report(record_property):
  def _report(label, out, ref):
    max_err, mean_err = _errors(out, ref)
    record_property("max_abs_err", max_err)
    record_property("mean_abs_err", mean_err)
    print(f"\n[int8_matmul] {label}: max_abs_err={max_err:.3e} mean_abs_err={mean_err:.3e}")
    return max_err, mean_err

  return _report


# ------------------------------------------------------------------------------------------
# Quantization.


def test_quantize_per_token_roundtrip_and_zero_rows():
  x, _ = _data((8, 576, 1))
  x = x.at[3].set(0.0)
  x_q, scale = quantize_per_token(x)
  assert x_q.dtype == jnp.int8 and x_q.shape == x.shape
  assert scale.dtype == jnp.float32 and scale.shape == (8, 1)
  assert np.all(np.isfinite(np.asarray(scale)))
  np.testing.assert_array_equal(np.asarray(x_q[3]), 0)
  assert int(jnp.max(jnp.abs(x_q.astype(jnp.int32)))) == 127
  err = jnp.abs(x_q.astype(jnp.float32) * scale - x)
  assert bool(jnp.all(err <= scale / 2 + 1e-7))


def test_quantize_per_channel_roundtrip():
  _, w = _data((1, 576, 192))
  w = w.at[:, 5].set(0.0)
  w_q, scale = quantize_per_channel(w)
  assert w_q.dtype == jnp.int8 and scale.shape == (1, 192) and scale.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(w_q[:, 5]), 0)
  err = jnp.abs(w_q.astype(jnp.float32) * scale - w)
  assert bool(jnp.all(err <= scale / 2 + 1e-7))


def test_quantize_bad_inputs():
  with pytest.raises(TypeError, match="floating point"):
    quantize_per_token(jnp.ones((4, 8), jnp.int8))
  with pytest.raises(ValueError, match="2-D"):
    quantize_per_channel(jnp.ones((4,)))


# ------------------------------------------------------------------------------------------
# int8_matmul vs reference.

CASES = [
  *[("triton", s, "coarse", jnp.bfloat16) for s in SHAPES],
  ("triton", (37, 576, 192), "fine", jnp.float32),
  ("triton", (64, 1536, 576), "fine", jnp.bfloat16),
  ("mosaic_tpu", (37, 576, 192), "coarse", jnp.float32),
  ("mosaic_tpu", (64, 1536, 576), "fine", jnp.bfloat16),
]


@pytest.mark.parametrize(
  "backend,shape,blocks,out_dtype",
  CASES,
  ids=[f"{b}-{'x'.join(map(str, s))}-{bl}-{jnp.dtype(d).name}" for b, s, bl, d in CASES],
)
@cpu_interpret
def test_int8_matmul_matches_reference(backend, shape, blocks, out_dtype, report):
  x, w = _data(shape)
  x_q, x_s = quantize_per_token(x)
  w_q, w_s = quantize_per_channel(w)
  bs = (TRITON_BLOCKS if backend == "triton" else TPU_BLOCKS)[blocks]
  out = int8_matmul(
    x_q, w_q, x_s, w_s, out_dtype=out_dtype, block_sizes=bs, interpret=True, backend=backend
  )
  ref = int8_matmul_reference(x_q, w_q, x_s, w_s, out_dtype=out_dtype)
  assert out.shape == (shape[0], shape[2]) and out.dtype == jnp.dtype(out_dtype)
  report(f"{backend} {shape} {blocks} out={jnp.dtype(out_dtype).name}", out, ref)
  rtol, atol = TOLERANCES[jnp.dtype(out_dtype)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)


@cpu_interpret
def test_int8_matmul_default_blocks_and_quantization_error(report):
  x, w = _data((37, 576, 192), seed=1)
  x_q, x_s = quantize_per_token(x)
  w_q, w_s = quantize_per_channel(w)
  out = int8_matmul(x_q, w_q, x_s, w_s, out_dtype=jnp.float32, interpret=True)
  exact = x @ w
  max_err, _ = report("W8A8 vs float32 matmul (quantization error)", out, exact)
  assert max_err < 0.05 * float(jnp.max(jnp.abs(exact)))


MGPU_CASES = [
  ((37, 576, 192), jnp.float32, None, "kn"),
  (
    (64, 1536, 576),
    jnp.bfloat16,
    BlockSizes(block_m=64, block_n=256, block_k=256, num_stages=2),
    "nk",
  ),
  ((130, 384, 200), jnp.float16, BlockSizes(block_m=128, block_n=128, block_k=128), "kn"),
]


@pytest.mark.parametrize(
  "shape,out_dtype,bs,w_layout",
  MGPU_CASES,
  ids=[f"{'x'.join(map(str, s))}-{jnp.dtype(d).name}-{lay}" for s, d, _, lay in MGPU_CASES],
)
@cpu_interpret
def test_mgpu_int8_matmul_matches_reference(shape, out_dtype, bs, w_layout, report):
  """The Mosaic GPU kernel in Pallas' GPU interpreter (warpgroups, barriers, TMA simulated).

  Not the compiled path in one respect: the interpreter does not model transposed views, so
  it reads [K, N] weight tiles whatever ``w_layout`` is ("nk" checks the wrapper's transpose
  back), while the compiled kernel reads [N, K] tiles through ``transpose_ref``. Only
  ``test_compiled_mgpu_int8_matches_reference`` (sm_90) runs that path."""
  x, w = _data(shape, seed=7)
  x_q, x_s = quantize_per_token(x)
  w_q, w_s = quantize_per_channel(w)
  w_in = w_q if w_layout == "kn" else w_q.T
  out = int8_matmul(
    x_q, w_in, x_s, w_s, out_dtype=out_dtype, block_sizes=bs, interpret=True,
    backend="mosaic_gpu", w_layout=w_layout,
  )  # fmt: skip
  ref = int8_matmul_reference(x_q, w_q, x_s, w_s, out_dtype=jnp.float32)
  assert out.shape == (shape[0], shape[2]) and out.dtype == jnp.dtype(out_dtype)
  report(f"mosaic_gpu {shape} out={jnp.dtype(out_dtype).name} w={w_layout}", out, ref)
  rtol, atol = TOLERANCES.get(jnp.dtype(out_dtype), (8e-3, 1e-6))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)


@cpu_interpret
def test_mgpu_int8_persistent_grid_walks_every_tile(report):
  """Fewer CTAs than output tiles: each CTA loops over several tiles (the snake order)."""
  kx, kw = jax.random.split(jax.random.key(3))
  x_q = jax.random.randint(kx, (256, 384), -127, 128, jnp.int8)
  w_q = jax.random.randint(kw, (384, 384), -127, 128, jnp.int8)
  x_s = jnp.linspace(0.01, 0.02, 256, dtype=jnp.float32)
  w_s = jnp.linspace(0.03, 0.01, 384, dtype=jnp.float32)
  bs = BlockSizes(block_m=64, block_n=128, block_k=128, num_stages=2)
  out = int8_matmul_mgpu_padded(
    x_q, w_q, x_s, w_s, out_dtype=jnp.float32, block_sizes=bs, interpret=True, grid_size=5
  )
  ref = int8_matmul_reference(x_q, w_q, x_s[:, None], w_s[None, :], out_dtype=jnp.float32)
  report("mosaic_gpu 256x384x384, 12 tiles on 5 CTAs", out, ref)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), 1e-6, 1e-6)


def test_int8_dot_takes_int8_operands():
  """The kernel's dot really multiplies int8 by int8 into int32 (walk the kernel jaxpr)."""
  x_q = jnp.ones((32, 128), jnp.int8)
  w_q = jnp.ones((128, 128), jnp.int8)
  fn = functools.partial(int8_matmul, out_dtype=jnp.float32, interpret=True, backend="triton")
  jaxpr = jax.make_jaxpr(fn)(x_q, w_q, jnp.ones((32, 1)), jnp.ones((1, 128)))

  def sub_jaxprs(params):
    for value in params.values():
      for v in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(v, "eqns"):
          yield v
        elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
          yield v.jaxpr

  def dots(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn
      for sub in sub_jaxprs(eqn.params):
        yield from dots(sub)

  found = list(dots(jaxpr.jaxpr))
  assert found, "no dot_general in the kernel"
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.int8, jnp.int8]
    assert eqn.outvars[0].aval.dtype == jnp.int32


# ------------------------------------------------------------------------------------------
# N:M + int8.

NM_CASES = [
  *[(p, d) for p in ("2:4", "4:8", "8:16") for d in (jnp.float32, jnp.bfloat16)],
]


@pytest.mark.parametrize(
  "pattern,x_dtype", NM_CASES, ids=[f"{p}-{jnp.dtype(d).name}" for p, d in NM_CASES]
)
@cpu_interpret
def test_nm_int8_matmul_matches_reference(pattern, x_dtype, report):
  x, w = _data((37, 576, 192), x_dtype, seed=2)
  w_q, w_s = quantize_per_channel(w)
  bs = TRITON_BLOCKS["coarse"]
  out = nm_int8_matmul(x, w_q, w_s, pattern=pattern, block_sizes=bs, interpret=True)
  ref = nm_int8_matmul_reference(x, w_q, w_s, pattern=pattern)
  assert out.dtype == jnp.dtype(x_dtype)
  report(f"nm_int8 {pattern} x={jnp.dtype(x_dtype).name}", out, ref)
  rtol, atol = TOLERANCES[jnp.dtype(x_dtype)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)
  # Against the unquantized sparse matmul: only the W8A8 quantization error remains.
  full = nm_matmul_reference(x.astype(jnp.float32), w, pattern=pattern)
  max_err, _ = report(f"nm_int8 {pattern} vs float32 N:M matmul", out, full)
  assert max_err < 0.05 * float(jnp.max(jnp.abs(full)))


@cpu_interpret
def test_nm_int8_with_factors_and_sparsity_kept(report):
  x, w = _data((37, 576, 192), jnp.bfloat16, seed=3)
  f = jax.random.uniform(jax.random.key(9), (576,), jnp.float32, 0.25, 4.0)
  w_q, w_s = quantize_per_channel(w)
  pat = NMPattern.parse("8:16")
  x_q, _ = sparsify_quantize_per_token(x, pattern=pat, factors=f)
  per_group = (np.asarray(x_q).reshape(37, -1, 16) != 0).sum(-1)
  assert per_group.max() <= 8  # quantization keeps the N:M zeros
  out = nm_int8_matmul(x, w_q, w_s, pattern=pat, factors=f, interpret=True, backend="mosaic_tpu")
  ref = nm_int8_matmul_reference(x, w_q, w_s, pattern=pat, factors=f)
  report("nm_int8 8:16 factors mosaic_tpu", out, ref)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), 8e-3, 1e-6)


# ------------------------------------------------------------------------------------------
# Compiled Triton kernel (only where a GPU is the default backend).

needs_gpu = pytest.mark.skipif(
  jax.default_backend() != "gpu", reason="runs the compiled Triton kernel: needs a GPU"
)
GPU_CASES = [
  ((37, 576, 192), jnp.float32, None),
  ((37, 576, 192), jnp.bfloat16, None),
  ((1024, 4096, 1536), jnp.bfloat16, None),
  ((300, 1536, 576), jnp.bfloat16, BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=4)),
]


@needs_gpu
@pytest.mark.parametrize(
  "shape,out_dtype,bs",
  GPU_CASES,
  ids=[
    f"{'x'.join(map(str, s))}-{jnp.dtype(d).name}{'-alt' if b else ''}" for s, d, b in GPU_CASES
  ],
)
def test_compiled_gpu_int8_matches_reference(shape, out_dtype, bs, report):
  x, w = _data(shape)
  x_q, x_s = quantize_per_token(x)
  w_q, w_s = quantize_per_channel(w)
  out = jax.block_until_ready(int8_matmul(x_q, w_q, x_s, w_s, out_dtype=out_dtype, block_sizes=bs))
  ref = int8_matmul_reference(x_q, w_q, x_s, w_s, out_dtype=out_dtype)
  report(f"GPU triton int8 {shape} out={jnp.dtype(out_dtype).name}", out, ref)
  rtol, atol = TOLERANCES[jnp.dtype(out_dtype)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)


def _is_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and getattr(device, "compute_capability", "0") in ("9.0",)


@pytest.mark.skipif(not _is_hopper(), reason="runs the compiled Mosaic GPU kernel: needs sm_90")
@pytest.mark.parametrize("w_layout", ["kn", "nk"])
@pytest.mark.parametrize(
  "shape,out_dtype",
  [((37, 576, 192), jnp.float32), ((1024, 4096, 1536), jnp.bfloat16)],
  ids=["small-f32", "1024x4096x1536-bf16"],
)
def test_compiled_mgpu_int8_matches_reference(shape, out_dtype, w_layout, report):
  x, w = _data(shape)
  x_q, x_s = quantize_per_token(x)
  w_q, w_s = quantize_per_channel(w)
  w_in = w_q if w_layout == "kn" else w_q.T
  out = int8_matmul(
    x_q, w_in, x_s, w_s, out_dtype=out_dtype, backend="mosaic_gpu", w_layout=w_layout
  )
  ref = int8_matmul_reference(x_q, w_q, x_s, w_s, out_dtype=out_dtype)
  report(f"GPU mosaic_gpu int8 {shape} out={jnp.dtype(out_dtype).name} w={w_layout}", out, ref)
  rtol, atol = TOLERANCES[jnp.dtype(out_dtype)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol, atol)


@needs_gpu
@pytest.mark.parametrize("pattern", ["2:4", "8:16"])
def test_compiled_gpu_nm_int8_matches_reference(pattern, report):
  x, w = _data((37, 576, 192), jnp.bfloat16, seed=5)
  w_q, w_s = quantize_per_channel(w)
  out = jax.block_until_ready(nm_int8_matmul(x, w_q, w_s, pattern=pattern))
  ref = nm_int8_matmul_reference(x, w_q, w_s, pattern=pattern)
  report(f"GPU triton nm_int8 {pattern}", out, ref)
  # A fused and an unfused division x / scale may round a code differently at .5: allow one
  # quantization step of one entry.
  ref32 = np.asarray(ref, np.float32)
  atol = 2e-3 * float(np.abs(ref32).max())
  np.testing.assert_allclose(np.asarray(out, np.float32), ref32, 8e-3, atol)


# ------------------------------------------------------------------------------------------
# Lowering.


def _lower(fn, *args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _int8_args(m_tokens=2048, k=4096, n=1536):
  return (
    jax.ShapeDtypeStruct((m_tokens, k), jnp.int8),
    jax.ShapeDtypeStruct((k, n), jnp.int8),
    jax.ShapeDtypeStruct((m_tokens, 1), jnp.float32),
    jax.ShapeDtypeStruct((1, n), jnp.float32),
  )


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_int8_matmul_lowers(platform, backend, out_dtype):
  fn = functools.partial(int8_matmul, out_dtype=out_dtype, backend=backend)
  text = _lower(fn, *_int8_args(), platform=platform)
  assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
  text = _lower(fn, *_int8_args(37, 576, 192), platform=platform)  # padded shapes
  assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text


@pytest.mark.parametrize("w_layout", ["kn", "nk"])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_mgpu_int8_matmul_lowers(out_dtype, w_layout):
  """The compiled Mosaic GPU kernel (K-major weight tiles, wgmma s8) lowers for cuda."""
  fn = functools.partial(int8_matmul, out_dtype=out_dtype, backend="mosaic_gpu", w_layout=w_layout)
  for m_tokens, k, n in ((2048, 4096, 1536), (37, 576, 192)):
    args = list(_int8_args(m_tokens, k, n))
    if w_layout == "nk":
      args[1] = jax.ShapeDtypeStruct((n, k), jnp.int8)
    assert "mosaic_gpu" in _lower(fn, *args, platform="cuda")


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_nm_int8_matmul_lowers(platform, backend, x_dtype):
  x = jax.ShapeDtypeStruct((2048, 4096), x_dtype)
  w_q = jax.ShapeDtypeStruct((4096, 1536), jnp.int8)
  w_s = jax.ShapeDtypeStruct((1, 1536), jnp.float32)
  fn = functools.partial(nm_int8_matmul, pattern="8:16", backend=backend)
  text = _lower(fn, x, w_q, w_s, platform=platform)
  assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text


# ------------------------------------------------------------------------------------------
# Bad inputs.


def test_int8_bad_inputs():
  x_q, w_q = jnp.ones((16, 128), jnp.int8), jnp.ones((128, 64), jnp.int8)
  x_s, w_s = jnp.ones((16, 1)), jnp.ones((1, 64))
  kw = dict(out_dtype=jnp.float32, interpret=True, backend="triton")
  with pytest.raises(TypeError, match="must be int8"):
    int8_matmul(x_q.astype(jnp.float32), w_q, x_s, w_s, **kw)
  with pytest.raises(ValueError, match=r"x_q.shape=\(16, 128\), w_q.shape=\(96, 64\)"):
    int8_matmul(x_q, w_q[:96], x_s, w_s, **kw)
  with pytest.raises(ValueError, match=r"x_scale must have shape \(16, 1\)"):
    int8_matmul(x_q, w_q, x_s[:, 0], w_s, **kw)
  with pytest.raises(ValueError, match=r"w_scale must have shape \(1, 64\)"):
    int8_matmul(x_q, w_q, x_s, w_s.T, **kw)
  with pytest.raises(TypeError, match="x_scale must be floating point"):
    int8_matmul(x_q, w_q, x_s.astype(jnp.int32), w_s, **kw)
  with pytest.raises(TypeError, match="out_dtype"):
    int8_matmul(x_q, w_q, x_s, w_s, out_dtype=jnp.int32, interpret=True)
  big = (
    jax.ShapeDtypeStruct((1, MAX_K + 1), jnp.int8),
    jax.ShapeDtypeStruct((MAX_K + 1, 8), jnp.int8),
  )
  with pytest.raises(ValueError, match="overflow the int32 accumulator"):
    int8_matmul(*big, jnp.ones((1, 1)), jnp.ones((1, 8)), **kw)
  with pytest.raises(ValueError, match="int8 block_k must be >= 32"):
    int8_matmul(
      x_q, w_q, x_s, w_s, block_sizes=BlockSizes(block_m=16, block_n=64, block_k=16), **kw
    )
  with pytest.raises(ValueError, match="multiple of 128"):
    bs = BlockSizes(block_m=32, block_n=64, block_k=128)
    int8_matmul(x_q, w_q, x_s, w_s, out_dtype=jnp.float32, block_sizes=bs, interpret=True,
                backend="mosaic_tpu")  # fmt: skip


def test_mgpu_int8_bad_inputs():
  x_q, w_q = jnp.ones((16, 128), jnp.int8), jnp.ones((128, 64), jnp.int8)
  x_s, w_s = jnp.ones((16, 1)), jnp.ones((1, 64))
  kw = dict(out_dtype=jnp.float32, interpret=True, backend="mosaic_gpu")
  with pytest.raises(ValueError, match="w_layout must be one of"):
    int8_matmul(x_q, w_q, x_s, w_s, w_layout="kN", **kw)
  with pytest.raises(ValueError, match=r"w_q \[N, K\] \(w_layout='nk'\)"):
    int8_matmul(x_q, w_q, x_s, w_s, w_layout="nk", **kw)
  for bs, match in (
    (BlockSizes(block_m=32, block_n=64, block_k=128), "block_m must be a multiple of 64"),
    (BlockSizes(block_m=64, block_n=40, block_k=128), "block_n must be a multiple of 16"),
    (BlockSizes(block_m=64, block_n=1024, block_k=128), "block_n must be a multiple of 16"),
    (BlockSizes(block_m=64, block_n=64, block_k=64), "block_k must be a multiple of 128"),
    (BlockSizes(block_m=64, block_n=160, block_k=128), "multiple of 64 when it exceeds 64"),
  ):
    with pytest.raises(ValueError, match=match):
      int8_matmul(x_q, w_q, x_s, w_s, block_sizes=bs, **kw)
  with pytest.raises(ValueError, match="not multiples of"):
    int8_matmul_mgpu_padded(
      x_q, w_q, x_s[:, 0], w_s[0], out_dtype=jnp.float32,
      block_sizes=BlockSizes(block_m=64, block_n=64, block_k=128), interpret=True,
    )  # fmt: skip


def test_mgpu_needs_a_hopper_gpu():
  class FakeGPU:
    platform, device_kind = "gpu", "NVIDIA A100-SXM4-80GB"
    compute_capability = "8.0"

  with pytest.raises(ValueError, match="Hopper.*compute capability 8.0.*backend='triton'"):
    check_mgpu_device(FakeGPU(), op="int8_matmul")
  FakeGPU.compute_capability = "9.0"
  check_mgpu_device(FakeGPU(), op="int8_matmul")
  check_mgpu_device(jax.devices("cpu")[0], op="int8_matmul")  # a CPU host may lower


def test_nm_int8_bad_inputs():
  x, w = _data((16, 584, 64))
  w_q, w_s = quantize_per_channel(w)
  with pytest.raises(ValueError, match="M=16 must divide"):
    nm_int8_matmul(x, w_q, w_s, pattern="8:16", interpret=True)
  with pytest.raises(ValueError, match=r"x.shape=\(16, 584\), w_q.shape=\(576, 64\)"):
    nm_int8_matmul(x, w_q[:576], w_s, pattern="2:4", interpret=True)
  with pytest.raises(TypeError, match="floating point"):
    nm_int8_matmul(x.astype(jnp.int8), w_q, w_s, pattern="2:4", interpret=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-host error")
def test_interpret_required_on_cpu():
  x_q, w_q = jnp.ones((16, 128), jnp.int8), jnp.ones((128, 64), jnp.int8)
  with pytest.raises(ValueError, match="interpret=True"):
    int8_matmul(x_q, w_q, jnp.ones((16, 1)), jnp.ones((1, 64)), out_dtype=jnp.float32)


@cpu_interpret
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_non_finite_rows_stay_non_finite(backend, report):
  """A NaN/inf row gets an inf scale (not scale 1 with a NaN code cast to int8): its outputs
  are non-finite, as in the dense product; the other rows are untouched."""
  x, w = _data((8, 256, 128), seed=11)
  x = x.at[1, 5].set(jnp.nan).at[2, 7].set(jnp.inf).at[3, 9].set(-jnp.inf)
  w_q, w_s = quantize_per_channel(w)
  _, x_s = quantize_per_token(x)
  assert np.isinf(np.asarray(x_s)[1:4, 0]).all()
  out = nm_int8_matmul(x, w_q, w_s, pattern="2:4", interpret=True, backend=backend)
  ref = nm_int8_matmul_reference(x, w_q, w_s, pattern="2:4")
  bad = np.asarray(~jnp.isfinite(out))
  assert bad[1:4].all() and not bad[[0, 4, 5, 6, 7]].any()
  rows = np.array([0, 4, 5, 6, 7])
  report(f"{backend} finite rows next to NaN/inf rows", out[rows], ref[rows])
  np.testing.assert_allclose(np.asarray(out[rows]), np.asarray(ref[rows]), 1e-6, 1e-6)


@cpu_interpret
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu", "mosaic_gpu"])
def test_zero_tokens_give_an_empty_result(backend):
  x_q = jnp.zeros((0, 256), jnp.int8)
  w_q = jnp.ones((256, 128), jnp.int8)
  out = int8_matmul(
    x_q, w_q, jnp.ones((0, 1)), jnp.ones((1, 128)), out_dtype=jnp.bfloat16, interpret=True,
    backend=backend,
  )  # fmt: skip
  assert out.shape == (0, 128) and out.dtype == jnp.bfloat16
  w_s = jnp.ones((1, 128))
  y = nm_int8_matmul(jnp.zeros((0, 256)), w_q, w_s, pattern="8:16", interpret=True, backend=backend)
  assert y.shape == (0, 128) and y.dtype == jnp.float32
