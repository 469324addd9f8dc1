"""amber_jax.core.quant: W8A8 error bounds, exactness, the int8 jaxpr, smoothing and bad input.

Errors are reported, not only asserted: run with ``-s`` to see the ``[quant] ...`` lines.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.core.quant import (
  int8_dot_general,
  quantize_activation,
  quantize_weight,
  smoothing_factors,
  w8a8_matmul,
  weight_input_absmax,
)

T, I, O = 48, 256, 192


def _x(seed: int = 0, shape=(T, I), outliers: bool = False) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  if outliers:  # a few input channels 30-60x larger, as in LLM activations
    cols = rng.choice(shape[-1], size=4, replace=False)
    x[..., cols] *= rng.uniform(30.0, 60.0, size=4).astype(np.float32)
  return x


def _w(seed: int = 1, shape=(I, O)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _rel_err(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_quantize_weight_round_trip():
  w = _w()
  w_q, scale = quantize_weight(jnp.asarray(w))
  assert w_q.dtype == jnp.int8 and w_q.shape == (I, O)
  assert scale.dtype == jnp.float32 and scale.shape == (O,)
  w_q, scale = np.asarray(w_q, np.int32), np.asarray(scale)
  assert np.abs(w_q).max() <= 127 and np.all(np.abs(w_q).max(axis=0) == 127)
  np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
  err = np.abs(w_q * scale[None, :] - w)
  ratio = float((err / scale[None, :]).max())
  print(f"[quant] weight round trip: max |dequant - w| / scale = {ratio:.6f} (bound 0.5)")
  assert ratio <= 0.5 + 1e-5


def test_quantize_weight_zero_column_safe():
  w = _w()
  w[:, 3] = 0.0
  w_q, scale = quantize_weight(jnp.asarray(w))
  assert float(scale[3]) == 1.0 and not np.any(np.asarray(w_q[:, 3]))
  assert np.all(np.isfinite(np.asarray(scale)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_activation_token_round_trip(dtype):
  x = jnp.asarray(_x(shape=(2, T, I)), dtype)
  x_q, scale = quantize_activation(x)
  assert x_q.dtype == jnp.int8 and x_q.shape == x.shape
  assert scale.dtype == jnp.float32 and scale.shape == (2, T, 1)
  x32 = np.asarray(x.astype(jnp.float32))
  err = np.abs(np.asarray(x_q, np.float32) * np.asarray(scale) - x32)
  ratio = float((err / np.asarray(scale)).max())
  print(f"[quant] token round trip ({jnp.dtype(dtype).name}): max err / scale = {ratio:.6f}")
  assert ratio <= 0.5 + 1e-5


def test_quantize_activation_zero_row_safe():
  x = _x()
  x[5] = 0.0
  x_q, scale = quantize_activation(jnp.asarray(x))
  assert float(scale[5, 0]) == 1.0 and not np.any(np.asarray(x_q[5]))
  assert np.all(np.isfinite(np.asarray(scale)))


def test_non_finite_rows_give_non_finite_scales_and_outputs():
  x = _x()
  x[3, 10], x[7, 0], x[9, 100] = np.nan, np.inf, -np.inf
  _, scale = quantize_activation(jnp.asarray(x))
  assert np.isinf(np.asarray(scale)[[3, 7, 9], 0]).all()  # NaN too: XLA's max may drop NaN
  w_q, w_s = quantize_weight(jnp.asarray(_w()))
  y = np.asarray(w8a8_matmul(jnp.asarray(x), w_q, w_s))
  finite = np.isfinite(y)
  assert not finite[[3, 7, 9]].any()  # never silently finite, as the dense product
  assert finite[np.setdiff1d(np.arange(T), [3, 7, 9])].all()


def test_quantize_activation_tensor_static_and_clip():
  x = _x()
  static = jnp.float32(np.abs(x).max() / 127)
  x_q, scale = quantize_activation(jnp.asarray(x), mode="tensor", static_scale=static)
  assert scale.shape == () and scale.dtype == jnp.float32
  err = np.abs(np.asarray(x_q, np.float32) * float(scale) - x)
  ratio = float(err.max() / float(scale))
  print(f"[quant] tensor round trip: max err / scale = {ratio:.6f} (bound 0.5)")
  assert ratio <= 0.5 + 1e-5
  # A scale calibrated on a smaller range clips the larger values to +-127.
  small = jnp.float32(0.5 * np.abs(x).max() / 127)
  x_q, _ = quantize_activation(jnp.asarray(x), mode="tensor", static_scale=small)
  x_q = np.asarray(x_q, np.int32)
  big = np.abs(x) > 127.5 * float(small)
  assert big.any() and np.all(np.abs(x_q[big]) == 127) and np.abs(x_q).max() == 127
  np.testing.assert_array_equal(np.sign(x_q[big]), np.sign(x[big]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_w8a8_matmul_close_to_float(dtype):
  x, w = jnp.asarray(_x(), dtype), jnp.asarray(_w(), dtype)
  w_q, w_s = quantize_weight(w)
  y = jax.jit(w8a8_matmul)(x, w_q, w_s)
  assert y.dtype == dtype and y.shape == (T, O)
  x32, w32 = np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
  ref = x32 @ w32
  rel = _rel_err(y.astype(jnp.float32), ref)
  # Eager and jitted agree; the int8 path is deterministic.
  np.testing.assert_array_equal(np.asarray(w8a8_matmul(x, w_q, w_s)), np.asarray(y))
  static = jnp.float32(np.abs(x32).max() / 127)
  y_t = w8a8_matmul(x, w_q, w_s, act_mode="tensor", act_static_scale=static)
  rel_t = _rel_err(y_t.astype(jnp.float32), ref)
  print(
    f"[quant] w8a8 vs float ({jnp.dtype(dtype).name}): rel err token={rel:.2e} tensor={rel_t:.2e}"
  )
  assert rel < 2e-2 and rel_t < 5e-2


def test_w8a8_matmul_batched_matches_flat():
  x = jnp.asarray(_x(shape=(3, 16, I)))
  w_q, w_s = quantize_weight(jnp.asarray(_w()))
  y = w8a8_matmul(x, w_q, w_s)
  y_flat = w8a8_matmul(x.reshape(-1, I), w_q, w_s)
  np.testing.assert_array_equal(np.asarray(y).reshape(-1, O), np.asarray(y_flat))


def test_w8a8_matmul_exact_for_integers():
  # Integers in [-127, 127] with absmax exactly 127 per row (x) and per column (w): every scale
  # is exactly 1, so the result is the integer matmul (|acc| <= 256 * 127**2 < 2**24: exact f32).
  rng = np.random.default_rng(3)
  x = rng.integers(-127, 128, size=(T, I))
  w = rng.integers(-127, 128, size=(I, O))
  x[np.arange(T), rng.integers(0, I, size=T)] = 127
  w[rng.integers(0, I, size=O), np.arange(O)] = -127
  w_q, w_s = quantize_weight(jnp.asarray(w, jnp.float32))
  assert np.all(np.asarray(w_s) == 1.0)
  np.testing.assert_array_equal(np.asarray(w_q), w)
  y = w8a8_matmul(jnp.asarray(x, jnp.float32), w_q, w_s)
  ref = x.astype(np.int64) @ w.astype(np.int64)
  max_diff = float(np.abs(np.asarray(y, np.float64) - ref).max())
  print(
    f"[quant] integer inputs: max |w8a8 - int matmul| = {max_diff} (max |ref| {np.abs(ref).max()})"
  )
  np.testing.assert_array_equal(np.asarray(y, np.float64), ref.astype(np.float64))
  acc = int8_dot_general(
    jnp.asarray(x, jnp.int8), jnp.asarray(w, jnp.int8), (((1,), (0,)), ((), ()))
  )
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(acc), ref)


def _dot_generals(jaxpr):
  """All dot_general equations of a jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        if hasattr(sub, "eqns"):  # Jaxpr
          found += _dot_generals(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # ClosedJaxpr
          found += _dot_generals(sub.jaxpr)
  return found


def test_w8a8_jaxpr_has_int8_dot_only():
  x = jnp.asarray(_x())
  w_q, w_s = quantize_weight(jnp.asarray(_w()))
  closed = jax.make_jaxpr(lambda x: w8a8_matmul(x, w_q, w_s))(x)
  dots = _dot_generals(closed.jaxpr)
  kinds = [([str(v.aval.dtype) for v in e.invars], str(e.outvars[0].aval.dtype)) for e in dots]
  print(f"[quant] dot_generals in the w8a8 jaxpr: {kinds}")
  assert (["int8", "int8"], "int32") in kinds
  assert all(ins == ["int8", "int8"] and out == "int32" for ins, out in kinds), kinds
  jitted = jax.make_jaxpr(jax.jit(lambda x: w8a8_matmul(x, w_q, w_s)))(x)
  assert len(_dot_generals(jitted.jaxpr)) == len(dots) >= 1


@pytest.mark.parametrize("kind", ["smoothquant", "outstanding", "none"])
def test_smoothing_keeps_dense_output(kind):
  x, w = _x(outliers=True), _w()
  s = smoothing_factors(
    jnp.asarray(np.abs(x).max(axis=0)),
    weight_input_absmax(jnp.asarray(w)),
    alpha=0.5 if kind == "smoothquant" else 0.10,
    kind=kind,
  )
  assert s.shape == (I,) and s.dtype == jnp.float32
  s = np.asarray(s)
  if kind == "none":
    np.testing.assert_array_equal(s, np.ones(I, np.float32))
  smoothed = (jnp.asarray(x) / s[None, :]) @ (s[:, None] * jnp.asarray(w))
  ref = x @ w
  rel = _rel_err(smoothed, ref)
  print(
    f"[quant] smoothing {kind}: rel |(x/s)(sW) - xW| = {rel:.2e}, "
    f"s in [{s.min():.3g}, {s.max():.3g}]"
  )
  assert rel < 1e-5


def test_weight_input_absmax_layout():
  w = _w()
  np.testing.assert_array_equal(np.asarray(weight_input_absmax(jnp.asarray(w))), np.abs(w).max(1))


def test_smoothquant_half_balances_ranges():
  x, w = _x(outliers=True), _w()
  a, wm = np.abs(x).max(axis=0), np.abs(w).max(axis=1)
  s = np.asarray(smoothing_factors(jnp.asarray(a), jnp.asarray(wm), alpha=0.5, kind="smoothquant"))
  x_range = np.abs(x / s[None, :]).max(axis=0)
  w_range = np.abs(w * s[:, None]).max(axis=1)
  rel = float(np.max(np.abs(x_range - w_range) / w_range))
  print(f"[quant] smoothquant alpha=0.5: max rel |max|X_j/s_j| - max|W_j s_j|| = {rel:.2e}")
  assert rel < 1e-5
  # Clamping: zero maxima stay finite, s stays in [1e-5, 1e5].
  s0 = smoothing_factors(
    jnp.asarray([0.0, 1e9, 1.0]), jnp.asarray([1.0, 1e-9, 0.0]), alpha=0.9, kind="smoothquant"
  )
  assert np.all(np.isfinite(np.asarray(s0)))
  assert float(s0.min()) >= 1e-5 * (1 - 1e-6) and float(s0.max()) <= 1e5 * (1 + 1e-6)


def test_outstanding_widens_activation_range():
  x, w = _x(outliers=True), _w()
  a, wm = np.abs(x).max(axis=0), np.abs(w).max(axis=1)
  s_out = np.asarray(
    smoothing_factors(jnp.asarray(a), jnp.asarray(wm), alpha=0.10, kind="outstanding")
  )
  s_sq = np.asarray(
    smoothing_factors(jnp.asarray(a), jnp.asarray(wm), alpha=0.10, kind="smoothquant")
  )
  np.testing.assert_allclose(s_out, 1.0 / s_sq, rtol=1e-6)
  ratio = lambda r: float(r.max() / r.min())
  before = ratio(a)
  after = ratio(np.abs(x / s_out[None, :]).max(axis=0))
  sq = ratio(np.abs(x / s_sq[None, :]).max(axis=0))
  print(
    f"[quant] channel range ratio max/min of max|X_j/s_j|: none={before:.1f} "
    f"outstanding(0.10)={after:.1f} smoothquant(0.10)={sq:.1f}"
  )
  assert after > before > sq


def test_bad_inputs_raise():
  x = jnp.asarray(_x())
  w_q, w_s = quantize_weight(jnp.asarray(_w()))
  with pytest.raises(ValueError, match=r"mode must be one of \('token', 'tensor'\)"):
    quantize_activation(x, mode="channel")
  with pytest.raises(ValueError, match="mode must be one of"):
    w8a8_matmul(x, w_q, w_s, act_mode="row")
  with pytest.raises(ValueError, match="needs static_scale"):
    quantize_activation(x, mode="tensor")
  with pytest.raises(ValueError, match="static_scale is only used"):
    quantize_activation(x, static_scale=1.0)
  with pytest.raises(ValueError, match="static_scale must be a scalar"):
    quantize_activation(x, mode="tensor", static_scale=jnp.ones((T, 1)))
  with pytest.raises(TypeError, match="x must be floating point"):
    quantize_activation(x.astype(jnp.int32))
  a = jnp.ones((I,))
  with pytest.raises(ValueError, match=r"kind must be one of \('smoothquant', 'outstanding'"):
    smoothing_factors(a, a, alpha=0.5, kind="awq")
  for alpha in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
      smoothing_factors(a, a, alpha=alpha, kind="smoothquant")
  with pytest.raises(ValueError, match="same length"):
    smoothing_factors(a, jnp.ones((I + 1,)), alpha=0.5, kind="smoothquant")
  dims = (((1,), (0,)), ((), ()))
  with pytest.raises(TypeError, match="lhs_q must be int8, got lhs_q.dtype=float32"):
    int8_dot_general(x, w_q, dims)
  with pytest.raises(TypeError, match="rhs_q must be int8"):
    int8_dot_general(w_q.T, w_q.astype(jnp.int32), dims)
  with pytest.raises(TypeError, match="rhs_q must be int8"):
    w8a8_matmul(x, w_q.astype(jnp.float32), w_s)
  with pytest.raises(ValueError, match="last axis must equal"):
    w8a8_matmul(x[:, :-1], w_q, w_s)
  with pytest.raises(ValueError, match="w_scale must have shape"):
    w8a8_matmul(x, w_q, w_s[:-1])
  with pytest.raises(ValueError, match="must be 2-D"):
    quantize_weight(jnp.ones((2, 3, 4)))
