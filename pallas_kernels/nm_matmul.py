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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import selection_comparators, sparsify

TRITON = "triton"
MOSAIC_TPU = "mosaic_tpu"
MOSAIC_GPU = "mosaic_gpu"
BACKENDS = (TRITON, MOSAIC_TPU, MOSAIC_GPU)
_PLATFORM_TO_BACKEND = {"gpu": TRITON, "cuda": TRITON, "rocm": TRITON, "tpu": MOSAIC_TPU}

# Programs along M that share an N column before moving on (Triton grid swizzle, L2 reuse).
_GROUP_M = 8

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# ----------------------------------------------------------------------------------------
# Shared helpers (also used by int8_matmul).


def resolve_backend(
  backend: str | None, interpret, *, op: str, implemented: tuple[str, ...] = (TRITON, MOSAIC_TPU)
) -> str:
  """The kernel flavour to build: ``backend`` if given, else from ``jax.default_backend()``.

  On CPU without ``interpret`` this raises (Pallas compiles no CPU kernels), unless a
  backend is named explicitly: that is how a kernel is lowered for another platform.
  ``implemented`` lists the backends the calling op has a kernel for.
  """
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend=!r}")
    if backend not in implemented:
      raise NotImplementedError(
        f"{op}: backend={backend!r} is not implemented for this op (it has {implemented}; "
        "see pallas_kernels.nm_matmul's docstring for why)"
      )
    return backend
  platform = jax.default_backend()
  if platform in _PLATFORM_TO_BACKEND:
    return _PLATFORM_TO_BACKEND[platform]
  if not interpret:
    raise ValueError(
      f"{op}: Pallas compiles no kernels for the {platform!r} backend; pass interpret=True "
      "to run the kernel in the Pallas interpreter (slow: tests only), or name "
      "backend='triton' / 'mosaic_tpu' to lower it for another platform"
    )
  return TRITON


def triton_compiler_params(num_warps: int | None, num_stages: int | None):
  """``pallas.triton.CompilerParams`` (``TritonCompilerParams`` in older jax)."""
  from jax.experimental.pallas import triton as pltriton

  if hasattr(pltriton, "CompilerParams"):
    cls = pltriton.CompilerParams
  elif hasattr(pltriton, "TritonCompilerParams"):
    cls = pltriton.TritonCompilerParams
  else:  # jax < 0.5
    cls = pl.TritonCompilerParams
  return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics: tuple[str, ...]):
  """``pallas.tpu.CompilerParams`` (``TPUCompilerParams`` in older jax)."""
  from jax.experimental.pallas import tpu as pltpu

  cls = pltpu.CompilerParams if hasattr(pltpu, "CompilerParams") else pltpu.TPUCompilerParams
  return cls(dimension_semantics=dimension_semantics)


