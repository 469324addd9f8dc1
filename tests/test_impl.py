"""The injection point's implementation choice: xla (jnp mask + dot) vs pallas (fused kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_CONFIG as CFG
from conftest import random_params

from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.core.backends import check_impl, default_impl, kernel_options, pallas_sparse_matmul
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.model import forward
from amber_jax.plan.schema import make_plan


def _params(seed=0):
  return random_params(CFG, np.random.default_rng(seed))


@pytest.mark.parametrize("impl", ["pallas", "pallas_mask"])
@pytest.mark.parametrize("pattern,score", [("8:16", "weight"), ("2:4", "naive")])
def test_pallas_forward_equals_xla(pattern, score, impl):
  params = _params()
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 12)), jnp.int32)
  f = model_factors(params, score)
  sites = [(0, "q"), (0, "down"), (1, "gate"), (1, "o")]
  xla = forward(
    params, tokens, config=CFG, plan=make_plan(CFG, pattern, sites=sites, factors=f, impl="xla")
  )
  pallas = forward(
    params, tokens, config=CFG, plan=make_plan(CFG, pattern, sites=sites, factors=f, impl=impl)
  )
  err = float(jnp.max(jnp.abs(xla - pallas)))
  print(f"{pattern} {score}: max |{impl} - xla| logits = {err:.2e}")
  assert err < 1e-4


def test_default_impl_by_backend():
  assert default_impl("cpu") == "xla"
  assert default_impl("gpu") == "xla"  # measured: XLA + sorting-network mask wins on H200
  assert default_impl("tpu") == "xla"
  assert make_plan(CFG, "8:16").impl == default_impl()


def test_impl_that_cannot_run_is_an_error():
  with pytest.raises(ValueError, match="impl must be one of xla, pallas, pallas_mask"):
    make_plan(CFG, "8:16", impl="cuda")
  with pytest.raises(ValueError, match="impl='pallas_mask' .* needs a power-of-2 M"):
    check_impl("pallas_mask", NMPattern.parse("2:6"), backend="cpu")
  with pytest.raises(ValueError, match="needs impl='xla', got impl='pallas_mask'"):
    AmberConfig(pattern=NMPattern.parse("2:4"), correction="bias", impl="pallas_mask")
  with pytest.raises(ValueError, match="power-of-2 M"):
    check_impl("pallas", NMPattern.parse("2:6"), backend="gpu")
  with pytest.raises(ValueError, match="power-of-2 M"):
    AmberConfig(pattern=NMPattern.parse("3:6"), impl="pallas")
  assert check_impl("xla", NMPattern.parse("3:6"), backend="gpu") == "xla"
  with pytest.raises(ValueError, match="impl must be one of"):
    pallas_sparse_matmul(
      jnp.ones((4, 16)), jnp.ones((16, 8)), impl="xla", pattern=NMPattern.parse("2:4"),
      factors=None, options=kernel_options("cpu"),
    )  # fmt: skip
  assert check_impl("pallas", NMPattern.parse("3:6"), backend="tpu") == "pallas"


def test_changing_impl_changes_only_static_part():
  a = make_plan(CFG, "8:16", impl="xla")
  b = make_plan(CFG, "8:16", impl="pallas")
  assert jax.tree.structure(a) != jax.tree.structure(b)  # impl is static: a new compile
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_registered_backend_runs_behind_the_same_op():
  """The registry is open: a backend registered by name (here a plain-jnp "reference" sparse
  product) is what plans with that impl run, and it gives the xla path's logits; an unknown or
  duplicate name is an error, and a backend that cannot run corrections refuses one."""
  from amber_jax.core.backends import BACKENDS, MatmulBackend, register_backend
  from amber_jax.core.linear import LinearSpec, site_linear
  from amber_jax.core.sparsity import sparsify

  calls = []

  def reference_sparse_matmul(x_2d, w, *, pattern, factors):
    calls.append(x_2d.shape)
    return sparsify(x_2d, pattern, factors) @ w.astype(x_2d.dtype)

  register_backend(MatmulBackend(name="reference", sparse_matmul=reference_sparse_matmul))
  try:
    with pytest.raises(ValueError, match="already registered"):
      register_backend(MatmulBackend(name="reference"))
    params = _params()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 12)), jnp.int32)
    f = model_factors(params, "weight")
    sites = [(0, "q"), (0, "down"), (1, "gate"), (1, "o")]
    want = forward(params, tokens, config=CFG, plan=make_plan(CFG, "8:16", sites=sites, factors=f))
    got = forward(
      params,
      tokens,
      config=CFG,
      plan=make_plan(CFG, "8:16", sites=sites, factors=f, impl="reference"),
    )
    assert calls, "the registered backend was not called"
    err = float(jnp.max(jnp.abs(got - want)))
    print(f"\nmax |reference backend - xla| logits = {err:.2e}")
    assert err < 1e-5
    x = jnp.ones((3, 16))
    row = {"enabled": jnp.asarray(True), "factors": jnp.ones(16), "correction": {}}
    with pytest.raises(ValueError, match="needs a backend that runs corrections"):
      site_linear(
        x,
        {"w": jnp.ones((16, 4))},
        row,
        LinearSpec(pattern=NMPattern.parse("2:4"), backend="reference"),
      )
  finally:
    BACKENDS.pop("reference", None)
  with pytest.raises(
    ValueError, match="impl must be one of xla, pallas, pallas_mask, got 'reference'"
  ):
    make_plan(CFG, "8:16", impl="reference")
