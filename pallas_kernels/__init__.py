"""Pallas kernels of amber_jax: N:M-sparse matmul (fused, or mask pass + dot) and W8A8 int8.

Each op has a plain-jnp reference (``*_reference``, or ``amber_jax.core.sparsity.sparsify`` for
the mask), takes frozen block sizes and ``interpret=``; see each module's docstring for its
backends (Triton on GPU, Mosaic on TPU, Mosaic GPU for the Hopper int8 kernel).

The op functions exported here shadow their modules as attributes of the package
(``pallas_kernels.nm_matmul`` is the function); reach the rest of a module with
``from pallas_kernels.common import BlockSizes, TUNED_BLOCK_SIZES`` (the helpers all kernels
share live in ``pallas_kernels.common``).
"""

from pallas_kernels.common import BlockSizes
from pallas_kernels.int8_matmul import (
  int8_matmul,
  int8_matmul_reference,
  nm_int8_matmul,
  nm_int8_matmul_reference,
  quantize_per_channel,
  quantize_per_token,
)
from pallas_kernels.nm_mask import MaskBlockSizes, nm_mask, nm_matmul_two_pass
from pallas_kernels.nm_matmul import nm_mask_in_kernel, nm_matmul, nm_matmul_reference

__all__ = [
  "BlockSizes",
  "MaskBlockSizes",
  "int8_matmul",
  "int8_matmul_reference",
  "nm_int8_matmul",
  "nm_int8_matmul_reference",
  "nm_mask",
  "nm_mask_in_kernel",
  "nm_matmul",
  "nm_matmul_reference",
  "nm_matmul_two_pass",
  "quantize_per_channel",
  "quantize_per_token",
]
