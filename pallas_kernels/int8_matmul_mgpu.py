"""Mosaic GPU (Hopper) int8 matmul: wgmma s8 x s8 -> s32, dequantized in the epilogue.

Why a second GPU backend for the int8 path: on an H200 (BENCHMARKS.md, 2026-11-28) the Triton
int8 kernel ran 1.9-2.4x *slower* than XLA's bf16 dot and XLA's own int8 dot was no faster
than bf16 either, while Hopper's int8 tensor cores peak at twice the bf16 rate. Mosaic GPU
drives them directly: this kernel is JAX's warp-specialized Hopper matmul
(``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py``) with int8 operands, an int32
accumulator and the W8A8 epilogue.

Structure (one CTA per SM, persistent):

* three warpgroups: one issues TMA copies of the x [block_m, block_k] and w [block_n,
  block_k] tiles into a ``num_stages``-deep shared-memory ring; two compute warpgroups each
  own half of the block's N columns and issue ``wgmma`` on every K step;
* the output tiles are walked in a "planar snake" order (``plgpu.planar_snake``) so that
  neighbouring CTAs share operand tiles in L2;
* the epilogue: the per-token scales of the block's rows and the per-channel scales of the
  warpgroup's columns are copied to shared memory (TMA), then ``acc * x_scale * w_scale`` in
  float32, cast to ``out_dtype`` and written back through shared memory in 64 x 64 TMA
  stores. The scale copies are issued after the K loop: issued before it, they deadlocked
  Pallas' GPU interpreter (jax 0.10.2), so one copy latency per tile is not hidden.

8-bit wgmma reads both operands K-major, so the weight is passed as [N, K] (K contiguous) and
the kernel hands wgmma its transposed view. ``int8_matmul`` transposes a [K, N] weight on the
fly; a deployment stores it pre-transposed and passes it as
``int8_matmul(..., backend="mosaic_gpu", w_layout="nk")``.

Block sizes (``BlockSizes``): ``block_m`` a multiple of 64 (the wgmma M), ``block_n`` a
multiple of 16 (each compute warpgroup takes ``block_n // 2`` <= 256 columns, a multiple of
64, the epilogue tile, once it exceeds 64), ``block_k`` a
multiple of 128 (one 128-byte swizzle row of int8), ``num_stages`` the pipeline depth
(``num_warps`` is ignored: the warpgroup layout is fixed). Shapes are zero-padded to the
blocks by the caller.

Without a GPU the kernel runs in Pallas' GPU interpreter (``interpret=True``: it simulates
the warpgroups, barriers and TMA copies on the CPU, seconds per call at test sizes) and
lowers for the cuda platform; both are tested in CI.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import BlockSizes

# Streaming multiprocessors of an H100/H200 SXM: the persistent grid size when the kernel is
# lowered on a host without a GPU (on a GPU, the device's own count is used).
DEFAULT_NUM_SMS = 132
# Output tiles walked along N in bands of this many tiles (L2 reuse of the x tiles).
_GRID_TILE_WIDTH = 8
# Epilogue tile: the accumulator is written back in [64, _EPI_N] pieces, two in flight.
_EPI_M = 64
_EPI_N = 64
# Registers left to the TMA warpgroup (it only issues copies); the rest go to compute.
_MEMORY_REGISTERS = 40
# Minor dimension of the 8-bit operand tiles: one 128-byte swizzle row.
K_UNIT = 128


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu

  return plgpu


def gpu_interpret_params():
  """Parameters that run a Mosaic GPU kernel in Pallas' GPU interpreter (CPU, tests only)."""
  # jax 0.10 exports no public name for the GPU interpreter's parameters yet.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  return InterpretGPUParams()


def num_sms() -> int:
  """SMs of the default device when it is a GPU, else ``DEFAULT_NUM_SMS`` (for lowering)."""
  device = jax.devices()[0]
  if device.platform == "gpu":
    return int(device.core_count)
  return DEFAULT_NUM_SMS


def check_mgpu_device(device, *, op: str) -> None:
  """The compiled kernel needs wgmma: a Hopper GPU (compute capability 9.0). Other devices
  (a CPU host lowering for cuda, the interpreter) pass."""
  if getattr(device, "platform", None) != "gpu":
    return
  capability = str(getattr(device, "compute_capability", ""))
  if capability != "9.0":
    raise ValueError(
      f"{op}: backend='mosaic_gpu' is a Hopper (sm_90) kernel, but the device "
      f"{getattr(device, 'device_kind', device)!s} has compute capability {capability or '?'}; "
      "use backend='triton' there"
    )


