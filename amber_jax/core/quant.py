"""W8A8 quantization and SmoothQuant-style smoothing, as pure jnp functions (jit-safe, CPU-safe).

Conventions (the same as ``pallas_kernels.int8_matmul``, without its 2-D-only checks and Pallas
import): symmetric int8 with codes in [-127, 127] (-128 is never used), ``scale = absmax / 127``
in float32, ``q = clip(round(a / scale), -127, 127)``; an all-zero row or column gets scale 1
and zero codes (never a division by zero). Weights are laid out ``[d_in, d_out]`` (``w_IxO``):
the contraction axis is 0.

* ``quantize_weight(w_IxO)``: per output channel, ``(w_q int8 [I, O], scale float32 [O])``.
* ``quantize_activation(x, mode=...)``: per-token dynamic (``"token"``, the default) or
  per-tensor static (``"tensor"``, with a calibrated scale).
* ``int8_dot_general(lhs_q, rhs_q, dimension_numbers)``: ``lax.dot_general`` on int8 operands
  accumulating in int32 (exact while ``127 * 127 * K < 2**31``, i.e. K <= 133,144).
* ``w8a8_matmul(x, w_q, w_scale)``: quantize x, int8 dot in int32, rescale in float32.
* ``smoothing_factors(...)`` / ``weight_input_absmax(w_IxO)``: SmoothQuant factors and the
  paper's inverted "Outstanding-sparse" factors. The smoothed computation is
  ``(x / s) @ (s[:, None] * W)``: the activation is divided by s, the weight rows (input
  channels) are multiplied by s, so the dense output is unchanged.

Non-finite activations: per-token quantization gives a row holding NaN or inf an inf scale, so
the row's W8A8 output is non-finite (NaN or inf), as the dense one would be, never silently
finite. A static per-tensor scale cannot carry it: there a NaN
entry's code is what XLA makes of NaN cast to int8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

INT8_MAX = 127
ACT_MODES = ("token", "tensor")
SMOOTHING_KINDS = ("smoothquant", "outstanding", "none")
# SmoothQuant's clamps: maxima below this are treated as this (no 0 ** negative power), and the
# factor is kept inside [_S_MIN, _S_MAX].
_ABSMAX_MIN = 1e-5
_S_MIN = 1e-5
_S_MAX = 1e5


def _check_float(a: jax.Array, name: str, op: str) -> None:
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{op}: {name} must be floating point, got {name}.dtype={a.dtype}")


def quantize_with_scale(a32: jax.Array, scale: jax.Array) -> jax.Array:
  """int8 codes ``clip(round(a32 / scale), -127, 127)`` of a float32 array."""
  return jnp.clip(jnp.round(a32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def absmax_scale(a32: jax.Array, axis: int) -> jax.Array:
  """Symmetric scale ``absmax / 127`` along ``axis`` (kept), 1 where the absmax is 0.

  A slice holding NaN or inf gets an inf scale, so its dequantized products stay non-finite.
  NaN is mapped to inf first because XLA's CPU max reduction may drop NaN, and a NaN absmax
  would fail ``absmax > 0`` and become scale 1 with finite codes: the NaN would vanish."""
  magnitude = jnp.abs(a32)
  magnitude = jnp.where(jnp.isnan(magnitude), jnp.inf, magnitude)
  absmax = jnp.max(magnitude, axis=axis, keepdims=True)
  return jnp.where(absmax > 0, absmax / INT8_MAX, jnp.float32(1.0))


def quantize_weight(w_IxO: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel int8 quantization of a ``[d_in, d_out]`` weight.

  Args:
    w_IxO: floating-point weight, shape ``[I, O]``.

  Returns:
    ``(w_q, scale)``: ``w_q`` int8 ``[I, O]`` with codes in [-127, 127] and ``scale`` float32
    ``[O]`` (``absmax / 127`` of each column; 1 for an all-zero column), so that
    ``w ~ w_q * scale`` with ``|w_q * scale - w| <= scale / 2`` per element.
  """
  _check_float(w_IxO, "w_IxO", "quantize_weight")
  if w_IxO.ndim != 2:
    raise ValueError(f"quantize_weight: w_IxO must be 2-D [d_in, d_out], got {w_IxO.shape=}")
  w32 = w_IxO.astype(jnp.float32)
  scale_1xO = absmax_scale(w32, axis=0)
  return quantize_with_scale(w32, scale_1xO), scale_1xO[0]


