"""Fused N:M activation sparsity + matmul: ``sparsify(x; N:M, factors) @ w`` in one kernel.

The N:M mask of the activation is computed inside the matmul kernel, on each activation tile
held on chip, and applied before the tile enters the dot: the masked activation is never
written to memory. Semantics are exactly those of ``amber_jax.core.sparsity.sparsify`` (score
``|x|`` or ``|x| * factors`` in float32, NaN counts as +inf, top N of every M consecutive
entries of a row, ties to the lower index), so kept values are bit-identical to the reference
and only the accumulation order of the dot differs.

Backends (``backend=``; default from ``jax.default_backend()``):

* ``"triton"`` (GPU): Pallas' Triton backend, chosen by passing Triton compiler params.
  A 1-D grid over (M tiles x N tiles), grouped along M for L2 reuse; the K reduction is a loop
  inside the kernel with an fp32 accumulator in registers. Each K step reads the activation
  tile as ``m`` strided slices ``x[:, k0 + p :: m]`` (``p`` = position inside the group), so
  the ``m`` members of every group sit at the same place of ``m`` [block_m, block_k/m]
  tensors. For M > 4 a sorting network of elementwise max/min across the ``m`` slices
  (Batcher's, pruned to the N-th output) gives each group's N-th largest score, and the
  keep-mask is "above it, or equal to it and among the first N by position"; for M <= 4
  (2:4) the pairwise rank (m(m-1)/2 compares) takes fewer instructions and is used instead
  (``keep_from_group_slices``). No 3-D reshape, gather or cross-lane op, which Triton lacks.
  (Until 2026-11-29 every M used the pairwise rank: about twice the instructions per entry
  at 8:16.) The masked slices are interleaved back into the
  [block_m, block_k] tile by a tree of 2-way stacks (``tt.join``) and multiplied with the
  contiguous [block_k, block_n] weight tile in one dot (wgmma on Hopper). Triton needs
  power-of-two shapes: ``block_m``, ``block_n``, ``block_k`` powers of two >= 16 and a
  power-of-two M. Checked without a GPU by compiling the kernel's Triton IR for sm_90 with
  pip Triton 3.9 (XLA bundles its own Triton, so this is a proxy): the default tiles use
  wgmma, 80-130 KB of shared memory and no register spills; two earlier variants (``m``
  partial dots against strided weight rows; splitting a contiguous tile in registers)
  spilled heavily and were dropped.
* ``"mosaic_tpu"`` (TPU): Mosaic, grid (M tiles, N tiles, K tiles) with the K reduction as
  the last ("arbitrary") grid axis and an fp32 VMEM accumulator, like
  ``jax/experimental/pallas/ops/tpu/matmul.py``. Lane-strided loads do not exist on TPU, so
  the rank uses lane rotations: for each shift ``d`` in ``1..m-1``, ``pltpu.roll`` of the
  [block_m, block_k] score tile by ``d`` and by ``-d`` brings the group members ``d``
  places before and after each entry; a lane-position mask (``lane % m``) drops rotations
  that leave the group. One dot of depth ``block_k`` per step. ``block_n``, ``block_k``
  multiples of 128, ``block_m`` of 8 (16 for bf16).
* ``"mosaic_gpu"``: not implemented here. What was found (2026-11-29, CPU only): Mosaic GPU
  can feed wgmma an A operand from registers (as JAX's ``hopper_mixed_type_matmul_mgpu``
  does after a dtype conversion), but its register arrays support no strided slices,
  concatenation, reshape into groups or sort, and no strided shared-memory loads either; the
  ``m`` members of a group (4 lanes x 2-4 registers in the WGMMA layout) can only be brought
  together by warp shuffles written in ``plgpu.inline_mgpu``. Such a kernel lowers for cuda,
  but Pallas' GPU interpreter runs neither ``inline_mgpu`` nor register-A wgmma, so it could
  not be checked on CPU. Nor would it make the mask free: about ``m / 2`` shuffles and ``m``
  compare/adds per entry on the CUDA cores for every N tile is as much time as the tensor
  cores spend on the tile's dot (see ``pallas_kernels.nm_mask`` for the count). The two-pass
  route there (mask once per entry, then the vendor dot) is the one built instead. Asking for
  it raises ``NotImplementedError``; nothing falls back silently.

On CPU, Pallas runs kernels only in its interpreter: ``interpret=True`` is required and runs
the body of ``backend`` (default ``"triton"``). ``interpret=False`` with an explicit backend
is allowed on any host, for lowering (``jax.jit(f).trace(...).lower(lowering_platforms=...)``).

Shapes that are not multiples of the block sizes are zero-padded (tokens, output columns and
K). Zero padding of K is safe because K % m == 0 is required up front and every block_k is a
multiple of m: the padded entries form whole groups of their own, and their weight rows are
zero as well.

Cost note: the mask is recomputed for every N tile (the price of never writing it); per
activation entry it is about 16 operations at 8:16 (7 max/min, the threshold compares and
the tie count), against ``2*block_n`` tensor-core FLOPs of the dot. Measure with
``experiments/bench_kernels.py``; ``pallas_kernels.nm_mask`` holds the two-pass route.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import sparsify
from pallas_kernels.common import (  # noqa: F401 (re-exported: BlockSizes and the backends)
  TRITON,
  BlockSizes,
  check_block_sizes,
  check_inputs,
  default_block_sizes,
  grouped_program_ids,
  interleave_group_slices,
  keep_from_group_slices,
  keep_from_lane_rolls,
  pad_to,
  resolve_backend,
  round_up,
  tile_scores,
  tpu_compiler_params,
  triton_compiler_params,
)

# ----------------------------------------------------------------------------------------
# Kernels.


def _triton_kernel(*refs, n: int, m: int, block_k: int, num_k: int, has_factors: bool):
  if has_factors:
    x_ref, w_ref, f_ref, o_ref = refs
  else:
    (x_ref, w_ref, o_ref), f_ref = refs, None
  block_m, block_n = o_ref.shape
  depth = block_k // m

  def body(kk, acc):
    k0 = pl.multiple_of(kk * block_k, block_k)
    # Group position p of every group of the tile: x[:, k0 + p :: m] -> m x [bm, depth].
    xs = [x_ref[:, pl.ds(k0 + p, depth, stride=m)] for p in range(m)]
    if has_factors:
      fs = [f_ref[:, pl.ds(k0 + p, depth, stride=m)] for p in range(m)]  # m x [1, depth]
    else:
      fs = [None] * m
    keeps = keep_from_group_slices([tile_scores(xp, fp) for xp, fp in zip(xs, fs, strict=True)], n)
    zero = jnp.zeros((), x_ref.dtype)
    x_masked = interleave_group_slices(
      [jnp.where(keep, xp, zero) for keep, xp in zip(keeps, xs, strict=True)]
    )  # [bm, bk], never leaves registers / shared memory
    w_tile = w_ref[pl.ds(k0, block_k), :]  # [bk, bn]
    return acc + jnp.dot(x_masked, w_tile, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(*refs, n: int, m: int, has_factors: bool):
  if has_factors:
    x_ref, w_ref, f_ref, o_ref, acc_ref = refs
  else:
    (x_ref, w_ref, o_ref, acc_ref), f_ref = refs, None

  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  x = x_ref[...]
  keep = keep_from_lane_rolls(tile_scores(x, None if f_ref is None else f_ref[...]), n, m)
  x_masked = jnp.where(keep, x, jnp.zeros((), x.dtype))
  acc_ref[...] += jnp.dot(x_masked, w_ref[...], preferred_element_type=jnp.float32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("pattern", "block_sizes", "interpret", "backend"))
def _nm_matmul(x, w, factors, *, pattern, block_sizes, interpret, backend):
  m_tokens, k = x.shape
  n_out = w.shape[1]
  bs = block_sizes
  mp, kp, np_ = round_up(m_tokens, bs.block_m), round_up(k, bs.block_k), round_up(n_out, bs.block_n)
  x_p = pad_to(x, (mp, kp))
  w_p = pad_to(w, (kp, np_))
  has_factors = factors is not None
  args = [x_p, w_p]
  if has_factors:
    args.append(pad_to(factors.astype(jnp.float32)[None, :], (1, kp)))
  out_shape = jax.ShapeDtypeStruct((mp, np_), x.dtype)
  num_m, num_n, num_k = mp // bs.block_m, np_ // bs.block_n, kp // bs.block_k

  if backend == TRITON:

    def x_map(pid):
      return grouped_program_ids(pid, num_m, num_n)[0], 0

    def w_map(pid):
      return 0, grouped_program_ids(pid, num_m, num_n)[1]

    in_specs = [pl.BlockSpec((bs.block_m, kp), x_map), pl.BlockSpec((kp, bs.block_n), w_map)]
    if has_factors:
      in_specs.append(pl.BlockSpec((1, kp), lambda pid: (0, 0)))
    out = pl.pallas_call(
      functools.partial(
        _triton_kernel,
        n=pattern.n,
        m=pattern.m,
        block_k=bs.block_k,
        num_k=num_k,
        has_factors=has_factors,
      ),
      out_shape=out_shape,
      grid=(num_m * num_n,),
      in_specs=in_specs,
      out_specs=pl.BlockSpec(
        (bs.block_m, bs.block_n), lambda pid: grouped_program_ids(pid, num_m, num_n)
      ),
      compiler_params=triton_compiler_params(bs.num_warps, bs.num_stages),
      interpret=interpret,
      name=f"nm_matmul_{pattern.n}_{pattern.m}",
    )(*args)
  else:
    from jax.experimental.pallas import tpu as pltpu

    in_specs = [
      pl.BlockSpec((bs.block_m, bs.block_k), lambda i, j, kk: (i, kk)),
      pl.BlockSpec((bs.block_k, bs.block_n), lambda i, j, kk: (kk, j)),
    ]
    if has_factors:
      in_specs.append(pl.BlockSpec((1, bs.block_k), lambda i, j, kk: (0, kk)))
    out = pl.pallas_call(
      functools.partial(_tpu_kernel, n=pattern.n, m=pattern.m, has_factors=has_factors),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=0,
        grid=(num_m, num_n, num_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bs.block_m, bs.block_n), jnp.float32)],
      ),
      compiler_params=tpu_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"nm_matmul_{pattern.n}_{pattern.m}",
    )(*args)
  return out[:m_tokens, :n_out]


# ----------------------------------------------------------------------------------------
# Public API.


def nm_matmul(
  x: jax.Array,
  w: jax.Array,
  *,
  pattern: NMPattern | str,
  factors: jax.Array | None = None,
  block_sizes: BlockSizes | None = None,
  interpret=False,
  backend: str | None = None,
) -> jax.Array:
  """``sparsify(x, pattern, factors) @ w`` with the N:M mask computed inside the kernel.

  Args:
    x: activations [tokens, K], float32 or bfloat16.
    w: weights [K, N_out], x's dtype.
    pattern: NMPattern or "N:M"; M must divide K.
    factors: optional per-input-channel score factors [K] (score = |x| * factors).
    block_sizes: tile sizes; None picks from ``TUNED_BLOCK_SIZES`` (Triton bf16: the H200
      autotune's best; the other entries untimed), fitted to the shape and pattern.
    interpret: run in the Pallas interpreter (required on CPU). True or an interpret-params
      object of the installed jax.
    backend: "triton", "mosaic_tpu" (or "mosaic_gpu": raises); None: from the platform.

  Returns:
    [tokens, N_out] in x's dtype, accumulated in float32.
  """
  pattern = NMPattern.parse(pattern)
  check_inputs(x, w, factors, pattern, op="nm_matmul")
  backend = resolve_backend(backend, interpret, op="nm_matmul")
  m_tokens, k = x.shape
  if block_sizes is None:
    block_sizes = default_block_sizes(backend, x.dtype, m_tokens, k, w.shape[1], pattern)
  check_block_sizes(block_sizes, backend, x.dtype, m=pattern.m, op="nm_matmul")
  if m_tokens == 0:  # no rows: a grid of zero programs is not launchable
    return jnp.zeros((0, w.shape[1]), x.dtype)
  return _nm_matmul(
    x, w, factors, pattern=pattern, block_sizes=block_sizes, interpret=interpret, backend=backend
  )


def nm_matmul_reference(
  x: jax.Array, w: jax.Array, *, pattern: NMPattern | str, factors: jax.Array | None = None
) -> jax.Array:
  """Plain-jnp reference: ``sparsify`` then a dot accumulated in float32, output in x.dtype."""
  pattern = NMPattern.parse(pattern)
  check_inputs(x, w, factors, pattern, op="nm_matmul_reference")
  x_sparse = sparsify(x, pattern, factors)
  return jnp.dot(x_sparse, w, preferred_element_type=jnp.float32).astype(x.dtype)


def nm_mask_in_kernel(
  x: jax.Array,
  *,
  pattern: NMPattern | str,
  factors: jax.Array | None = None,
  block_sizes: BlockSizes | None = None,
  interpret=False,
  backend: str | None = None,
) -> jax.Array:
  """Test hook: the kernel's effective masked activation, read back as ``nm_matmul(x, I)``.

  Exact for finite inputs (each output entry is one kept value times 1 plus zeros); a kept
  NaN/inf would spread along its row through the zeros of the identity.
  """
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return nm_matmul(
    x,
    eye,
    pattern=pattern,
    factors=factors,
    block_sizes=block_sizes,
    interpret=interpret,
    backend=backend,
  )
