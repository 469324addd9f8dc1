"""Shared helpers of the Pallas kernels (``nm_matmul``, ``nm_mask``, ``int8_matmul``): backend
names and compiler params, block sizes and their checks, padding, grouped program ids, the
in-kernel N:M selections, and input validation. One definition each; the kernels import them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import selection_comparators

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