def quantize_activation(
  x: jax.Array, *, mode: str = "token", static_scale: jax.Array | float | None = None
) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 quantization of an activation (last axis = input channels).

  Args:
    x: floating-point activation, any leading shape, at least 1-D.
    mode: ``"token"``: per-token dynamic scale ``absmax / 127`` over the last axis, shape
      ``x.shape[:-1] + (1,)`` (1 for an all-zero row). ``"tensor"``: one static scale for the
      whole tensor, given by calibration (``static_scale``); values beyond ``127 * scale``
      are clipped to +-127.
    static_scale: the per-tensor scale (a positive float32 scalar, e.g. calibrated
      ``absmax / 127``); required for ``"tensor"``, must be None for ``"token"``.

  Returns:
    ``(x_q, scale)``: ``x_q`` int8 of ``x``'s shape, ``scale`` float32 (``x.shape[:-1] + (1,)``
    for "token", shape ``()`` for "tensor"), with ``x ~ x_q * scale``.
  """
  op = "quantize_activation"
  _check_float(x, "x", op)
  if x.ndim < 1:
    raise ValueError(f"{op}: x needs at least 1 axis, got {x.shape=}")
  x32 = x.astype(jnp.float32)
  if mode == "token":
    if static_scale is not None:
      raise ValueError(f"{op}: static_scale is only used with mode='tensor', got mode={mode!r}")
    scale = absmax_scale(x32, axis=-1)
  elif mode == "tensor":
    if static_scale is None:
      raise ValueError(f"{op}: mode='tensor' needs static_scale (a calibrated float32 scalar)")
    scale = jnp.asarray(static_scale, jnp.float32)
    if scale.shape != ():
      raise ValueError(f"{op}: static_scale must be a scalar, got static_scale.shape={scale.shape}")
  else:
    raise ValueError(f"{op}: mode must be one of {ACT_MODES}, got mode={mode!r}")
  return quantize_with_scale(x32, scale), scale


def int8_dot_general(
  lhs_q: jax.Array,
  rhs_q: jax.Array,
  dimension_numbers: lax.DotDimensionNumbers,
) -> jax.Array:
  """``lax.dot_general`` of two int8 operands with int32 accumulation (and int32 result).

  Raises:
    TypeError: if either operand is not int8 (no silent upcast to a float dot).
  """
  for name, a in (("lhs_q", lhs_q), ("rhs_q", rhs_q)):
    if a.dtype != jnp.int8:
      raise TypeError(f"int8_dot_general: {name} must be int8, got {name}.dtype={a.dtype}")
  return lax.dot_general(lhs_q, rhs_q, dimension_numbers, preferred_element_type=jnp.int32)


def w8a8_matmul(
  x: jax.Array,
  w_q: jax.Array,
  w_scale: jax.Array,
  *,
  act_mode: str = "token",
  act_static_scale: jax.Array | float | None = None,
) -> jax.Array:
  """W8A8 matmul ``x @ w``: quantize x, int8 x int8 -> int32 dot, rescale in float32.

  Args:
    x: floating-point activation ``[..., I]``.
    w_q: int8 weight ``[I, O]`` (from ``quantize_weight``).
    w_scale: float32 per-output-channel scale ``[O]``.
    act_mode, act_static_scale: the activation quantization (see ``quantize_activation``).

  Returns:
    ``acc.astype(float32) * x_scale * w_scale`` cast to ``x.dtype``, shape ``[..., O]``.
  """
  op = "w8a8_matmul"
  _check_float(x, "x", op)
  if w_q.ndim != 2:
    raise ValueError(f"{op}: w_q must be 2-D [d_in, d_out], got {w_q.shape=}")
  if x.ndim < 1 or x.shape[-1] != w_q.shape[0]:
    raise ValueError(
      f"{op}: x's last axis must equal w_q's first (d_in), got {x.shape=} and {w_q.shape=}"
    )
  if w_scale.shape != (w_q.shape[1],):
    raise ValueError(f"{op}: w_scale must have shape ({w_q.shape[1]},), got {w_scale.shape=}")
  x_q, x_scale = quantize_activation(x, mode=act_mode, static_scale=act_static_scale)
  return int8_rescaled_dot(x_q, x_scale, w_q, w_scale, out_dtype=x.dtype)


def int8_rescaled_dot(x_q, x_scale, w_q, w_scale, *, out_dtype) -> jax.Array:
  """``x_q [..., I] int8 @ w_q [I, O] int8`` accumulated in int32, then
  ``acc * x_scale * w_scale`` in float32 (x_scale per token [..., 1] or a scalar, w_scale [O]),
  cast to ``out_dtype``: the W8A8 product and its rescale, written once."""
  acc = int8_dot_general(x_q, w_q, (((x_q.ndim - 1,), (0,)), ((), ())))  # [..., O] int32
  w_scale_O = w_scale.astype(jnp.float32).reshape((1,) * (acc.ndim - 1) + (-1,))
  return (acc.astype(jnp.float32) * x_scale * w_scale_O).astype(out_dtype)


def weight_input_absmax(w_IxO: jax.Array) -> jax.Array:
  """``max_k |W[j, k]|`` per input channel j: SmoothQuant's ``max|W_j|`` for a ``[d_in, d_out]``
  weight, float32 ``[I]``.

  For several weights sharing one input (q/k/v, gate/up), take the elementwise maximum of
  their results.
  """
  _check_float(w_IxO, "w_IxO", "weight_input_absmax")
  if w_IxO.ndim != 2:
    raise ValueError(f"weight_input_absmax: w_IxO must be 2-D [d_in, d_out], got {w_IxO.shape=}")
  return jnp.max(jnp.abs(w_IxO.astype(jnp.float32)), axis=1)


def smoothing_factors(
  act_absmax_I: jax.Array, w_absmax_I: jax.Array, *, alpha: float, kind: str
) -> jax.Array:
  """Per-input-channel smoothing factors s, float32 ``[I]``.

  The smoothed computation is ``(x / s) @ (s[:, None] * W)`` for W ``[d_in, d_out]``: the
  activation is DIVIDED by s (or s folded into the preceding normalisation) and the weight
  rows (input channels) are MULTIPLIED by s, so dense outputs are unchanged.

  Args:
    act_absmax_I: calibrated ``max |X[:, j]|`` per input channel, ``[I]``.
    w_absmax_I: ``max |W_j|`` per input channel (``weight_input_absmax``), ``[I]``.
    alpha: migration strength in [0, 1] (SmoothQuant uses 0.5; the paper's Outstanding-sparse
      uses 0.10 with kind "outstanding": the caller passes it).
    kind: ``"smoothquant"``: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (both maxima
      clamped to >= 1e-5, s clamped to [1e-5, 1e5]), which balances the two ranges.
      ``"outstanding"``: ``1 / s_j`` of the same s, which *widens* the activation range
      (outlier channels stand out more). ``"none"``: ones.

  Raises:
    ValueError: for an unknown kind, alpha outside [0, 1] (checked when alpha is concrete) or
      mismatched shapes.
  """
  op = "smoothing_factors"
  if kind not in SMOOTHING_KINDS:
    raise ValueError(f"{op}: kind must be one of {SMOOTHING_KINDS}, got kind={kind!r}")
  if not isinstance(alpha, jax.core.Tracer):
    alpha_f = float(alpha)
    if not 0.0 <= alpha_f <= 1.0:
      raise ValueError(f"{op}: alpha must be in [0, 1], got alpha={alpha!r}")
  if act_absmax_I.ndim != 1 or act_absmax_I.shape != w_absmax_I.shape:
    raise ValueError(
      f"{op}: act_absmax_I and w_absmax_I must be 1-D of the same length, got "
      f"{act_absmax_I.shape=} and {w_absmax_I.shape=}"
    )
  if kind == "none":
    return jnp.ones(act_absmax_I.shape, jnp.float32)
  a = jnp.maximum(act_absmax_I.astype(jnp.float32), _ABSMAX_MIN)
  w = jnp.maximum(w_absmax_I.astype(jnp.float32), _ABSMAX_MIN)
  alpha32 = jnp.asarray(alpha, jnp.float32)
  s = jnp.clip(a**alpha32 / w ** (1.0 - alpha32), _S_MIN, _S_MAX)
  return s if kind == "smoothquant" else 1.0 / s
