"""The N:M mask as its own memory-bound kernel, and the two-pass sparse matmul built on it.

Why a second route next to the fused kernel (``pallas_kernels.nm_matmul``): the fused kernel
recomputes the mask for every N tile, on the CUDA cores, while the tensor cores do the dot.
On an H100/H200 an SM retires about 1024 bf16 multiply-adds per cycle on its tensor cores but
128 scalar operations on its CUDA cores, so with ``block_n = 256`` the dot takes about 0.25
cycles per activation entry and an exact 8:16 mask of ``c`` operations per entry about
``c / 128`` more: the pairwise ranks the fused kernel used when it was measured (``c`` about
32) cost as much as the dot, and it ran at 3.5-4.8x the dense time (BENCHMARKS.md); even the
sorting network (``c`` about 16) is not free there. Computing the mask once per entry
instead (this kernel: read x, write the masked x) and letting the vendor GEMM do the dot
costs one extra read and write of the activation: 4 bytes per entry against ``2 * N``
FLOPs, 1-6% of the dense dot at the prefill shapes on an H200 (4.8 TB/s, 989 TFLOP/s), if
the pass runs at bandwidth. At 4 bytes per entry an H200 SM must finish about 4.6 entries
per cycle, about 28 instructions per entry at perfect issue: the mask's instruction count is
what decides. ``scripts/triton_sm90_count.py`` (an offline sm_90 compile) counts 59 SASS
instructions per entry at 8:16 with the pairwise ranks and 27 with the sorting-network
threshold, which ``keep_from_group_slices`` therefore uses for M > 4.

* ``nm_mask(x, *, pattern, factors=None)``: ``sparsify(x, pattern, factors)`` (same scores,
  ties and NaN handling, bit-identical kept values) as a Pallas kernel over [block_m,
  block_k] tiles. Triton reads each tile as ``m`` strided slices and selects as the fused
  kernel does (``keep_from_group_slices``: the pairwise rank up to M = 4, the
  sorting-network threshold above); Mosaic TPU uses lane rotations. Shapes are zero-padded
  to the blocks.
* ``nm_matmul_two_pass(x, w, *, pattern, factors=None)``: ``nm_mask`` then XLA's dot (cuBLAS
  on GPU), float32 accumulation, output in x's dtype: the same contract as ``nm_matmul``.

On CPU, ``interpret=True`` is required (the generic Pallas interpreter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from amber_jax.core.patterns import NMPattern
from pallas_kernels.common import (
  MOSAIC_TPU,
  TRITON,
  check_activation,
  check_group_tiling,
  check_inputs,
  fit_block_k,
  interleave_group_slices,
  is_power_of_2,
  keep_from_group_slices,
  keep_from_lane_rolls,
  next_power_of_2,
  pad_to,
  resolve_backend,
  round_up,
  tile_scores,
  tpu_compiler_params,
  triton_compiler_params,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskBlockSizes:
  """Tile of the mask kernel: [block_m, block_k] activation entries per program.

  ``block_k`` holds whole groups (a multiple of M). Triton: powers of two; TPU: block_m a
  multiple of 8 (16 for bf16) and block_k of 128.
  """

  block_m: int = 64
  block_k: int = 256
  # 8 warps: at 4 an offline sm_90 compile of the [64, 256] tile spilled registers.
  num_warps: int | None = 8

  def __post_init__(self):
    for name in ("block_m", "block_k"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MaskBlockSizes.{name} must be a positive int, got {name}={value!r}")
    if self.num_warps is not None and (
      not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16, 32)
    ):
      raise ValueError(f"MaskBlockSizes.num_warps must be a power of 2 in [1, 32], got {self!r}")


def check_mask_block_sizes(bs: MaskBlockSizes, backend: str, dtype, m: int, *, op: str) -> None:
  """Backend constraints of the mask kernel's tile (ValueError/TypeError naming ``op``)."""
  if not isinstance(bs, MaskBlockSizes):
    raise TypeError(f"{op}: block_sizes must be a MaskBlockSizes or None, got {bs!r}")
  check_group_tiling(bs.block_k, backend, m, op=op)
  if backend == TRITON:
    for name in ("block_m", "block_k"):
      v = getattr(bs, name)
      if not is_power_of_2(v) or v < 16:
        raise ValueError(f"{op}: on Triton {name} must be a power of 2 >= 16, got {name}={v}")
  elif backend == MOSAIC_TPU:
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    if bs.block_m % sub or bs.block_k % 128:
      raise ValueError(
        f"{op}: on TPU block_m must be a multiple of {sub} and block_k of 128, got {bs=}"
      )


def default_mask_block_sizes(backend: str, m_tokens: int, k: int, m: int) -> MaskBlockSizes:
  """64 x 256 tiles (32 KB of bf16: enough bytes in flight per program), shrunk to the problem."""
  if backend == TRITON:
    block_m = max(16, min(64, next_power_of_2(m_tokens)))
    return MaskBlockSizes(block_m=block_m, block_k=fit_block_k(backend, 256, k, m))
  return MaskBlockSizes(
    block_m=min(64, round_up(max(1, m_tokens), 16)), block_k=fit_block_k(backend, 512, k, m)
  )


