"""Site search: per-site KL costs, the exact knapsack, and policy="search" in build_plan."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIG as CFG

from amber_jax.calibrate.policy import knapsack
from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.calibrate.site_search import SiteCosts, measure_site_costs, plan_kl, select_sites
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.model import forward
from amber_jax.model.config import PROJECTIONS
from amber_jax.model.llama import KVCache, forward_from_layer, layer_inputs, model_pass
from amber_jax.plan.coverage import coverage, site_macs
from amber_jax.plan.schema import make_plan

NO_TIME = dict(tokens=1, seconds=0.0, site_names=PROJECTIONS)

PATTERN = NMPattern.parse("2:4")


@pytest.fixture(scope="module")
def model(tiny_params):
  windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 17)).astype(np.int32)
  return tiny_params, windows


@pytest.fixture(scope="module")
def costs(model):
  params, windows = model
  plan = make_plan(CFG, PATTERN, factors=model_factors(params, "robust"))
  return measure_site_costs(params, plan, windows, config=CFG, show_progress=False)


def test_knapsack_matches_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(30):
    n = int(rng.integers(1, 9))
    costs = [int(c) for c in rng.integers(1, 6, n)]
    values = [float(v) for v in rng.random(n)]
    capacity = int(rng.integers(0, 15))
    chosen = knapsack(costs, values, capacity)
    assert sum(costs[i] for i in chosen) <= capacity
    best = max(
      sum(values[i] for i in subset)
      for r in range(n + 1)
      for subset in itertools.combinations(range(n), r)
      if sum(costs[i] for i in subset) <= capacity
    )
    assert sum(values[i] for i in chosen) == pytest.approx(best, abs=1e-12)


def test_site_cost_is_the_kl_of_that_site_alone(model, costs):
  params, windows = model
  assert costs.kl.shape == (CFG.n_layers, len(PROJECTIONS)) and costs.tokens == 3 * 16
  print("\n" + costs.table())
  # KL >= 0 up to float error; sparsifying any site of this random model changes its output.
  assert np.all(costs.kl > -1e-6) and np.all(costs.kl.max(axis=1) > 1e-4)
  plan = make_plan(CFG, PATTERN, factors=model_factors(params, "robust"))
  tokens = jnp.asarray(windows[:, :-1])
  dense = jax.nn.log_softmax(forward(params, tokens, config=CFG), -1)
  for layer, proj in [(0, "gate"), (1, "v")]:
    one = make_plan(CFG, PATTERN, sites=[(layer, proj)], factors=plan.factors)
    # Independent of the resumed passes the costs use: a whole forward pass, plain KL.
    logp = jax.nn.log_softmax(forward(params, tokens, config=CFG, plan=one), -1)
    direct = float(jnp.mean(jnp.sum(jnp.exp(dense) * (dense - logp), -1)))
    assert costs.kl[layer, PROJECTIONS.index(proj)] == pytest.approx(direct, rel=1e-4, abs=1e-8)
    assert plan_kl(params, one, windows, config=CFG) == pytest.approx(direct, rel=1e-4, abs=1e-8)
  assert plan_kl(params, make_plan(CFG, PATTERN, sites=()), windows, config=CFG) == pytest.approx(
    0.0, abs=1e-6
  )


@pytest.mark.parametrize("target", [0.3, 0.55, 0.8, 1.0])
def test_select_sites_is_the_cheapest_set_reaching_the_target(target):
  rng = np.random.default_rng(2)
  costs = SiteCosts(
    kl=rng.random((CFG.n_layers, 7)), pattern="2:4", tokens=1, seconds=0.0, site_names=PROJECTIONS
  )
  chosen = select_sites(costs, CFG, target)
  assert coverage(CFG, chosen, PATTERN).covered >= target - 1e-12
  items = [(l, p) for l in range(CFG.n_layers) for p in PROJECTIONS]
  macs = site_macs(CFG)
  total = CFG.n_layers * sum(macs.values())

  def cost(sites):
    return sum(costs.kl[l, PROJECTIONS.index(p)] for l, p in sites)

  best = min(
    cost(s)
    for r in range(len(items) + 1)
    for s in itertools.combinations(items, r)
    if sum(macs[p] for _, p in s) >= target * total - 1e-9
  )
  assert cost(chosen) == pytest.approx(best, abs=1e-12)


def test_build_plan_search_policy(model, costs):
  params, windows = model
  amber = AmberConfig(
    pattern=PATTERN, score="robust", policy="search", coverage=0.5, search_windows=3
  )
  assert amber.needs_calibration
  info = build_plan(params, CFG, amber, calib_windows=windows, show_progress=False)
  assert info.coverage.covered >= 0.5 and info.site_costs is not None
  np.testing.assert_allclose(info.site_costs.kl, costs.kl, rtol=1e-5, atol=1e-8)
  assert set(info.plan.enabled_sites()) == set(select_sites(costs, CFG, 0.5))
  # Measured costs serve another coverage target without measuring again.
  again = build_plan(
    params,
    CFG,
    AmberConfig(pattern=PATTERN, score="robust", policy="search", coverage=0.8),
    calib_windows=windows,
    site_costs=costs,
    show_progress=False,
  )
  assert again.coverage.covered >= 0.8 and again.site_costs is costs
  # The chosen sites move the model's distribution less than the opposite choice at the same
  # coverage target: costs reversed (max - kl), so the most costly sites are taken first.
  worst = SiteCosts(
    kl=costs.kl.max() - costs.kl, pattern="2:4", tokens=1, seconds=0.0, site_names=PROJECTIONS
  )
  worst_sites = select_sites(worst, CFG, 0.5)
  worst_cov = coverage(CFG, worst_sites, PATTERN).covered
  assert 0.5 <= worst_cov < 1.0 and len(worst_sites) < CFG.n_layers * len(PROJECTIONS)
  worst_plan = make_plan(CFG, PATTERN, sites=worst_sites, factors=info.plan.factors)
  assert plan_kl(params, info.plan, windows, config=CFG) < plan_kl(
    params, worst_plan, windows, config=CFG
  )


def test_bad_inputs(model, costs):
  params, windows = model
  with pytest.raises(ValueError, match="no N:M pattern"):
    measure_site_costs(params, make_plan(CFG, None), windows, config=CFG)
  with pytest.raises(ValueError, match="calib_windows must be"):
    measure_site_costs(params, make_plan(CFG, PATTERN), windows[:0], config=CFG)
  with pytest.raises(ValueError, match="batch_size"):
    measure_site_costs(params, make_plan(CFG, PATTERN), windows, config=CFG, batch_size=0)
  with pytest.raises(ValueError, match="coverage"):
    select_sites(costs, CFG, 1.5)
  other = dataclasses.replace(CFG, n_layers=3)
  with pytest.raises(ValueError, match="costs are for 2 layers"):
    select_sites(costs, other, 0.5)
  nan_costs = SiteCosts(
    kl=costs.kl.copy(), pattern="2:4", tokens=1, seconds=0.0, site_names=PROJECTIONS
  )
  nan_costs.kl[1, 3] = np.nan
  with pytest.raises(ValueError, match=r"site costs must be finite; non-finite at .*\(1, 'o'\)"):
    select_sites(nan_costs, CFG, 0.5)
  w8a8_like = dataclasses.replace(make_plan(CFG, PATTERN), quant=object())
  with pytest.raises(ValueError, match="float plans"):
    plan_kl(params, w8a8_like, windows, config=CFG)
  with pytest.raises(ValueError, match="skip_layers cannot be given with policy='search'"):
    AmberConfig(pattern=PATTERN, policy="search", skip_layers=(0,))
  with pytest.raises(ValueError, match="search_windows must be >= 1"):
    AmberConfig(pattern=PATTERN, policy="search", search_windows=0)
  amber = AmberConfig(pattern=PATTERN, score="robust", policy="search")
  with pytest.raises(ValueError, match="needs calibration windows"):
    build_plan(params, CFG, amber, show_progress=False)
  with pytest.raises(ValueError, match="site_costs are for 2:4"):
    build_plan(
      params,
      CFG,
      AmberConfig(pattern=NMPattern.parse("4:8"), score="robust", policy="search"),
      calib_windows=windows,
      site_costs=costs,
      show_progress=False,
    )


@pytest.mark.parametrize("first", [0, 1])
def test_forward_from_layer_resumes_the_dense_stream(model, first):
  params, windows = model
  tokens = jnp.asarray(windows[:, :-1])
  inputs = layer_inputs(params, tokens, config=CFG)
  assert inputs.shape == (CFG.n_layers, *tokens.shape, CFG.d_model)
  factors = model_factors(params, "robust")
  # Sparse from `first` on: the layers before it are dense, so resuming there is exact.
  sites = [(l, p) for l in range(first, CFG.n_layers) for p in PROJECTIONS]
  plan = make_plan(CFG, PATTERN, sites=sites, factors=factors)
  want = forward(params, tokens, config=CFG, plan=plan)
  got = forward_from_layer(params, inputs[first], first, config=CFG, plan=plan)
  err = float(jnp.max(jnp.abs(got - want)))
  print(f"\nmax |logit diff| resumed at layer {first}: {err:.2e}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cache = KVCache(k=None, v=None, length=jnp.int32(0))
  with pytest.raises(ValueError, match="takes no KV cache"):
    model_pass(params, config=CFG, h_BxTxD=inputs[0], first_layer=jnp.int32(0), cache=cache)
