"""W8A8 int8 matmul with the dequantization fused in the epilogue, and its N:M variant.

* ``quantize_per_token(x)``: symmetric per-row int8, ``scale = absmax / 127`` (float32,
  [tokens, 1]), codes in [-127, 127]; an all-zero row gets scale 1 and zero codes (never a
  division by zero). The same quantizer as ``amber_jax.core.quant``.
* ``quantize_per_channel(w)``: the same per output column of w [K, N]: scale [1, N].
* ``int8_matmul(x_q, w_q, x_scale, w_scale, *, out_dtype)``: int8 x int8 products
  accumulated in int32 (exact up to K = 133,144 for codes in [-127, 127]), then
  ``acc * x_scale * w_scale`` in float32, cast to ``out_dtype``, in the kernel epilogue.
* ``nm_int8_matmul(x, w_q, w_scale, *, pattern)``: N:M-sparse W8A8 prefill (the paper's
  "Outstanding-sparse" path): ``sparsify`` and the per-token quantization run as one fused
  jnp pass over the activation (the per-token absmax needs the whole sparsified row, which
  no tile sees), then the int8 kernel. Zeros stay zeros under quantization, so the int8
  activation keeps the N:M pattern.

Non-finite activations: a row holding NaN or inf gets an inf scale, so all its outputs are
non-finite (NaN or inf), as in the dense product: sparsity and quantization never turn a
non-finite row finite (its int8 codes are meaningless; the scale carries the non-finite).

Backends:

* ``"triton"`` (the GPU default): grid over output tiles, grouped along M; K loop inside the
  kernel with an int32 register accumulator; ``jnp.dot(..., preferred_element_type=
  jnp.int32)`` lowers to Triton's int8 MMA. Measured 1.9-2.4x slower than XLA's bf16 dot on
  an H200 (BENCHMARKS.md).
* ``"mosaic_gpu"`` (Hopper, by name only until it is measured): warp-specialized TMA + wgmma
  s8 kernel with the same fused epilogue, ``pallas_kernels.int8_matmul_mgpu``. It reads the
  weight K-major: pass ``w_layout="nk"`` with a pre-transposed [N, K] weight to skip the
  transpose that a [K, N] weight costs on every call.
* ``"mosaic_tpu"`` (TPU): K as the last grid axis, int32 VMEM accumulator.

On CPU, ``interpret=True`` is required (the Triton and TPU kernels run in the generic Pallas
interpreter, the Mosaic GPU kernel in Pallas' GPU interpreter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from amber_jax.core.patterns import NMPattern
from amber_jax.core.quant import INT8_MAX, absmax_scale, quantize_with_scale
from amber_jax.core.sparsity import sparsify
from pallas_kernels.common import (
  BACKENDS,
  MOSAIC_GPU,
  MOSAIC_TPU,
  TRITON,
  BlockSizes,
  check_block_sizes,
  grouped_program_ids,
  lookup_block_sizes,
  next_power_of_2,
  pad_to,
  resolve_backend,
  round_up,
  tpu_compiler_params,
  triton_compiler_params,
)
from pallas_kernels.int8_matmul_mgpu import (
  W_LAYOUTS,
  check_mgpu_block_sizes,
  check_mgpu_device,
  int8_matmul_mgpu_padded,
)

# 127 * 127 * K must stay below 2**31 for the int32 accumulator to be exact, with codes in
# [-127, 127] as the quantizers make them (a -128 code lowers the bound to K = 131,072).
MAX_K = (2**31 - 1) // (INT8_MAX * INT8_MAX)

_ANY = (0, 1 << 40)
# (backend, dtype name of x_q, [K lo, K hi), [N lo, N hi)) -> BlockSizes; first match wins.
# Triton int8: the best of bench_kernels --autotune on an H200 (jax 0.11.2, 2026-11-28) at
# 8192 x {4096, 14336} x {4096, 14336}: 256x128x128, 8 warps, 3 stages (1.19 ms at
# 8192x4096x4096, against 1.83-3.12 ms for the other candidates). TPU: untimed.
TUNED_BLOCK_SIZES: dict[tuple[str, str, tuple[int, int], tuple[int, int]], BlockSizes] = {
  (TRITON, "int8", _ANY, _ANY): BlockSizes(
    block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3
  ),
  (MOSAIC_TPU, "int8", _ANY, _ANY): BlockSizes(block_m=256, block_n=256, block_k=512),
  # Untimed: CUTLASS's usual Hopper int8 CTA tile (two warpgroups of 128x128), 3 stages
  # (4 stages with a float32 output exceed the 227 KB of shared memory).
  (MOSAIC_GPU, "int8", _ANY, _ANY): BlockSizes(block_m=128, block_n=256, block_k=128, num_stages=3),
}
_OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_float(a: jax.Array, name: str, op: str) -> None:
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{op}: {name} must be floating point, got {name}.dtype={a.dtype}")
  if a.ndim != 2:
    raise ValueError(f"{op}: {name} must be 2-D, got {name}.shape={a.shape}")


def _quantize(a: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  a32 = a.astype(jnp.float32)
  scale = absmax_scale(a32, axis=axis)
  return quantize_with_scale(a32, scale), scale


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-row int8: returns (x_int8 [M, K], scale float32 [M, 1]); x ~ x_int8*scale."""
  _check_float(x, "x", "quantize_per_token")
  return _quantize(x, axis=1)


