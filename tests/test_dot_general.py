"""nm_dot_general inside Flax layers that are not ours (linen Dense and nnx Linear)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import amber_jax
from amber_jax.core.dot_general import nm_dot_general
from amber_jax.core.scores import channel_factors


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
  # Flax's own Dense/Linear add a [F] bias to [..., F] outputs: allow implicit rank
  # promotion for these third-party layers (conftest makes it an error elsewhere).
  with jax.numpy_rank_promotion("allow"):
    yield


class LinenMLP(nn.Module):
  dot_general: object = None

  @nn.compact
  def __call__(self, x):
    kw = {} if self.dot_general is None else {"dot_general": self.dot_general}
    h = nn.relu(nn.Dense(64, **kw)(x))
    return nn.Dense(16, **kw)(h)


def _x():
  return jax.random.normal(jax.random.key(0), (3, 5, 32))


def test_linen_dense_equality_when_pattern_none():
  x = _x()
  model_plain = LinenMLP()
  params = model_plain.init(jax.random.key(1), x)
  model_none = LinenMLP(dot_general=nm_dot_general(pattern=None))
  assert nm_dot_general(pattern=None) is jax.lax.dot_general
  np.testing.assert_array_equal(
    jax.jit(model_plain.apply)(params, x), jax.jit(model_none.apply)(params, x)
  )


@pytest.mark.parametrize("score", ["naive", "weight", "robust"])
def test_linen_sparse_matches_manual(score):
  x = _x()
  dg = nm_dot_general(pattern="8:16", score=score)
  model = LinenMLP(dot_general=dg)
  params = LinenMLP().init(jax.random.key(1), x)
  out = jax.jit(model.apply)(params, x)
  k0 = params["params"]["Dense_0"]["kernel"]
  k1 = params["params"]["Dense_1"]["kernel"]
  f0 = channel_factors(k0, score)
  f1 = channel_factors(k1, score)
  h = nn.relu(amber_jax.sparsify(x, "8:16", f0) @ k0 + params["params"]["Dense_0"]["bias"])
  want = amber_jax.sparsify(h, "8:16", f1) @ k1 + params["params"]["Dense_1"]["bias"]
  err = float(jnp.max(jnp.abs(out - want)))
  print(f"linen {score}: max abs error vs manual {err:.2e}")
  assert err < 1e-4
  dense = LinenMLP().apply(params, x)
  assert float(jnp.max(jnp.abs(out - dense))) > 1e-3  # sparsity really happened


def test_nnx_linear_sparse():
  rngs = nnx.Rngs(0)
  dg = nm_dot_general(pattern="2:4")
  layer = nnx.Linear(32, 8, dot_general=dg, rngs=rngs)
  x = _x()

  @nnx.jit
  def run(layer, x):
    return layer(x)

  out = run(layer, x)
  want = amber_jax.sparsify(x, "2:4") @ layer.kernel[...] + layer.bias[...]
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_contracting_axis_not_last():
  x = jax.random.normal(jax.random.key(2), (16, 3))  # contract over axis 0
  w = jax.random.normal(jax.random.key(3), (16, 4))
  dg = nm_dot_general(pattern="4:8")
  out = dg(x, w, (((0,), (0,)), ((), ())))
  want = amber_jax.sparsify(x.T, "4:8") @ w
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="score must be one of"):
    nm_dot_general(pattern="8:16", score="nope")
  with pytest.raises(ValueError, match="pattern"):
    nm_dot_general(pattern="8:4")
  dg = nm_dot_general(pattern="2:4")
  x = jnp.ones((2, 4, 4))
  w = jnp.ones((4, 4, 3))
  with pytest.raises(ValueError, match="exactly one contracting axis"):
    dg(x, w, (((1, 2), (0, 1)), ((), ())))
  with pytest.raises(ValueError, match="M=4 must divide"):
    dg(jnp.ones((2, 6)), jnp.ones((6, 3)), (((1,), (0,)), ((), ())))


def test_frozen_and_hashable():
  assert nm_dot_general("8:16", "weight") == nm_dot_general("8:16", "weight")
  assert hash(nm_dot_general("8:16")) == hash(nm_dot_general("8:16"))


def test_channel_order_groups_the_permuted_channels():
  perm = np.random.default_rng(4).permutation(32)
  dg = nm_dot_general(pattern="2:4", score="weight", channel_order=perm)
  x = _x()
  w = jax.random.normal(jax.random.key(5), (32, 8))
  out = jax.jit(lambda a, b: dg(a, b, (((2,), (0,)), ((), ()))))(x, w)
  f = channel_factors(w, "weight")
  want = amber_jax.sparsify(x, "2:4", f, channel_order=jnp.asarray(perm)) @ w
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert not np.allclose(out, amber_jax.sparsify(x, "2:4", f) @ w, atol=1e-3)
  assert hash(dg) == hash(nm_dot_general(pattern="2:4", score="weight", channel_order=perm))
  with pytest.raises(ValueError, match=r"must be a permutation of 0..3"):
    nm_dot_general(pattern="2:4", channel_order=[0, 1, 1, 3])
  with pytest.raises(ValueError, match=r"channel_order must have shape \(32,\)"):
    nm_dot_general(pattern="2:4", channel_order=np.arange(16))(x, w, (((2,), (0,)), ((), ())))


# ----------------------------------------------------------------------------------------------
# w8a8_dot_general: W8A8 / Outstanding-sparse for other Flax code, against a hand-built reference.


def _w8a8_reference(x, w, pattern=None, order="sparsify_first"):
  """Per-token int8 x, per-output-channel int8 w, int32 dot, float32 rescale, written out."""
  from amber_jax.core.quant import int8_dot_general, quantize_activation, quantize_weight

  w_q, w_scale = quantize_weight(w)
  if pattern is not None and order == "sparsify_first":
    x = amber_jax.sparsify(x, pattern)
  x_q, x_scale = quantize_activation(x)
  if pattern is not None and order == "quantize_first":
    x_q = amber_jax.sparsify(x_q, pattern)
  acc = int8_dot_general(x_q, w_q, (((x.ndim - 1,), (0,)), ((), ())))
  return acc.astype(jnp.float32) * x_scale * w_scale


@pytest.mark.parametrize(
  "pattern, order", [(None, "sparsify_first"), ("2:4", "sparsify_first"), ("2:4", "quantize_first")]
)
def test_w8a8_dot_general_in_nnx_linear_equals_the_reference(pattern, order):
  from amber_jax.core.dot_general import w8a8_dot_general

  layer = nnx.Linear(32, 8, dot_general=w8a8_dot_general(pattern, order=order), rngs=nnx.Rngs(1))
  x = _x()
  out = nnx.jit(lambda m, v: m(v))(layer, x)
  want = _w8a8_reference(x, layer.kernel[...], pattern, order) + layer.bias[...]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  if order == "quantize_first":  # its mask is taken on int8 codes (ties differ from floats)
    return
  # And close to the float product it stands for (int8 rounding only).
  float_x = x if pattern is None else amber_jax.sparsify(x, pattern)
  exact = float_x @ layer.kernel[...] + layer.bias[...]
  rel = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
  print(f"\nw8a8 {pattern} {order}: relative error vs float {rel:.2e}")
  assert rel < 0.03


def test_w8a8_dot_general_multiplies_int8():
  from amber_jax.core.dot_general import w8a8_dot_general

  dg = w8a8_dot_general("8:16")
  x = jax.random.normal(jax.random.key(6), (4, 32))
  w = jax.random.normal(jax.random.key(7), (32, 8))
  jaxpr = jax.make_jaxpr(lambda a, b: dg(a, b, (((1,), (0,)), ((), ()))))(x, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  dots += [e for eq in jaxpr.jaxpr.eqns for e in _sub_eqns(eq) if e.primitive.name == "dot_general"]
  assert any(all(v.aval.dtype == jnp.int8 for v in e.invars) for e in dots), dots


def _sub_eqns(eqn):
  for param in eqn.params.values():
    for sub in param if isinstance(param, (list, tuple)) else [param]:
      inner = getattr(sub, "jaxpr", None)
      if inner is not None:
        inner = getattr(inner, "jaxpr", inner)
        for e in inner.eqns:
          yield e
          yield from _sub_eqns(e)


def test_w8a8_dot_general_contracting_axis_and_bad_input():
  from amber_jax.core.dot_general import w8a8_dot_general

  x = jax.random.normal(jax.random.key(2), (16, 3))  # contract over axis 0
  w = jax.random.normal(jax.random.key(3), (16, 4))
  out = w8a8_dot_general()(x, w, (((0,), (0,)), ((), ())))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_w8a8_reference(x.T, w)))
  with pytest.raises(ValueError, match="order must be one of sparsify_first, quantize_first"):
    w8a8_dot_general("2:4", order="both")
  with pytest.raises(ValueError, match="no batch axes"):
    w8a8_dot_general()(jnp.ones((2, 4, 4)), jnp.ones((2, 4, 3)), (((2,), (1,)), ((0,), (0,))))
  assert w8a8_dot_general("2:4") == w8a8_dot_general("2:4")