def is_power_of_2(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


def next_power_of_2(v: int) -> int:
  return 1 if v <= 1 else 1 << (v - 1).bit_length()


def round_up(v: int, multiple: int) -> int:
  return -(-v // multiple) * multiple


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pads ``a`` at the end of each axis up to ``shape`` (no copy when already there)."""
  if tuple(a.shape) == tuple(shape):
    return a
  return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape, strict=True)])


def grouped_program_ids(pid, num_m: int, num_n: int, group_m: int = _GROUP_M):
  """Maps a 1-D program id to (M tile, N tile), ``group_m`` M tiles per N sweep.

  The Triton tutorial's swizzle: consecutive programs share W tiles and a few X tiles, so
  they hit L2. Every (i, j) is visited exactly once.
  """
  group_size = group_m * num_n
  group_id = lax.div(pid, group_size)
  first_m = group_id * group_m
  rows = jnp.minimum(num_m - first_m, group_m)
  within = lax.rem(pid, group_size)
  return first_m + lax.rem(within, rows), lax.div(within, rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tile sizes of the fused kernels (frozen: a static, hashable jit argument).

  ``block_k`` is the depth of one K step and must hold whole groups (a multiple of M).
  ``num_warps`` / ``num_stages`` are Triton launch parameters (None: Pallas' defaults);
  the Mosaic TPU kernel ignores them. Backend constraints are checked by each op.
  """

  block_m: int
  block_n: int
  block_k: int
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {name}={value!r}")
    if self.num_warps is not None and (
      not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16, 32)
    ):
      raise ValueError(f"BlockSizes.num_warps must be a power of 2 in [1, 32], got {self!r}")
    if self.num_stages is not None and (
      not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8
    ):
      raise ValueError(f"BlockSizes.num_stages must be an int in [1, 8], got {self!r}")


_ANY = (0, 1 << 40)

# (backend, dtype name, [K lo, K hi), [N lo, N hi)) -> BlockSizes; first match in insertion
# order wins (put specific ranges first). default_block_sizes fits an entry to the pattern
# (block_k a multiple of M: on Triton a power of two >= M; on TPU of lcm(128, M)) and shrinks
# it for small problems.
# The Triton bf16 entry is the best of bench_kernels --autotune on an H200 (jax 0.11.2,
# 2026-11-28) at 8192 x {4096, 14336} x {4096, 14336} for 8:16: 64x256x128, 8 warps, 3 stages
# (2.59 ms at 8192x4096x4096 against 3.67-7.08 ms for the other candidates). The float32 and
# TPU entries are untimed (fp32 compiled for sm_90 offline only); re-tune with
# `python experiments/bench_kernels.py --autotune` on the target device.
TUNED_BLOCK_SIZES: dict[tuple[str, str, tuple[int, int], tuple[int, int]], BlockSizes] = {
  (TRITON, "bfloat16", _ANY, _ANY): BlockSizes(
    block_m=64, block_n=256, block_k=128, num_warps=8, num_stages=3
  ),
  (TRITON, "float32", _ANY, _ANY): BlockSizes(
    block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=2
  ),
  (MOSAIC_TPU, "bfloat16", _ANY, _ANY): BlockSizes(block_m=256, block_n=256, block_k=512),
  (MOSAIC_TPU, "float32", _ANY, _ANY): BlockSizes(block_m=128, block_n=256, block_k=512),
}


def lookup_block_sizes(table, backend: str, dtype, k: int, n: int) -> BlockSizes:
  """First entry of ``table`` matching (backend, dtype, K, N). Every table ends with catch-all
  ranges for each (backend, dtype) its kernel accepts, so a miss is a bug in the table."""
  name = jnp.dtype(dtype).name
  for (b, d, (k_lo, k_hi), (n_lo, n_hi)), sizes in table.items():
    if b == backend and d == name and k_lo <= k < k_hi and n_lo <= n < n_hi:
      return sizes
  raise LookupError(f"no block-size table entry for {backend=}, dtype={name}, {k=}, {n=}")


def fit_block_k(backend: str, block_k: int, k: int, m: int) -> int:
  """``block_k`` (a table entry) fitted to depth ``k`` and group size ``m``, so that a K tile
  holds whole groups: on Triton a power of two >= 16 and >= M, no deeper than K needs (a
  non-power-of-2 M is left to ``check_group_tiling`` to reject); on TPU a multiple of
  lcm(128, M)."""
  if backend == TRITON:
    if not is_power_of_2(m):
      return block_k
    return max(m, min(block_k, max(16, next_power_of_2(k))))
  unit = 128 * m // math.gcd(128, m)
  return max(unit, min(block_k // unit, -(-k // unit)) * unit)


def check_group_tiling(block_k: int, backend: str, m: int, *, op: str) -> None:
  """The constraints every N:M kernel shares: on Triton a power-of-2 M (a tile is split into
  M strided slices and joined back by 2-way stacks), and K tiles of whole groups."""
  if backend == TRITON and not is_power_of_2(m):
    raise ValueError(
      f"{op}: the Triton kernel needs a power-of-2 pattern M (its tile is split into M "
      f"strided slices and joined back by 2-way stacks), got M={m}; use 2:4, 4:8, 8:16, ..."
    )
  if block_k % m:
    raise ValueError(
      f"{op}: block_k must be a multiple of the pattern's M={m} (a K tile holds whole "
      f"groups), got block_k={block_k}"
    )


def default_block_sizes(
  backend: str, dtype, m_tokens: int, k: int, n: int, pattern: NMPattern
) -> BlockSizes:
  """Tuned-table entry for the problem, fitted to the pattern and to small shapes."""
  base = lookup_block_sizes(TUNED_BLOCK_SIZES, backend, dtype, k, n)
  m = pattern.m
  block_k = fit_block_k(backend, base.block_k, k, m)
  if backend == TRITON:
    block_m = min(base.block_m, max(16, next_power_of_2(m_tokens)))
    block_n = min(base.block_n, max(16, next_power_of_2(n)))
  else:
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    block_m = min(base.block_m, round_up(max(1, m_tokens), sub))
    block_n = min(base.block_n, round_up(n, 128))
  return dataclasses.replace(base, block_m=block_m, block_n=block_n, block_k=block_k)


def check_block_sizes(bs: BlockSizes, backend: str, dtype, *, m: int = 1, op: str) -> None:
  """Backend constraints: Triton powers of two (dot operands >= 16); TPU (8|16, 128) tiles."""
  if not isinstance(bs, BlockSizes):
    raise TypeError(f"{op}: block_sizes must be a BlockSizes or None, got {bs!r}")
  check_group_tiling(bs.block_k, backend, m, op=op)
  if backend == TRITON:
    for name in ("block_m", "block_n"):
      v = getattr(bs, name)
      if not is_power_of_2(v) or v < 16:
        raise ValueError(f"{op}: on Triton {name} must be a power of 2 >= 16, got {name}={v}")
    if not is_power_of_2(bs.block_k) or bs.block_k < 16:
      raise ValueError(
        f"{op}: on Triton block_k must be a power of 2 >= 16 (and >= M), got {bs.block_k=}"
      )
  elif backend == MOSAIC_TPU:
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    if bs.block_m % sub:
      raise ValueError(f"{op}: on TPU block_m must be a multiple of {sub}, got {bs.block_m=}")
    for name in ("block_n", "block_k"):
      v = getattr(bs, name)
      if v % 128:
        raise ValueError(f"{op}: on TPU {name} must be a multiple of 128, got {name}={v}")


# ----------------------------------------------------------------------------------------
# In-kernel mask.


def tile_scores(x: jax.Array, factors: jax.Array | None) -> jax.Array:
  """Same float32 ops as ``amber_jax.core.sparsity.nm_scores``: |x| (* factors), NaN -> +inf."""
  s = jnp.abs(x.astype(jnp.float32))
  if factors is not None:
    s = s * factors
  return jnp.where(jnp.isnan(s), jnp.inf, s)


def keep_by_pairwise_rank(scores: list[jax.Array], n: int) -> list[jax.Array]:
  """Keep-masks for ``m`` aligned slices (``scores[p]`` holds group position ``p``) by rank:
  rank_p = #{q: s_q > s_p or (s_q == s_p and q < p)}, keep rank_p < n. One compare per pair
  (m(m-1)/2) and twice as many integer adds."""
  m = len(scores)
  ranks = [jnp.zeros(scores[0].shape, jnp.int32) for _ in range(m)]
  for p in range(m):
    for q in range(p + 1, m):
      p_beats_q = (scores[p] >= scores[q]).astype(jnp.int32)
      ranks[q] = ranks[q] + p_beats_q
      ranks[p] = ranks[p] + (1 - p_beats_q)
  return [r < n for r in ranks]


def keep_by_threshold(scores: list[jax.Array], n: int) -> list[jax.Array]:
  """Keep-masks for ``m`` aligned slices (``scores[p]`` holds group position ``p``), by the
  N-th largest score of each group: keep scores above it, and of those equal to it the lowest
  positions until N are kept (ties to the lower index, as ``sparsify``).

  The threshold comes from a sorting network on the slices (max/min, pruned to the N-th
  output: 53 comparators at 8:16).
  """
  m = len(scores)
  cols = list(scores)
  for a, b in selection_comparators(m, n):
    cols[a], cols[b] = jnp.maximum(cols[a], cols[b]), jnp.minimum(cols[a], cols[b])
  threshold = cols[n - 1]
  above = [s > threshold for s in scores]
  n_above = above[0].astype(jnp.int32)
  for a in above[1:]:
    n_above = n_above + a.astype(jnp.int32)
  room = n - n_above  # how many of the entries equal to the threshold are kept
  keeps, equal_before = [], jnp.zeros(threshold.shape, jnp.int32)
  for s, a in zip(scores, above, strict=True):
    equal = s == threshold
    keeps.append(a | (equal & (equal_before < room)))
    equal_before = equal_before + equal.astype(jnp.int32)
  return keeps


GROUP_SELECTIONS = ("auto", "pairwise", "threshold")
# "auto": the pairwise rank up to this M, the sorting-network threshold above. Counted by
# scripts/triton_sm90_count.py (offline sm_90 compile of the nm_mask kernel, pip Triton 3.9,
# [64, 256] bf16 tile, 8 warps; SASS instructions per entry, pairwise vs threshold): 2:4 20.5
# vs 29.6, 4:8 33.1 vs 28.9, 8:16 59 vs 27.2.
_PAIRWISE_MAX_M = 4


def keep_from_group_slices(
  scores: list[jax.Array], n: int, method: str = "auto"
) -> list[jax.Array]:
  """Keep-masks of ``m`` aligned slices (``scores[p]`` holds group position ``p`` of every
  group): the top ``n`` of each group, ties to the lower position, as ``sparsify``.

  ``method``: "pairwise" (``keep_by_pairwise_rank``), "threshold" (``keep_by_threshold``) or
  "auto" (pairwise up to M = 4, where it takes fewer instructions, threshold above).
  """
  if method not in GROUP_SELECTIONS:
    raise ValueError(f"method must be one of {GROUP_SELECTIONS}, got {method!r}")
  if method == "auto":
    method = "pairwise" if len(scores) <= _PAIRWISE_MAX_M else "threshold"
  if method == "pairwise":
    return keep_by_pairwise_rank(scores, n)
  return keep_by_threshold(scores, n)


def keep_from_lane_rolls(score: jax.Array, n: int, m: int) -> jax.Array:
  """Keep-mask of a [rows, K] tile (K % m == 0) by lane rotations (Mosaic TPU)."""
  from jax.experimental.pallas import tpu as pltpu

  rows, width = score.shape
  lane = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
  pos = lax.rem(lane, jnp.int32(m))
  rank = jnp.zeros((rows, width), jnp.int32)
  for d in range(1, m):
    before = pltpu.roll(score, d, 1)  # jnp.roll semantics: before[i] = score[i - d]
    rank = rank + ((pos >= d) & (before >= score)).astype(jnp.int32)
    after = pltpu.roll(score, width - d, 1)  # after[i] = score[i + d]
    rank = rank + ((pos < m - d) & (after > score)).astype(jnp.int32)
  return rank < n


# ----------------------------------------------------------------------------------------
# Kernels.


def interleave_group_slices(parts: list[jax.Array]) -> jax.Array:
  """Inverse of the strided split: ``m`` [rows, depth] slices -> [rows, depth * m] with
  ``out[:, g * m + p] = parts[p][:, g]``, by a tree of 2-way stacks on the last axis (Triton's
  ``tt.join``; ``m`` a power of two). Stacking ``p`` with ``p + m/2`` first makes the
  first-created axis the most significant bit of ``p`` once flattened."""
  rows, depth = parts[0].shape
  m = len(parts)
  while len(parts) > 1:
    half = len(parts) // 2
    parts = [jnp.stack([parts[q], parts[q + half]], axis=-1) for q in range(half)]
  return parts[0].reshape(rows, depth * m)


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


def check_activation(x, factors, pattern: NMPattern, *, op: str) -> None:
  """x [tokens, K] float32/bfloat16 with M dividing K; factors None or floating [K]."""
  if x.ndim != 2:
    raise ValueError(f"{op}: x must be [tokens, K], got {x.shape=}")
  if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
    raise TypeError(f"{op}: x must be float32 or bfloat16, got {x.dtype=}")
  k = x.shape[1]
  if k % pattern.m:
    raise ValueError(
      f"{op}: pattern {pattern}: M={pattern.m} must divide K (x.shape[1]), got {x.shape=}; "
      f"valid M for this K: {[v for v in (2, 4, 8, 16, 32, 64, 128) if k % v == 0]}"
    )
  if factors is not None:
    if factors.shape != (k,):
      raise ValueError(f"{op}: factors must have shape ({k},) (x's K), got {factors.shape=}")
    if not jnp.issubdtype(factors.dtype, jnp.floating):
      raise TypeError(f"{op}: factors must be floating point, got {factors.dtype=}")


def check_inputs(x, w, factors, pattern: NMPattern, *, op: str) -> None:
  """``check_activation`` plus w [K, N_out] in x's dtype."""
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"{op}: x must be [tokens, K] and w [K, N_out], got {x.shape=}, {w.shape=}")
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"{op}: x's K must equal w's K, got {x.shape=}, {w.shape=}")
  check_activation(x, factors, pattern, op=op)
  if w.dtype != x.dtype:
    raise TypeError(f"{op}: w must have x's dtype, got {x.dtype=}, {w.dtype=}")


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
