"""The matmul backends of a site's linear: a registry of named implementations behind one op
(``amber_jax.core.linear.site_linear``), as in tokamax; ``register_backend`` adds one (e.g. a
sparse-tensor-core kernel). The built-in ones (``impl=``):

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
import functools
from collections.abc import Callable

import jax

from amber_jax.core.patterns import NMPattern


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulBackend:
  """How a site's matmul runs (tokamax-style: one op, implementations behind it by name).

  ``sparse_matmul(x_2d, w, *, pattern, factors)`` computes the N:M product itself (the mask
  inside the kernel or its own pass), or is None: the mask is taken in jnp and XLA's dot runs.
  ``int8_matmul(x_q_2d, w_q, x_scale_2d, w_scale_2d, *, out_dtype)`` computes the W8A8 product
  with its rescale, or is None: XLA's int8 dot with int32 accumulation. ``check(pattern,
  platform)`` raises ValueError when the backend cannot run that pattern there.
  ``corrections``: whether output corrections (``amber_jax.core.correction``) run on it.
  """

  name: str
  sparse_matmul: Callable | None = None
  int8_matmul: Callable | None = None
  check: Callable[[NMPattern | None, str], None] | None = None
  corrections: bool = False


BACKENDS: dict[str, MatmulBackend] = {}


def register_backend(backend: MatmulBackend) -> MatmulBackend:
  """Adds ``backend`` to the registry under its name (ValueError if the name is taken)."""
  if backend.name in BACKENDS:
    raise ValueError(f"a matmul backend named {backend.name!r} is already registered")
  BACKENDS[backend.name] = backend
  return backend


def get_backend(name: str) -> MatmulBackend:
  """The registered backend ``name``; ValueError listing the registered ones otherwise."""
  if name not in BACKENDS:
    raise ValueError(f"impl must be one of {', '.join(BACKENDS)}, got {name!r}")
  return BACKENDS[name]


def default_impl(backend: str | None = None) -> str:
  """The implementation used when none is named (see the module docstring for why)."""
  del backend  # The same on every backend until a kernel beats XLA somewhere.
  return "xla"


def check_impl(impl: str, pattern: NMPattern | None, backend: str | None = None) -> str:
  """Validates ``impl`` (a registered backend) for this pattern on this platform (``backend``,
  None: JAX's default); raises ValueError naming why not. Never a silent fallback."""
  matmul_backend = get_backend(impl)
  if matmul_backend.check is not None:
    matmul_backend.check(pattern, backend or jax.default_backend())
  return impl


def _check_pallas(impl: str) -> Callable[[NMPattern | None, str], None]:
  def check(pattern: NMPattern | None, platform: str) -> None:
    if pattern is None:
      return
    if platform == "rocm":
      raise ValueError(f"impl={impl!r} has no kernel for ROCm here; use impl='xla'")
    if platform in ("gpu", "cuda", "cpu") and pattern.m & (pattern.m - 1):
      raise ValueError(
        f"impl={impl!r} (a Triton kernel) needs a power-of-2 M, got pattern {pattern}; "
        "use impl='xla' for this pattern"
      )

  return check


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
  from pallas_kernels.common import next_power_of_2

  return max(floor, next_power_of_2(min(size, cap)))


def pallas_sparse_matmul(
  x_2d, w, *, impl: str, pattern: NMPattern, factors, options: KernelOptions | None = None
):
  """[tokens, K] x [K, N] through a Pallas impl (imported lazily: optional dependency):
  "pallas" the fused kernel, "pallas_mask" the mask pass then XLA's dot."""
  from pallas_kernels.common import BlockSizes
  from pallas_kernels.nm_mask import MaskBlockSizes, nm_matmul_two_pass
  from pallas_kernels.nm_matmul import nm_matmul

  if impl not in PALLAS_IMPLS:
    raise ValueError(f"impl must be one of {PALLAS_IMPLS}, got {impl!r}")
  options = kernel_options() if options is None else options
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


def pallas_int8_matmul(
  x_q_2d, w_q, x_scale_2d, w_scale_2d, *, out_dtype, options: KernelOptions | None = None
):
  """W8A8 [tokens, K] int8 x [K, N] int8 through the Pallas int8 kernel (rescale fused)."""
  from pallas_kernels.common import BlockSizes
  from pallas_kernels.int8_matmul import int8_matmul

  options = kernel_options() if options is None else options
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


register_backend(MatmulBackend(name="xla", corrections=True))
for _impl in ("pallas", "pallas_mask"):
  register_backend(
    MatmulBackend(
      name=_impl,
      sparse_matmul=functools.partial(pallas_sparse_matmul, impl=_impl),
      int8_matmul=pallas_int8_matmul,
      check=_check_pallas(_impl),
    )
  )
# The built-in implementations (IMPLS) and those whose matmul is a Pallas kernel.
IMPLS = tuple(BACKENDS)
PALLAS_IMPLS = ("pallas", "pallas_mask")
