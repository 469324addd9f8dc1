"""Amber Pruner scores, policies, coverage and automatic layer selection."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.calibrate.policy import (
  Sensitivity,
  max_skips_for_coverage,
  parse_layer_list,
  policy_sites,
  select_skip_layers,
)
from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import channel_factors, model_factors
from amber_jax.model.config import PROJECTIONS, LlamaConfig
from amber_jax.plan.coverage import coverage

P816 = NMPattern.parse("8:16")
LLAMA31_8B = LlamaConfig(
  vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336
)
QWEN2_7B = LlamaConfig(
  vocab_size=152064,
  d_model=3584,
  n_layers=28,
  n_heads=28,
  n_kv_heads=4,
  head_dim=128,
  d_ff=18944,
  qkv_bias=True,
)
SMOLLM2 = LlamaConfig(
  vocab_size=49152,
  d_model=576,
  n_layers=30,
  n_heads=9,
  n_kv_heads=3,
  head_dim=64,
  d_ff=1536,
  tie_embeddings=True,
)


def test_paper_coverage_llama31_8b():
  cov = coverage(LLAMA31_8B, policy_sites(LLAMA31_8B, "paper", [19, 21, 28, 30, 31]), P816)
  assert round(100 * cov.covered, 1) == 56.1
  assert cov.removed == pytest.approx(cov.covered / 2)


def test_paper_coverage_qwen2_7b():
  cov = coverage(QWEN2_7B, policy_sites(QWEN2_7B, "paper", [0, 6, 23, 26, 27]), P816)
  assert round(100 * cov.covered, 1) == 57.6


def test_all_policy_covers_everything_and_dense_covers_nothing():
  assert coverage(SMOLLM2, policy_sites(SMOLLM2, "all"), P816).covered == 1.0
  assert coverage(SMOLLM2, policy_sites(SMOLLM2, "all"), None).covered == 0.0


def test_max_skips_respects_target():
  k = max_skips_for_coverage(SMOLLM2, 0.55)
  assert coverage(SMOLLM2, policy_sites(SMOLLM2, "paper", range(k)), P816).covered >= 0.55
  assert coverage(SMOLLM2, policy_sites(SMOLLM2, "paper", range(k + 1)), P816).covered < 0.55
  with pytest.raises(ValueError, match="unreachable"):
    max_skips_for_coverage(SMOLLM2, 0.9)


def test_auto_selects_most_sensitive_layers():
  errors = np.full((SMOLLM2.n_layers, len(PROJECTIONS)), 0.1)
  q, gate = PROJECTIONS.index("q"), PROJECTIONS.index("gate")
  errors[7, q] = 0.9
  errors[12, gate] = 0.8
  errors[20, q] = 0.5
  errors[25, PROJECTIONS.index("up")] = 5.0  # up is dense anyway: must not matter
  sens = Sensitivity(errors=errors, pattern="8:16", score="naive", tokens=1, site_names=PROJECTIONS)
  assert select_skip_layers(sens, SMOLLM2, 0.55) == (7, 12, 20)


def test_non_finite_sensitivities_are_an_error():
  # A NaN would sort as the least sensitive layer (never skipped) without a word.
  from amber_jax.calibrate.policy import select_dense_sites

  errors = np.full((SMOLLM2.n_layers, len(PROJECTIONS)), 0.1)
  errors[3, PROJECTIONS.index("q")] = np.nan
  sens = Sensitivity(errors=errors, pattern="8:16", score="naive", tokens=1, site_names=PROJECTIONS)
  for select in (select_skip_layers, select_dense_sites):
    with pytest.raises(ValueError, match=r"sensitivity errors must be finite.*\(3, 0\)"):
      select(sens, SMOLLM2, 0.55)


def test_weight_factor_matches_definition():
  rng = np.random.default_rng(0)
  w_IxO = rng.normal(size=(16, 8)).astype(np.float32)  # our layout: [d_in, d_out]
  norms = np.linalg.norm(w_IxO, axis=1)  # ||W[:, j]|| in the paper's [d_out, d_in] layout
  np.testing.assert_allclose(channel_factors(w_IxO, "weight"), norms / norms.min(), rtol=1e-6)
  assert channel_factors(w_IxO, "weight").min() == pytest.approx(1.0)
  np.testing.assert_array_equal(channel_factors(w_IxO, "naive"), np.ones(16))
  # jnp gives the same as numpy.
  np.testing.assert_allclose(
    channel_factors(jnp.asarray(w_IxO), "robust"), channel_factors(w_IxO, "robust"), rtol=1e-5
  )


def test_robust_factor_clips_outliers_by_default():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(32, 64)).astype(np.float32)
  w[3, 5] = 200.0  # one huge outlier in input channel 3
  clipped = channel_factors(w, "robust")
  kept = channel_factors(w, "robust", robust_clip=False)
  weight = channel_factors(w, "weight")
  # Clipping tames the outlier's channel; keeping it lets it dominate like the plain score.
  assert clipped[3] < kept[3]
  assert kept.argmax() == weight.argmax() == 3
  lo, hi = np.percentile(w, [0.5, 99.5])
  inside = w[(w >= lo) & (w <= hi)]
  w_hat = (np.clip(w, lo, hi) - inside.mean()) / inside.std()
  norms = np.linalg.norm(w_hat, axis=1)
  np.testing.assert_allclose(clipped, norms / norms.min(), rtol=1e-4)


def test_model_factors_shapes():
  rng = np.random.default_rng(2)
  layers = {p: {"w": rng.normal(size=(2, 8, 4)).astype(np.float32)} for p in PROJECTIONS}
  layers["attn_norm"] = np.ones((2, 8), np.float32)
  f = model_factors({"layers": layers}, "weight")
  assert set(f) == set(PROJECTIONS)
  assert f["q"].shape == (2, 8)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(score="magnitude"), "score must be one of naive, weight, robust"),
    (dict(policy="some"), "policy must be one of all, paper, auto"),
    (dict(coverage=0.0), r"coverage must be in \(0, 1\]"),
    (dict(coverage=1.5), r"coverage must be in \(0, 1\]"),
    (dict(policy="auto", skip_layers=(1,)), "skip_layers cannot be given"),
  ],
)
def test_bad_amber_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AmberConfig(pattern=P816, **kwargs)


def test_bad_skip_layers_and_widths_fail_before_loading():
  with pytest.raises(ValueError, match=r"skip layer 30 is out of range: .*0\.\.29"):
    AmberConfig(pattern=P816, policy="paper", skip_layers=(30,)).validate_for(SMOLLM2)
  with pytest.raises(ValueError, match="skip layer -1"):
    AmberConfig(pattern=P816, policy="paper", skip_layers=(-1,)).validate_for(SMOLLM2)
  # 128 does not divide 576 (the q/gate/down input width of d_model).
  with pytest.raises(ValueError, match="M=128 must divide the q-projection input width 576"):
    AmberConfig(pattern=NMPattern.parse("64:128"), policy="paper").validate_for(SMOLLM2)
  with pytest.raises(ValueError, match="comma-separated integers"):
    parse_layer_list("1,x")
  assert parse_layer_list("19, 21,") == (19, 21)


def test_site_granular_auto_is_an_exact_knapsack():
  from itertools import combinations

  from amber_jax.calibrate.policy import select_dense_sites
  from amber_jax.plan.coverage import coverage as cov

  cfg = LlamaConfig(
    vocab_size=8, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
  )
  rng = np.random.default_rng(5)
  errors = rng.uniform(size=(3, 7))
  sens = Sensitivity(errors=errors, pattern="2:4", score="naive", tokens=1, site_names=PROJECTIONS)
  target = 0.45
  chosen = select_dense_sites(sens, cfg, target)
  sites = [(l, p) for l in range(3) for p in ("q", "gate")]

  def value(subset):
    return sum(sens.errors[l, PROJECTIONS.index(p)] for l, p in subset)

  def feasible(subset):
    kept = [s for s in policy_sites(cfg, "paper") if s not in set(subset)]
    return cov(cfg, kept, P816).covered >= target - 1e-12

  best = max(
    (c for r in range(len(sites) + 1) for c in combinations(sites, r) if feasible(c)), key=value
  )
  assert feasible(chosen)
  assert value(chosen) == pytest.approx(value(best))


def test_small_bad_inputs_name_the_argument():
  from amber_jax.calibrate.policy import check_batch_size, check_skip_layers, measure_sensitivity

  with pytest.raises(ValueError, match="unknown projection 'gate_proj' in sites"):
    coverage(SMOLLM2, [(0, "gate_proj")], P816)
  with pytest.raises(ValueError, match="layer 30 in sites is out of range"):
    coverage(SMOLLM2, [(30, "q")], P816)
  assert AmberConfig(pattern="8:16").pattern == P816  # normalised on construction
  with pytest.raises(ValueError, match="pattern"):
    AmberConfig(pattern="bogus")
  with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
    check_batch_size(0)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
    measure_sensitivity(
      None, np.zeros((1, 8)), config=SMOLLM2, pattern=P816, factors={}, batch_size=0
    )
  with pytest.raises(ValueError, match="skip_layers must be integer layer indices, got 0.9"):
    check_skip_layers(SMOLLM2, [0.9, 1.7])
  assert check_skip_layers(SMOLLM2, [np.int64(3), 1, 3]) == (1, 3)