def _triton_mask_kernel(*refs, n: int, m: int, has_factors: bool):
  if has_factors:
    x_ref, f_ref, o_ref = refs
  else:
    (x_ref, o_ref), f_ref = refs, None
  depth = x_ref.shape[1] // m
  xs = [x_ref[:, pl.ds(p, depth, stride=m)] for p in range(m)]
  fs = [f_ref[:, pl.ds(p, depth, stride=m)] for p in range(m)] if has_factors else [None] * m
  keeps = keep_from_group_slices([tile_scores(xp, fp) for xp, fp in zip(xs, fs, strict=True)], n)
  zero = jnp.zeros((), x_ref.dtype)
  o_ref[...] = interleave_group_slices(
    [jnp.where(keep, xp, zero) for keep, xp in zip(keeps, xs, strict=True)]
  )


def _tpu_mask_kernel(*refs, n: int, m: int, has_factors: bool):
  if has_factors:
    x_ref, f_ref, o_ref = refs
  else:
    (x_ref, o_ref), f_ref = refs, None
  x = x_ref[...]
  keep = keep_from_lane_rolls(tile_scores(x, None if f_ref is None else f_ref[...]), n, m)
  o_ref[...] = jnp.where(keep, x, jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=("pattern", "block_sizes", "interpret", "backend"))
def _nm_mask(x, factors, *, pattern, block_sizes, interpret, backend):
  m_tokens, k = x.shape
  bs = block_sizes
  mp, kp = round_up(m_tokens, bs.block_m), round_up(k, bs.block_k)
  has_factors = factors is not None
  args = [pad_to(x, (mp, kp))]
  specs = [pl.BlockSpec((bs.block_m, bs.block_k), lambda i, j: (i, j))]
  if has_factors:
    args.append(pad_to(factors.astype(jnp.float32)[None, :], (1, kp)))
    specs.append(pl.BlockSpec((1, bs.block_k), lambda i, j: (0, j)))
  kernel = _triton_mask_kernel if backend == TRITON else _tpu_mask_kernel
  params = (
    triton_compiler_params(bs.num_warps, 1)
    if backend == TRITON
    else tpu_compiler_params(("parallel", "parallel"))
  )
  out = pl.pallas_call(
    functools.partial(kernel, n=pattern.n, m=pattern.m, has_factors=has_factors),
    out_shape=jax.ShapeDtypeStruct((mp, kp), x.dtype),
    grid=(mp // bs.block_m, kp // bs.block_k),
    in_specs=specs,
    out_specs=pl.BlockSpec((bs.block_m, bs.block_k), lambda i, j: (i, j)),
    compiler_params=params,
    interpret=interpret,
    name="nm_mask",
  )(*args)
  return out[:m_tokens, :k]


def nm_mask(
  x: jax.Array,
  *,
  pattern: NMPattern | str,
  factors: jax.Array | None = None,
  block_sizes: MaskBlockSizes | None = None,
  interpret=False,
  backend: str | None = None,
) -> jax.Array:
  """``sparsify(x, pattern, factors)`` for a [tokens, K] activation, as one Pallas pass.

  Args:
    x: float32 or bfloat16 [tokens, K]; pattern: NMPattern or "N:M" (M must divide K).
    factors: optional score factors [K] (score = |x| * factors).
    block_sizes: ``MaskBlockSizes`` (None: ``default_mask_block_sizes``).
    interpret: run in the Pallas interpreter (required on CPU).
    backend: "triton" or "mosaic_tpu"; None: from the platform.
  """
  pattern = NMPattern.parse(pattern)
  check_activation(x, factors, pattern, op="nm_mask")
  backend = resolve_backend(backend, interpret, op="nm_mask")
  if block_sizes is None:
    block_sizes = default_mask_block_sizes(backend, x.shape[0], x.shape[1], pattern.m)
  check_mask_block_sizes(block_sizes, backend, x.dtype, pattern.m, op="nm_mask")
  if x.shape[0] == 0:  # nothing to mask (a grid of zero programs is not launchable)
    return x
  return _nm_mask(
    x, factors, pattern=pattern, block_sizes=block_sizes, interpret=interpret, backend=backend
  )


def nm_matmul_two_pass(
  x: jax.Array,
  w: jax.Array,
  *,
  pattern: NMPattern | str,
  factors: jax.Array | None = None,
  block_sizes: MaskBlockSizes | None = None,
  interpret=False,
  backend: str | None = None,
) -> jax.Array:
  """``nm_mask`` then XLA's dot: ``sparsify(x) @ w`` in float32, output in x's dtype.

  Same contract as ``pallas_kernels.nm_matmul.nm_matmul``; the masked activation is written
  to memory once (see the module docstring for the trade).
  """
  pattern = NMPattern.parse(pattern)
  check_inputs(x, w, factors, pattern, op="nm_matmul_two_pass")
  x_sparse = nm_mask(
    x,
    pattern=pattern,
    factors=factors,
    block_sizes=block_sizes,
    interpret=interpret,
    backend=backend,
  )
  return jnp.dot(x_sparse, w, preferred_element_type=jnp.float32).astype(x.dtype)