def quantize_per_channel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-column int8 of w [K, N]: (w_int8 [K, N], scale float32 [1, N])."""
  _check_float(w, "w", "quantize_per_channel")
  return _quantize(w, axis=0)


def default_block_sizes(backend: str, m_tokens: int, k: int, n: int) -> BlockSizes:
  """Tuned-table entry, shrunk to small problems (Triton: powers of two; TPU: rows of 32,
  columns of 128; Mosaic GPU: rows of 64, warpgroup columns of 8 or 64, K of 128)."""
  base = lookup_block_sizes(TUNED_BLOCK_SIZES, backend, jnp.int8, k, n)
  if backend == MOSAIC_GPU:
    wg_n = min(base.block_n // 2, round_up(-(-n // 2), 8))
    if wg_n > 64:
      wg_n = round_up(wg_n, 64)
    return dataclasses.replace(
      base,
      block_m=min(base.block_m, round_up(max(1, m_tokens), 64)),
      block_n=2 * wg_n,
      block_k=min(base.block_k, round_up(k, 128)),
    )
  if backend == TRITON:
    return dataclasses.replace(
      base,
      block_m=min(base.block_m, max(16, next_power_of_2(m_tokens))),
      block_n=min(base.block_n, max(16, next_power_of_2(n))),
      block_k=min(base.block_k, max(32, next_power_of_2(k))),
    )
  return dataclasses.replace(
    base,
    block_m=min(base.block_m, round_up(max(1, m_tokens), 32)),
    block_n=min(base.block_n, round_up(n, 128)),
    block_k=min(base.block_k, round_up(k, 128)),
  )


def _check_int8_block_sizes(bs: BlockSizes, backend: str, *, op: str) -> None:
  if backend == MOSAIC_GPU:
    if not isinstance(bs, BlockSizes):
      raise TypeError(f"{op}: block_sizes must be a BlockSizes or None, got {bs!r}")
    check_mgpu_block_sizes(bs, op=op)
    return
  check_block_sizes(bs, backend, jnp.int8, op=op)
  if backend == TRITON and bs.block_k < 32:
    raise ValueError(f"{op}: on Triton int8 block_k must be >= 32 (int8 MMA depth), got {bs=}")
  if backend == MOSAIC_TPU and bs.block_m % 32:
    raise ValueError(f"{op}: on TPU int8 block_m must be a multiple of 32, got {bs.block_m=}")


def _triton_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_k: int, num_k: int):
  block_m, block_n = o_ref.shape

  def body(kk, acc):
    k0 = pl.multiple_of(kk * block_k, block_k)
    x = x_ref[:, pl.ds(k0, block_k)]
    w = w_ref[pl.ds(k0, block_k), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), jnp.int32))
  out = acc.astype(jnp.float32) * xs_ref[...][:, None] * ws_ref[...][None, :]
  o_ref[...] = out.astype(o_ref.dtype)


def _tpu_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    out = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret", "backend"))
def _int8_matmul(x_q, w_q, x_scale, w_scale, *, out_dtype, block_sizes, interpret, backend):
  m_tokens, k = x_q.shape
  n_out = w_q.shape[1]
  bs = block_sizes
  mp, kp, np_ = round_up(m_tokens, bs.block_m), round_up(k, bs.block_k), round_up(n_out, bs.block_n)
  x_p = pad_to(x_q, (mp, kp))
  w_p = pad_to(w_q, (kp, np_))
  xs = pad_to(x_scale.astype(jnp.float32), (mp, 1))
  ws = pad_to(w_scale.astype(jnp.float32), (1, np_))
  out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
  num_m, num_n, num_k = mp // bs.block_m, np_ // bs.block_n, kp // bs.block_k

  if backend == TRITON:

    def ids(pid):
      return grouped_program_ids(pid, num_m, num_n)

    out = pl.pallas_call(
      functools.partial(_triton_kernel, block_k=bs.block_k, num_k=num_k),
      out_shape=out_shape,
      grid=(num_m * num_n,),
      in_specs=[
        pl.BlockSpec((bs.block_m, kp), lambda pid: (ids(pid)[0], 0)),
        pl.BlockSpec((kp, bs.block_n), lambda pid: (0, ids(pid)[1])),
        pl.BlockSpec((bs.block_m,), lambda pid: (ids(pid)[0],)),
        pl.BlockSpec((bs.block_n,), lambda pid: (ids(pid)[1],)),
      ],
      out_specs=pl.BlockSpec((bs.block_m, bs.block_n), ids),
      compiler_params=triton_compiler_params(bs.num_warps, bs.num_stages),
      interpret=interpret,
      name="int8_matmul",
    )(x_p, w_p, xs[:, 0], ws[0, :])
  else:
    from jax.experimental.pallas import tpu as pltpu

    out = pl.pallas_call(
      _tpu_kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=0,
        grid=(num_m, num_n, num_k),
        in_specs=[
          pl.BlockSpec((bs.block_m, bs.block_k), lambda i, j, kk: (i, kk)),
          pl.BlockSpec((bs.block_k, bs.block_n), lambda i, j, kk: (kk, j)),
          pl.BlockSpec((bs.block_m, 1), lambda i, j, kk: (i, 0)),
          pl.BlockSpec((1, bs.block_n), lambda i, j, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bs.block_m, bs.block_n), jnp.int32)],
      ),
      compiler_params=tpu_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="int8_matmul",
    )(x_p, w_p, xs, ws)
  return out[:m_tokens, :n_out]


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret", "w_layout"))
def _int8_matmul_mgpu(x_q, w_q, x_scale, w_scale, *, out_dtype, block_sizes, interpret, w_layout):
  m_tokens, k = x_q.shape
  (_, n_out), _ = _weight_layout(w_q, w_layout, op="int8_matmul")
  bs = block_sizes
  mp, kp, np_ = round_up(m_tokens, bs.block_m), round_up(k, bs.block_k), round_up(n_out, bs.block_n)
  w_shape = (kp, np_) if w_layout == "kn" else (np_, kp)
  out = int8_matmul_mgpu_padded(
    pad_to(x_q, (mp, kp)),
    pad_to(w_q, w_shape),
    pad_to(x_scale.astype(jnp.float32), (mp, 1))[:, 0],
    pad_to(w_scale.astype(jnp.float32), (1, np_))[0, :],
    out_dtype=out_dtype,
    block_sizes=bs,
    interpret=interpret,
    w_layout=w_layout,
  )
  return out[:m_tokens, :n_out]


def _weight_layout(w_q: jax.Array, w_layout: str, *, op: str) -> tuple[tuple[int, int], str]:
  """((K, N) of ``w_q`` in ``w_layout``, or (-1, -1) when it is not 2-D; how to name it in
  errors). ValueError for a bad layout."""
  if w_layout not in W_LAYOUTS:
    raise ValueError(f"{op}: w_layout must be one of {W_LAYOUTS}, got {w_layout!r}")
  shape = tuple(w_q.shape) if w_q.ndim == 2 else (-1, -1)
  if w_layout == "kn":
    return shape, "w_q [K, N]"
  return shape[::-1], "w_q [N, K] (w_layout='nk')"


def _check_int8_inputs(x_q, w_q, x_scale, w_scale, out_dtype, *, op: str, w_layout="kn") -> None:
  (w_k, n_out), w_desc = _weight_layout(w_q, w_layout, op=op)
  if x_q.ndim != 2 or w_q.ndim != 2:
    raise ValueError(f"{op}: x_q must be [tokens, K] and {w_desc}, got {x_q.shape=}, {w_q.shape=}")
  if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8:
    raise TypeError(f"{op}: x_q and w_q must be int8, got {x_q.dtype=}, {w_q.dtype=}")
  m_tokens, k = x_q.shape
  if w_k != k:
    raise ValueError(f"{op}: x_q's K must equal that of {w_desc}, got {x_q.shape=}, {w_q.shape=}")
  if k > MAX_K:
    raise ValueError(f"{op}: K={k} would overflow the int32 accumulator (max K {MAX_K})")
  if x_scale.shape != (m_tokens, 1):
    raise ValueError(f"{op}: x_scale must have shape ({m_tokens}, 1), got {x_scale.shape=}")
  if w_scale.shape != (1, n_out):
    raise ValueError(f"{op}: w_scale must have shape (1, {n_out}), got {w_scale.shape=}")
  for name, s in (("x_scale", x_scale), ("w_scale", w_scale)):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      raise TypeError(f"{op}: {name} must be floating point, got {name}.dtype={s.dtype}")
  if jnp.dtype(out_dtype) not in _OUT_DTYPES:
    raise TypeError(f"{op}: out_dtype must be one of float32/bfloat16/float16, got {out_dtype=}")


def int8_matmul(
  x_q: jax.Array,
  w_q: jax.Array,
  x_scale: jax.Array,
  w_scale: jax.Array,
  *,
  out_dtype,
  block_sizes: BlockSizes | None = None,
  interpret=False,
  backend: str | None = None,
  w_layout: str = "kn",
) -> jax.Array:
  """``(x_q @ w_q) * x_scale * w_scale``: int8 x int8 -> int32, dequantized in the epilogue.

  Args:
    x_q: int8 activations [tokens, K]; x_scale: float [tokens, 1] (per token).
    w_q: int8 weights [K, N] (``w_layout="kn"``) or [N, K] (``"nk"``); w_scale: float
      [1, N] (per output channel).
    out_dtype: float32, bfloat16 or float16.
    block_sizes: tile sizes (None: ``TUNED_BLOCK_SIZES``, fitted to the problem).
    interpret: run in the Pallas interpreter (required on CPU).
    backend: "triton", "mosaic_gpu" or "mosaic_tpu"; None: from the platform (GPUs get
      "triton").
    w_layout: "kn" or "nk". The Mosaic GPU kernel reads [N, K]; the others read [K, N]. The
      other layout is transposed on the fly (one pass over the weight per call).
  """
  _check_int8_inputs(x_q, w_q, x_scale, w_scale, out_dtype, op="int8_matmul", w_layout=w_layout)
  backend = resolve_backend(backend, interpret, op="int8_matmul", implemented=BACKENDS)
  k = x_q.shape[1]
  (_, n_out), _ = _weight_layout(w_q, w_layout, op="int8_matmul")
  if block_sizes is None:
    block_sizes = default_block_sizes(backend, x_q.shape[0], k, n_out)
  _check_int8_block_sizes(block_sizes, backend, op="int8_matmul")
  if x_q.shape[0] == 0:  # no rows: a grid of zero programs is not launchable
    return jnp.zeros((0, n_out), out_dtype)
  if backend == MOSAIC_GPU:
    if not interpret:
      check_mgpu_device(jax.devices()[0], op="int8_matmul")
    return _int8_matmul_mgpu(
      x_q,
      w_q,
      x_scale,
      w_scale,
      out_dtype=jnp.dtype(out_dtype),
      block_sizes=block_sizes,
      interpret=interpret,
      w_layout=w_layout,
    )
  return _int8_matmul(
    x_q,
    w_q if w_layout == "kn" else w_q.T,
    x_scale,
    w_scale,
    out_dtype=jnp.dtype(out_dtype),
    block_sizes=block_sizes,
    interpret=interpret,
    backend=backend,
  )


def int8_matmul_reference(x_q, w_q, x_scale, w_scale, *, out_dtype) -> jax.Array:
  """Plain-jnp reference: int32 dot, then the same float32 rescale as the kernel."""
  _check_int8_inputs(x_q, w_q, x_scale, w_scale, out_dtype, op="int8_matmul_reference")
  acc = jnp.dot(x_q, w_q, preferred_element_type=jnp.int32)
  out = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * w_scale.astype(jnp.float32)
  return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("pattern",))
def sparsify_quantize_per_token(
  x: jax.Array, *, pattern: NMPattern, factors: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """``quantize_per_token(sparsify(x, pattern, factors))`` as one jitted (fused) pass."""
  return _quantize(sparsify(x, pattern, factors), axis=1)


def _check_nm_int8_inputs(
  x, w_q, w_scale, factors, pattern: NMPattern, *, op: str, w_layout: str = "kn"
) -> None:
  _check_float(x, "x", op)
  (w_k, _), w_desc = _weight_layout(w_q, w_layout, op=op)
  if w_q.ndim != 2 or x.shape[1] != w_k:
    raise ValueError(f"{op}: x must be [tokens, K] and {w_desc}, got {x.shape=}, {w_q.shape=}")
  pattern.check_width(x.shape[1], where="x.shape[1] (K)")
  if factors is not None and factors.shape != (x.shape[1],):
    raise ValueError(f"{op}: factors must have shape ({x.shape[1]},), got {factors.shape=}")


def nm_int8_matmul(
  x: jax.Array,
  w_q: jax.Array,
  w_scale: jax.Array,
  *,
  pattern: NMPattern | str,
  factors: jax.Array | None = None,
  out_dtype=None,
  block_sizes: BlockSizes | None = None,
  interpret=False,
  backend: str | None = None,
  w_layout: str = "kn",
) -> jax.Array:
  """N:M-sparse W8A8: sparsify + per-token int8 (one fused jnp pass), then ``int8_matmul``.

  ``out_dtype`` defaults to x's dtype; ``w_layout`` as in ``int8_matmul`` (w_q [K, N] or
  [N, K]).
  """
  pattern = NMPattern.parse(pattern)
  _check_nm_int8_inputs(x, w_q, w_scale, factors, pattern, op="nm_int8_matmul", w_layout=w_layout)
  x_q, x_scale = sparsify_quantize_per_token(x, pattern=pattern, factors=factors)
  return int8_matmul(
    x_q,
    w_q,
    x_scale,
    w_scale,
    out_dtype=x.dtype if out_dtype is None else out_dtype,
    block_sizes=block_sizes,
    interpret=interpret,
    backend=backend,
    w_layout=w_layout,
  )


def nm_int8_matmul_reference(
  x: jax.Array,
  w_q: jax.Array,
  w_scale: jax.Array,
  *,
  pattern: NMPattern | str,
  factors: jax.Array | None = None,
  out_dtype=None,
) -> jax.Array:
  """Plain-jnp reference of ``nm_int8_matmul``."""
  pattern = NMPattern.parse(pattern)
  _check_nm_int8_inputs(x, w_q, w_scale, factors, pattern, op="nm_int8_matmul_reference")
  x_q, x_scale = quantize_per_token(sparsify(x, pattern, factors))
  return int8_matmul_reference(
    x_q, w_q, x_scale, w_scale, out_dtype=x.dtype if out_dtype is None else out_dtype
  )
