"""Implementation choice of the sparse matmul at the injection point.

* ``xla``: the mask in plain jnp (``sparsify``), then an XLA dot. Runs everywhere.
* ``pallas``: the fused kernel of ``pallas_kernels.nm_matmul`` (mask computed on each
  activation tile, never written to memory): Triton on GPU, Mosaic on TPU, the Pallas
  interpreter on CPU (slow: for tests).
* W8A8 sites (a plan with a quant part): under either Pallas impl the int8 product runs in
  ``pallas_kernels.int8_matmul`` (Triton on GPU; the Mosaic GPU kernel only by name).
* ``pallas_mask``: two passes, ``pallas_kernels.nm_mask`` (the mask as one memory-bound
  Pallas kernel) then XLA's dot; the masked activation goes through memory once. Not yet
  timed on a GPU.

The default is ``xla`` on every backend: measured on an H200 (BENCHMARKS.md), the XLA path
with the sorting-network mask runs a Llama-3.1-8B-shaped 8:16 prefill at 1.35x the dense
time, the fused Triton kernel at 3.7x (it is correct but not yet fast). Switch the default
when a kernel wins. Asking by name for an implementation that cannot run is an error, never a
silent fallback.
"""

from __future__ import annotations

import dataclasses

import jax

from amber_jax.patterns import NMPattern

IMPLS = ("xla", "pallas", "pallas_mask")
PALLAS_IMPLS = ("pallas", "pallas_mask")


def default_impl(backend: str | None = None) -> str:
  """The implementation used when none is named (see the module docstring for why)."""
  del backend  # The same on every backend until a kernel beats XLA somewhere.
  return "xla"


def check_impl(impl: str, pattern: NMPattern | None, backend: str | None = None) -> str:
  """Validates ``impl`` for this pattern on this backend; raises ValueError naming why not."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
  backend = backend or jax.default_backend()
  if impl in PALLAS_IMPLS and pattern is not None:
    if backend == "rocm":
      raise ValueError(f"impl={impl!r} has no kernel for ROCm here; use impl='xla'")
    if backend in ("gpu", "cuda", "cpu") and pattern.m & (pattern.m - 1):
      raise ValueError(
        f"impl={impl!r} (a Triton kernel) needs a power-of-2 M, got pattern {pattern}; "
        "use impl='xla' for this pattern"
      )
  return impl


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Static options of the Pallas path (part of the plan's static fields)."""

  interpret: bool
  # On CPU (interpret mode) every grid step costs milliseconds: use coarse tiles.
  coarse_blocks: bool


def kernel_options(backend: str | None = None) -> KernelOptions:
  """How the model runs the Pallas kernels on ``backend`` (None: JAX's default backend): on
  CPU in the interpreter with coarse tiles (each interpreted grid step costs milliseconds),
  elsewhere compiled with the tuned tiles."""
  backend = backend or jax.default_backend()
  on_cpu = backend == "cpu"
  return KernelOptions(interpret=on_cpu, coarse_blocks=on_cpu)


def _coarse(size: int, cap: int, floor: int = 16) -> int:
  """A power-of-2 tile covering ``size`` up to ``cap`` (few interpreted grid steps on CPU)."""
  from pallas_kernels.nm_matmul import next_power_of_2

  return max(floor, next_power_of_2(min(size, cap)))


def pallas_sparse_matmul(
  x_2d, w, *, impl: str, pattern: NMPattern, factors, options: KernelOptions
):
  """[tokens, K] x [K, N] through a Pallas impl (imported lazily: optional dependency):
  "pallas" the fused kernel, "pallas_mask" the mask pass then XLA's dot."""
  from pallas_kernels.nm_mask import MaskBlockSizes, nm_matmul_two_pass
  from pallas_kernels.nm_matmul import BlockSizes, nm_matmul

  if impl not in PALLAS_IMPLS:
    raise ValueError(f"impl must be one of {PALLAS_IMPLS}, got {impl!r}")
  block_sizes = None
  if options.coarse_blocks:
    tokens, k = x_2d.shape
    k_floor = max(16, pattern.m)
    if impl == "pallas":
      block_sizes = BlockSizes(
        block_m=_coarse(tokens, 512),
        block_n=_coarse(w.shape[1], 2048),
        block_k=_coarse(k, 1024, floor=k_floor),
      )
    else:
      block_sizes = MaskBlockSizes(block_m=_coarse(tokens, 512), block_k=_coarse(k, 2048, k_floor))
  matmul = nm_matmul if impl == "pallas" else nm_matmul_two_pass
  return matmul(
    x_2d,
    w.astype(x_2d.dtype),
    pattern=pattern,
    factors=factors,
    block_sizes=block_sizes,
    interpret=options.interpret,
    backend="triton" if options.interpret else None,
  )


def pallas_int8_matmul(x_q_2d, w_q, x_scale_2d, w_scale_2d, *, out_dtype, options: KernelOptions):
  """W8A8 [tokens, K] int8 x [K, N] int8 through the Pallas int8 kernel (rescale fused)."""
  from pallas_kernels.int8_matmul import int8_matmul
  from pallas_kernels.nm_matmul import BlockSizes

  block_sizes = None
  if options.coarse_blocks:
    tokens, k = x_q_2d.shape
    block_sizes = BlockSizes(
      block_m=_coarse(tokens, 512),
      block_n=_coarse(w_q.shape[1], 2048),
      block_k=_coarse(k, 1024, floor=32),  # int8 MMA depth
    )
  return int8_matmul(
    x_q_2d,
    w_q,
    x_scale_2d,
    w_scale_2d,
    out_dtype=out_dtype,
    block_sizes=block_sizes,
    interpret=options.interpret,
    backend="triton" if options.interpret else None,
  )