def check_mgpu_block_sizes(bs: BlockSizes, *, op: str) -> None:
  """Mosaic GPU constraints of the int8 kernel (see the module docstring)."""
  if bs.block_m % 64:
    raise ValueError(f"{op}: on Mosaic GPU block_m must be a multiple of 64, got {bs.block_m=}")
  if bs.block_n % 16 or bs.block_n // 2 > 256:
    raise ValueError(
      f"{op}: on Mosaic GPU block_n must be a multiple of 16 and <= 512 (two warpgroups of "
      f"<= 256 columns), got {bs.block_n=}"
    )
  wg_n = bs.block_n // 2
  if wg_n > _EPI_N and wg_n % _EPI_N:
    raise ValueError(
      f"{op}: on Mosaic GPU each warpgroup's columns (block_n // 2) must be a multiple of "
      f"{_EPI_N} when it exceeds {_EPI_N} (the epilogue tile), got {bs.block_n=}"
    )
  if bs.block_k % K_UNIT:
    raise ValueError(
      f"{op}: on Mosaic GPU int8 block_k must be a multiple of {K_UNIT}, got {bs.block_k=}"
    )


def _swizzled(plgpu, minor_bytes: int, itemsize: int):
  swizzle = plgpu.find_swizzle(minor_bytes * 8)
  return (
    plgpu.TilingTransform((8, swizzle // itemsize)),
    plgpu.SwizzleTransform(swizzle),
  )


def _kernel(
  x_gmem, w_gmem, xs_gmem, ws_gmem, out_gmem, *, bs: BlockSizes, num_stages: int, w_nk: bool
):
  plgpu = _plgpu()
  mp, kp = x_gmem.shape
  np_ = w_gmem.shape[0] if w_nk else w_gmem.shape[1]
  out_dtype = out_gmem.dtype
  block_m, block_n, block_k = bs.block_m, bs.block_n, bs.block_k
  wg_n = block_n // 2
  num_m, num_n, num_k = mp // block_m, np_ // block_n, kp // block_k
  epi_n = min(_EPI_N, wg_n)
  epi_m = _EPI_M
  num_out_slots = min(2, (block_m * wg_n) // (epi_m * epi_n))
  operand_transforms = _swizzled(plgpu, block_k, 1)
  out_transforms = _swizzled(
    plgpu, epi_n * jnp.dtype(out_dtype).itemsize, jnp.dtype(out_dtype).itemsize
  )

  if w_nk:  # K-major weight tiles, as 8-bit wgmma needs them.
    w_spec = plgpu.BlockSpec(
      (block_n, block_k), lambda k: (0, k), transforms=operand_transforms, memory_space=plgpu.SMEM
    )
  else:  # [K, N] tiles: only for the interpreter, which does not model transposed views.
    w_spec = plgpu.BlockSpec(
      (block_k, block_n),
      lambda k: (k, 0),
      transforms=_swizzled(plgpu, block_n, 1),
      memory_space=plgpu.SMEM,
    )

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
      body,
      grid=(num_k,),
      memory_registers=_MEMORY_REGISTERS,
      in_specs=[
        plgpu.BlockSpec(
          (block_m, block_k),
          lambda k: (0, k),
          transforms=operand_transforms,
          memory_space=plgpu.SMEM,
        ),
        w_spec,
      ],
      wg_axis="wg",
      num_compute_wgs=2,
      max_concurrent_steps=num_stages,
      compute_context=compute_context,
    )

  # The allocations do not depend on the body, so build them from placeholders.
  ignore = lambda *_, **__: None  # noqa: E731

  @functools.partial(
    pl.run_scoped,
    pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
    out_smem=plgpu.SMEM((2, num_out_slots, epi_m, epi_n), out_dtype, transforms=out_transforms),
    xs_smem=plgpu.SMEM((2, block_m), jnp.float32),
    ws_smem=plgpu.SMEM((2, wg_n), jnp.float32),
    scale_barriers=plgpu.Barrier(num_barriers=4),
    collective_axes="wg",
  )
  def _scope(pipeline_allocs, out_smem, xs_smem, ws_smem, scale_barriers):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((num_m * num_n,), collective_axes="sm")
    def _tile_loop(loop_info):
      (lin,) = loop_info.index
      mi, ni = plgpu.planar_snake(lin, (num_m, num_n), 1, _GRID_TILE_WIDTH)
      m_slice = pl.ds(mi * block_m, block_m)
      n_slice = pl.ds(ni * block_n, block_n)
      wg_n_slice = pl.ds(wg * wg_n, wg_n)

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((block_m, wg_n), jnp.int32))
        def _acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          # The last tile's scales were read by plain loads: order them before the TMA writes.
          plgpu.commit_smem()
          plgpu.copy_gmem_to_smem(xs_gmem.at[m_slice], xs_smem.at[wg], scale_barriers.at[wg])
          plgpu.copy_gmem_to_smem(
            ws_gmem.at[n_slice].at[wg_n_slice], ws_smem.at[wg], scale_barriers.at[2 + wg]
          )
          plgpu.barrier_wait(scale_barriers.at[wg])
          plgpu.barrier_wait(scale_barriers.at[2 + wg])
          acc = acc_ref[...].astype(jnp.float32)
          x_scale = xs_smem[wg]
          w_scale = ws_smem[wg]
          out = acc * lax.broadcast_in_dim(x_scale, acc.shape, [0])
          out = (out * lax.broadcast_in_dim(w_scale, acc.shape, [1])).astype(out_dtype)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          for epi_mi in range(block_m // epi_m):
            for epi_ni in range(wg_n // epi_n):
              rows = slice(epi_mi * epi_m, (epi_mi + 1) * epi_m)
              cols = slice(epi_ni * epi_n, (epi_ni + 1) * epi_n)
              slot = (epi_mi * (wg_n // epi_n) + epi_ni) % num_out_slots
              plgpu.wait_smem_to_gmem(num_out_slots - 1, wait_read_only=True)
              out_smem[wg, slot] = out[rows, cols]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                out_smem.at[wg, slot],
                out_gmem.at[m_slice, n_slice].at[:, wg_n_slice].at[rows, cols],
              )

      def mma_body(_, x_smem, w_smem, acc_ref):
        if w_nk:
          w_tile = plgpu.transpose_ref(w_smem.at[wg_n_slice], (1, 0))
        else:
          w_tile = w_smem.at[:, wg_n_slice]
        plgpu.wgmma(acc_ref, x_smem, w_tile)
        plgpu.wgmma_wait(0)
        return acc_ref

      get_pipeline(mma_body, compute_context)(
        x_gmem.at[m_slice, :],
        w_gmem.at[n_slice, :] if w_nk else w_gmem.at[:, n_slice],
        allocations=pipeline_allocs,
      )

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


W_LAYOUTS = ("kn", "nk")


def int8_matmul_mgpu_padded(
  x_q: jax.Array,
  w_q: jax.Array,
  x_scale: jax.Array,
  w_scale: jax.Array,
  *,
  out_dtype,
  block_sizes: BlockSizes,
  interpret: bool,
  w_layout: str = "kn",
  grid_size: int | None = None,
) -> jax.Array:
  """The kernel on block-aligned operands: x_q [M, K], scales [M] and [N].

  ``w_layout``: "kn" for w_q [K, N], "nk" for the pre-transposed w_q [N, K] that the
  compiled kernel reads (a "kn" weight is transposed first, one pass over it). M, N and K
  must be multiples of block_m, block_n and block_k (callers pad). ``grid_size`` is the
  number of persistent CTAs (None: the device's SMs), capped at the number of output tiles.
  """
  if w_layout not in W_LAYOUTS:
    raise ValueError(
      f"int8_matmul_mgpu_padded: w_layout must be one of {W_LAYOUTS}, got {w_layout!r}"
    )
  plgpu = _plgpu()
  bs = block_sizes
  mp, kp = x_q.shape
  np_ = w_q.shape[1] if w_layout == "kn" else w_q.shape[0]
  if mp % bs.block_m or np_ % bs.block_n or kp % bs.block_k:
    raise ValueError(
      f"int8_matmul_mgpu_padded: shapes x_q={x_q.shape}, w_q={w_q.shape} ({w_layout}) are "
      f"not multiples of {bs}"
    )
  # The compiled kernel reads K-major weights; the interpreter reads [K, N] (see _kernel).
  w_nk = not interpret
  if w_nk != (w_layout == "nk"):
    w_q = w_q.T
  tiles = (mp // bs.block_m) * (np_ // bs.block_n)
  grid = min(grid_size or num_sms(), tiles)
  call = plgpu.kernel(
    functools.partial(_kernel, bs=bs, num_stages=bs.num_stages or 3, w_nk=w_nk),
    out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
    grid=(grid,),
    grid_names=("sm",),
    num_threads=3,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    interpret=gpu_interpret_params() if interpret else None,
  )
  return call(x_q, w_q, x_scale.astype(jnp.float32), w_scale.astype(jnp.float32))
