"""Channel orders: N:M groups over permuted input channels (o_order="mixed"), on every path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIG as CFG

from amber_jax.calibrate.correction_fit import calibrate_corrections
from amber_jax.calibrate.learned_factors import learn_score_factors, ste_sparsify
from amber_jax.calibrate.policy import measure_sensitivity
from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.core.correction import corrected_sparse_matmul
from amber_jax.core.linear import LinearSpec, site_linear
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.core.sparsity import check_channel_order, nm_keep, sparsify
from amber_jax.model import forward
from amber_jax.model.config import PROJECTIONS
from amber_jax.plan.channel_order import mixed_order, model_channel_order
from amber_jax.plan.io import load_sparsity_plan, save_sparsity_plan
from amber_jax.plan.quant_state import build_quant_state
from amber_jax.plan.schema import make_plan
from amber_jax.runs.front import parse_method

ALL_SITES = [(l, p) for l in range(CFG.n_layers) for p in PROJECTIONS]


@pytest.fixture(scope="module")
def model(tiny_params):
  rng = np.random.default_rng(0)
  windows = rng.integers(0, CFG.vocab_size, (4, 17)).astype(np.int32)
  return tiny_params, windows


def np_keep_ordered(score: np.ndarray, order: np.ndarray, n: int, m: int) -> np.ndarray:
  """Reference: per token, groups of m channels order[g*m:(g+1)*m]; keep the n largest scores
  (ties: the earlier position in the order wins)."""
  keep = np.zeros(score.shape, bool)
  for t in range(score.shape[0]):
    for g in range(0, len(order), m):
      members = order[g : g + m]
      ranked = sorted(range(m), key=lambda i: (-score[t, members[i]], i))
      keep[t, members[ranked[:n]]] = True
  return keep


# ----------------------------------------------------------------------------------------------
# The transform.


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparsify_with_order_matches_the_reference(pattern, dtype):
  p = NMPattern.parse(pattern)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((6, 64)), dtype)
  f = jnp.asarray(rng.uniform(0.5, 2.0, 64), jnp.float32)
  order = rng.permutation(64)
  got = sparsify(x, p, f, channel_order=jnp.asarray(order))
  score = np.abs(np.asarray(x, np.float32)) * np.asarray(f)
  keep = np_keep_ordered(score, order, p.n, p.m)
  np.testing.assert_array_equal(np.asarray(got), np.where(keep, np.asarray(x), 0))
  # Exactly N kept in every group of the permuted order (random data: no zeros).
  kept = np.asarray(nm_keep(x, p, f, channel_order=jnp.asarray(order)))[:, order]
  assert (kept.reshape(6, -1, p.m).sum(-1) == p.n).all()
  # Another order gives another mask: the grouping is what changed.
  assert not np.array_equal(np.asarray(got), np.asarray(sparsify(x, p, f)))


def test_identity_order_equals_no_order():
  x = jax.random.normal(jax.random.key(1), (3, 5, 32))
  np.testing.assert_array_equal(
    sparsify(x, "2:4", channel_order=jnp.arange(32)), sparsify(x, "2:4")
  )


def test_bad_channel_orders():
  with pytest.raises(ValueError, match=r"channel_order must have shape \(32,\)"):
    sparsify(jnp.ones((2, 32)), "2:4", channel_order=jnp.arange(16))
  with pytest.raises(ValueError, match=r"must be an integer array of shape \(8,\)"):
    check_channel_order(np.arange(8.0), 8)
  with pytest.raises(ValueError, match=r"order\[3\] must be a permutation of 0..7"):
    check_channel_order(np.array([0, 1, 2, 3, 4, 5, 6, 6]), 8, where="order[3]")


def test_ste_forward_with_order_is_the_exact_mask():
  p = NMPattern.parse("2:4")
  x = jax.random.normal(jax.random.key(1), (5, 16))
  f = jnp.exp(jax.random.normal(jax.random.key(2), (16,)) * 0.3)
  order = jnp.asarray(np.random.default_rng(0).permutation(16))
  np.testing.assert_array_equal(
    ste_sparsify(x, p, f, 0.5, order), sparsify(x, p, f, channel_order=order)
  )
  g = jax.grad(lambda f_: jnp.sum(ste_sparsify(x, p, f_, 0.5, order) ** 2))(f)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# ----------------------------------------------------------------------------------------------
# Orders and plans.


def test_mixed_order_is_a_reproducible_permutation_per_layer():
  a, b = mixed_order(3, 64, seed=0), mixed_order(3, 64, seed=0)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.int32 and a.shape == (3, 64)
  for row in a:
    check_channel_order(row, 64)
  assert not np.array_equal(a[0], a[1]) and not np.array_equal(a, mixed_order(3, 64, seed=1))
  assert model_channel_order(CFG, "heads") is None
  orders = model_channel_order(CFG, "mixed")
  assert set(orders) == {"o"} and orders["o"].shape == (CFG.n_layers, CFG.n_heads * CFG.head_dim)
  with pytest.raises(ValueError, match="o_order must be one of heads, mixed, got 'random'"):
    model_channel_order(CFG, "random")
  with pytest.raises(ValueError, match="o_order must be one of"):
    AmberConfig(pattern=NMPattern.parse("2:4"), o_order="interleaved")


def test_make_plan_checks_channel_orders():
  good = mixed_order(2, 32)
  plan = make_plan(CFG, "2:4", channel_order={"o": good})
  np.testing.assert_array_equal(plan.channel_order["o"], good)
  assert make_plan(CFG, "2:4", channel_order={}).channel_order is None
  with pytest.raises(ValueError, match="unknown projection 'attn'"):
    make_plan(CFG, "2:4", channel_order={"attn": good})
  with pytest.raises(ValueError, match=r"channel_order\['down'\] must have shape \(2, 64\)"):
    make_plan(CFG, "2:4", channel_order={"down": good})
  bad = good.copy()
  bad[1, :2] = 0
  with pytest.raises(ValueError, match=r"channel_order\['o'\]\[1\] must be a permutation"):
    make_plan(CFG, "2:4", channel_order={"o": bad})


# ----------------------------------------------------------------------------------------------
# The model: an order equals permuting the weights that produce and consume the channels.


def _permute_mlp(params, perm_LxF):
  """gate/up output columns and down input rows permuted per layer: the same dense model."""
  layers = dict(params["layers"])
  take = lambda a, axis: jnp.stack([jnp.take(a[l], perm_LxF[l], axis=axis) for l in range(2)])
  layers["gate"] = {"w": take(layers["gate"]["w"], 1)}
  layers["up"] = {"w": take(layers["up"]["w"], 1)}
  layers["down"] = {"w": take(layers["down"]["w"], 0)}
  return dict(params, layers=layers)


def _permute_heads(params, sigma):
  """v output columns and o input rows permuted by ``sigma`` inside every head."""
  layers = dict(params["layers"])
  v = layers["v"]["w"].reshape(2, CFG.d_model, CFG.n_kv_heads, CFG.head_dim)
  o = layers["o"]["w"].reshape(2, CFG.n_heads, CFG.head_dim, CFG.d_model)
  layers["v"] = {"w": jnp.take(v, sigma, axis=3).reshape(2, CFG.d_model, -1)}
  layers["o"] = {"w": jnp.take(o, sigma, axis=2).reshape(2, -1, CFG.d_model)}
  return dict(params, layers=layers)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_down_order_equals_the_permuted_mlp(model, pattern):
  params, windows = model
  rng = np.random.default_rng(5)
  perm = np.stack([rng.permutation(CFG.d_ff) for _ in range(2)])
  factors = model_factors(params, "robust")
  tokens = jnp.asarray(windows[:, :-1])
  sites = [(0, "down"), (1, "down"), (1, "q")]
  ordered = make_plan(CFG, pattern, sites=sites, factors=factors, channel_order={"down": perm})
  permuted_factors = dict(factors, down=np.take_along_axis(factors["down"], perm, axis=1))
  natural = make_plan(CFG, pattern, sites=sites, factors=permuted_factors)
  got = forward(params, tokens, config=CFG, plan=ordered)
  want = forward(_permute_mlp(params, perm), tokens, config=CFG, plan=natural)
  err = float(jnp.max(jnp.abs(got - want)))
  print(f"{pattern}: max |ordered - permuted model| logits {err:.2e}")
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
  unordered = forward(params, tokens, config=CFG, plan=make_plan(CFG, pattern, sites=sites))
  assert float(jnp.max(jnp.abs(got - unordered))) > 1e-2


def test_o_order_within_heads_equals_permuted_v_and_o(model):
  params, windows = model
  sigma = np.random.default_rng(6).permutation(CFG.head_dim)
  order = np.concatenate([h * CFG.head_dim + sigma for h in range(CFG.n_heads)])
  order = np.stack([order, order])
  factors = model_factors(params, "robust")
  tokens = jnp.asarray(windows[:, :-1])
  sites = [(0, "o"), (1, "o")]
  ordered = make_plan(CFG, "2:4", sites=sites, factors=factors, channel_order={"o": order})
  permuted_factors = dict(factors, o=np.take_along_axis(factors["o"], order, axis=1))
  natural = make_plan(CFG, "2:4", sites=sites, factors=permuted_factors)
  got = forward(params, tokens, config=CFG, plan=ordered)
  want = forward(_permute_heads(params, sigma), tokens, config=CFG, plan=natural)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


def test_pallas_corrected_and_w8a8_paths_honour_the_order(model):
  params, windows = model
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 9, 64)), jnp.float32)
  w = params["layers"]["down"]["w"][0]
  f = jnp.asarray(rng.uniform(0.5, 2, 64), jnp.float32)
  order = jnp.asarray(rng.permutation(64))
  site = {"enabled": jnp.asarray(True), "factors": f, "channel_order": order}
  p48 = NMPattern.parse("4:8")
  want = jnp.einsum("...i,io->...o", sparsify(x, "4:8", f, channel_order=order), w)
  xla = site_linear(x, {"w": w}, site, LinearSpec(pattern=p48, backend="xla"))
  pallas = site_linear(x, {"w": w}, site, LinearSpec(pattern=p48, backend="pallas"))
  identity = {
    "center": jnp.zeros(64),
    "in_scale": jnp.ones(64),
    "token_rescale": jnp.zeros(()),
    "out_scale": jnp.ones(w.shape[1]),
    "out_bias": jnp.zeros(w.shape[1]),
  }
  corrected = corrected_sparse_matmul(x, w, p48, f, identity, channel_order=order)
  for name, got in (("xla", xla), ("pallas", pallas), ("corrected", corrected)):
    err = float(jnp.max(jnp.abs(got - want)))
    print(f"{name}: max |got - reference| {err:.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  # W8A8 with float sites and no smoothing is the float model: the order reaches its mask.
  tokens = jnp.asarray(windows[:, :-1])
  absmax = {p: np.ones((2, d), np.float32) for p, (d, _) in CFG.linear_shapes().items()}
  state, _ = build_quant_state(params, CFG, absmax, smooth="none", float_sites=ALL_SITES)
  orders = {"down": np.stack([rng.permutation(64) for _ in range(2)])}
  plan = make_plan(CFG, "4:8", sites=[(0, "down"), (1, "down")], channel_order=orders)
  got = forward(params, tokens, config=CFG, plan=plan.replace(quant=state))
  np.testing.assert_allclose(got, forward(params, tokens, config=CFG, plan=plan), atol=1e-4)


def test_calibration_and_learning_see_the_order(model, tmp_path):
  params, windows = model
  factors = model_factors(params, "robust")
  orders = model_channel_order(CFG, "mixed")
  plan = make_plan(CFG, "2:4", sites=ALL_SITES, factors=factors, channel_order=orders)
  # Two code paths measure the o sites' relative output error on the dense inputs.
  tokens = windows[:, :-1]
  sens = measure_sensitivity(
    params,
    tokens,
    config=CFG,
    pattern=plan.pattern,
    factors=factors,
    channel_order=orders,
    show_progress=False,
  )
  corr = calibrate_corrections(
    params, plan, tokens, config=CFG, correction="median", show_progress=False
  )
  o = PROJECTIONS.index("o")
  np.testing.assert_allclose(corr.errors_before[:, o], sens.errors[:, o], rtol=1e-4)
  plain = measure_sensitivity(
    params, tokens, config=CFG, pattern=plan.pattern, factors=factors, show_progress=False
  )
  assert not np.allclose(plain.errors[:, o], sens.errors[:, o])
  # Learning trains through the ordered mask: the model reproduces the reported KL.
  out = learn_score_factors(params, plan, windows, config=CFG, steps=3, show_progress=False)
  assert out.plan.channel_order is plan.channel_order
  teacher = jax.nn.log_softmax(forward(params, jnp.asarray(tokens), config=CFG), -1)
  teacher = teacher.astype(jnp.bfloat16).astype(jnp.float32)
  logp = jax.nn.log_softmax(forward(params, jnp.asarray(tokens), config=CFG, plan=out.plan), -1)
  kl = float(jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - logp), -1)))
  assert kl == pytest.approx(out.final_kl, rel=1e-3)
  # The order is saved with the plan.
  save_sparsity_plan(tmp_path / "plan", out.plan, metadata={"pattern": "2:4"})
  restored, _ = load_sparsity_plan(tmp_path / "plan")
  np.testing.assert_array_equal(restored.channel_order["o"], orders["o"])
  np.testing.assert_array_equal(
    forward(params, jnp.asarray(tokens), config=CFG, plan=restored),
    forward(params, jnp.asarray(tokens), config=CFG, plan=out.plan),
  )


def test_build_plan_with_mixed_o_groups(model):
  params, windows = model
  amber = AmberConfig(pattern=NMPattern.parse("2:4"), score="robust", policy="search")
  mixed = AmberConfig(
    pattern=NMPattern.parse("2:4"), score="robust", policy="search", o_order="mixed"
  )
  info = build_plan(params, CFG, mixed, calib_windows=windows, show_progress=False)
  want_order = model_channel_order(CFG, "mixed")["o"]
  np.testing.assert_array_equal(info.plan.channel_order["o"], want_order)
  assert info.site_costs.ordered == ("o",)
  heads = build_plan(params, CFG, amber, calib_windows=windows, show_progress=False)
  assert heads.plan.channel_order is None and heads.site_costs.ordered == ()
  # Only the o sites' costs depend on the grouping.
  o = PROJECTIONS.index("o")
  others = [j for j in range(len(PROJECTIONS)) if j != o]
  np.testing.assert_allclose(info.site_costs.kl[:, others], heads.site_costs.kl[:, others])
  assert not np.allclose(info.site_costs.kl[:, o], heads.site_costs.kl[:, o])
  with pytest.raises(ValueError, match="site_costs were measured with channel orders for none"):
    build_plan(params, CFG, mixed, calib_windows=windows, site_costs=heads.site_costs)


def test_front_methods_with_mixed_o_groups():
  assert parse_method("search_mixed") == ("search_mixed", "none", 0, False)
  assert parse_method("search_mixed+median") == ("search_mixed", "median", 0, False)
  assert parse_method("search_mixed+learnedscale8") == ("search_mixed", "none", 8, True)
  assert parse_method("search_mixed+median+learnedscale3") == ("search_mixed", "median", 3, True)
  with pytest.raises(ValueError, match="apply to searched plans"):
    parse_method("paper+learned")
  with pytest.raises(ValueError, match="unknown name 'learned'"):
    parse_method("search+learned+median")  # learning comes last
