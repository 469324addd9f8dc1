"""Baselines in the same harness: Wanda, SparseGPT (weights), TEAL, CATS (activation thresholds),
each against a plain numpy reference on a tiny random model, plus the registry and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_CONFIG, random_params
from jax.sharding import PartitionSpec as P

from amber_jax.baselines import thresholds as th
from amber_jax.baselines.sparsegpt_solver import sparsegpt_prune_reference
from amber_jax.baselines.weight_pruning import (
  load_pruned_weights,
  prune_weights,
  save_pruned_weights,
)
from amber_jax.calibrate.methods import build_method, check_method_target, resolve_method
from amber_jax.model import decode_step, forward, prefill
from amber_jax.model.llama import model_pass
from amber_jax.plan.io import load_sparsity_plan, save_sparsity_plan
from amber_jax.plan.sharding import plan_specs

CONFIG = SMALL_CONFIG  # 2 layers, d 64, q 64, k/v 32, ffn 128, q/k/v biases


@pytest.fixture(scope="module")
def model():
  rng = np.random.default_rng(0)
  params = jax.tree.map(jnp.asarray, random_params(CONFIG, rng))
  windows = rng.integers(0, CONFIG.vocab_size, (12, 48)).astype(np.int32)
  return params, windows[:4], windows[4:]  # calibration, held-out


def site_inputs(params, windows) -> dict[str, np.ndarray]:
  """site -> [L, tokens, d_in]: every site's input in a dense pass of ``params``."""

  def hook(name, x, weights, row, linear):
    return linear(x), x.reshape(-1, x.shape[-1])

  records = model_pass(params, jnp.asarray(windows), config=CONFIG, hook=hook).records
  return {k: np.asarray(v, np.float64) for k, v in records.items()}


def mixed_params(pruned, dense, layer):
  """The layers before ``layer`` from ``pruned``, the rest from ``dense``: what layer ``layer``
  of a layer-by-layer calibration sees."""

  def pick(p, d):
    p, d = np.asarray(p), np.asarray(d)
    if p.ndim == 0 or p.shape[0] != CONFIG.n_layers:
      return d
    out = d.copy()
    out[:layer] = p[:layer]
    return jnp.asarray(out)

  return {**dense, "layers": jax.tree.map(pick, pruned["layers"], dense["layers"])}


def np_nm_keep(score_IxO: np.ndarray, n: int, m: int) -> np.ndarray:
  """Top-n of every m consecutive inputs per output column (plain numpy, stable)."""
  d_in, d_out = score_IxO.shape
  g = score_IxO.T.reshape(d_out, d_in // m, m)
  order = np.argsort(-g, axis=-1, kind="stable")
  keep = np.zeros_like(g, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  return keep.reshape(d_out, d_in).T


# ------------------------------------------------------------------------------------------------
# Wanda


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_masks_equal_numpy_layer_by_layer(model, pattern):
  params, calib, _ = model
  n, m = map(int, pattern.split(":"))
  pruned = prune_weights(
    params, CONFIG, "wanda", calib_windows=calib, pattern=pattern, show_progress=False
  )
  for layer in range(CONFIG.n_layers):
    inputs = site_inputs(mixed_params(pruned.params, params, layer), calib)
    for site in CONFIG.sites.names:
      w = np.asarray(params["layers"][site]["w"][layer], np.float64)
      norm = np.sqrt((inputs[site][layer] ** 2).sum(axis=0))
      want = np_nm_keep(np.abs(w) * norm[:, None], n, m)
      got = np.asarray(pruned.masks[site][layer])
      assert (got == want).mean() == 1.0, f"{site}{layer}: {(got != want).sum()} entries differ"
      np.testing.assert_array_equal(
        np.asarray(pruned.params["layers"][site]["w"][layer]),
        np.where(want, w, 0).astype(np.float32),
      )


def test_wanda_unstructured_prunes_exactly_per_output_channel(model):
  params, calib, _ = model
  pruned = prune_weights(
    params, CONFIG, "wanda", calib_windows=calib, sparsity=0.3, show_progress=False
  )
  inputs = site_inputs(params, calib)
  w = np.asarray(params["layers"]["gate"]["w"][0], np.float64)
  score = np.abs(w) * np.sqrt((inputs["gate"][0] ** 2).sum(axis=0))[:, None]
  k = int(w.shape[0] * 0.3)
  want = np.ones_like(w, bool)
  for o in range(w.shape[1]):
    want[np.argsort(score[:, o], kind="stable")[:k], o] = False
  np.testing.assert_array_equal(np.asarray(pruned.masks["gate"][0]), want)
  share = pruned.zero_share()
  for site in CONFIG.sites.names:
    d_in = CONFIG.sites[site].d_in
    np.testing.assert_allclose(share[site], int(d_in * 0.3) / d_in)  # exact, per layer


# ------------------------------------------------------------------------------------------------
# SparseGPT on the model: each site equals the numpy OBS loop on its layer's recorded inputs


def test_sparsegpt_on_the_model_equals_numpy_obs(model):
  params, calib, _ = model
  pruned = prune_weights(
    params, CONFIG, "sparsegpt", calib_windows=calib, pattern="2:4", show_progress=False
  )
  worst = 0.0
  for layer in range(CONFIG.n_layers):
    inputs = site_inputs(mixed_params(pruned.params, params, layer), calib)
    for site in CONFIG.sites.names:
      x = inputs[site][layer]
      w = np.asarray(params["layers"][site]["w"][layer], np.float64)
      want_w, want_mask, _ = sparsegpt_prune_reference(w, x.T @ x, pattern="2:4")
      got_w = np.asarray(pruned.params["layers"][site]["w"][layer], np.float64)
      got_mask = np.asarray(pruned.masks[site][layer])
      flipped = (got_mask != want_mask).mean()
      assert flipped <= 0.01, f"{site}{layer}: {flipped:.3%} of the mask differs"
      if flipped == 0:
        err = np.abs(got_w - want_w).max() / np.abs(want_w).max()
        worst = max(worst, err)
        assert err < 2e-3, f"{site}{layer}: relative max weight difference {err:.2e}"
      # reconstruction error of the site's output, vs magnitude-free Wanda-like masking
      y, y_got = x @ w, x @ got_w
      y_plain = x @ np.where(got_mask, w, 0)
      assert np.linalg.norm(y - y_got) < np.linalg.norm(y - y_plain)
  print(f"sparsegpt vs numpy OBS: worst relative weight difference {worst:.2e}")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_invariant_on_every_pruned_site(model, method, pattern):
  params, calib, _ = model
  n, m = map(int, pattern.split(":"))
  pruned = prune_weights(
    params, CONFIG, method, calib_windows=calib, pattern=pattern, show_progress=False
  )
  assert set(pruned.masks) == set(CONFIG.sites.names)
  for site, mask in pruned.masks.items():
    mask = np.asarray(mask)
    groups = mask.reshape(CONFIG.n_layers, -1, m, mask.shape[-1]).sum(axis=2)
    assert (groups == n).all(), f"{method} {pattern} {site}"
    w = np.asarray(pruned.params["layers"][site]["w"])
    assert (w[~mask] == 0).all()
    assert np.isfinite(w).all()
  np.testing.assert_allclose(pruned.record()["zero_share"], 1 - n / m, atol=1e-3)


def test_pruned_weights_save_and_restore(model, tmp_path):
  params, calib, held = model
  pruned = prune_weights(
    params,
    CONFIG,
    "wanda",
    calib_windows=calib,
    pattern="2:4",
    sites=[(0, "q"), (1, "down")],
    show_progress=False,
  )
  assert set(pruned.masks) == {"q", "down"}
  assert np.asarray(pruned.masks["q"][1]).all()  # layer 1 of q untouched
  save_pruned_weights(tmp_path / "pruned", pruned, metadata={"model": "tiny"})
  back = load_pruned_weights(tmp_path / "pruned", params, expect={"model": "tiny"})
  for a, b in zip(jax.tree.leaves(pruned.params), jax.tree.leaves(back.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert back.sites == pruned.sites and back.pattern == "2:4"
  y = forward(back.params, jnp.asarray(held[:2]), config=CONFIG)
  y0 = forward(pruned.params, jnp.asarray(held[:2]), config=CONFIG)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))


# ------------------------------------------------------------------------------------------------
# TEAL and CATS


def test_threshold_of_histogram_matches_numpy_quantile():
  x = np.random.default_rng(3).standard_t(df=3, size=200_000).astype(np.float32)
  counts = np.asarray(th.magnitude_histogram(jnp.asarray(x)))
  assert counts.sum() == x.size
  for s in (0.1, 0.5, 0.9):
    t = th.threshold_at(counts, s)
    want = np.quantile(np.abs(x), s)
    assert abs(t / want - 1) < 0.02, (s, t, want)
    assert abs((np.abs(x) <= t).mean() - s) < 0.005


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_teal_uniform_reaches_the_target_on_held_out_tokens(model, target):
  params = model[0]
  rng = np.random.default_rng(5)
  windows = rng.integers(0, CONFIG.vocab_size, (48, 48)).astype(np.int32)
  calib, held = windows[:24], windows[24:]  # 1152 tokens each
  built = th.teal_plan(params, CONFIG, calib, sparsity=target, show_progress=False)
  # On the distribution the thresholds are calibrated on (the dense model's inputs)
  got = th.measure_activation_sparsity(params, CONFIG, built.plan, held, upstream="dense")
  worst = max(float(np.abs(share - target).max()) for share in got.values())
  # Under the plan each site also sees its sparsified upstream (TEAL's own setting too)
  in_plan = th.measure_activation_sparsity(params, CONFIG, built.plan, held)
  drift = max(float(np.abs(share - target).max()) for share in in_plan.values())
  print(f"teal {target}: held-out sparsity error {worst:.4f} (dense upstream), {drift:.4f} (plan)")
  assert worst < 0.01, {k: v.round(4) for k, v in got.items()}
  assert built.removed == pytest.approx(target)


def test_teal_threshold_is_the_plain_where(model):
  params, calib, held = model
  built = th.teal_plan(params, CONFIG, calib, sparsity=0.4, show_progress=False)
  plan = built.plan
  toks = jnp.asarray(held[:2])

  def own(name, x, weights, row, linear):
    layer_t = row
    xs = jnp.where(jnp.abs(x) > layer_t, x, 0)
    y = xs @ weights["w"]
    if "b" in weights:
      y = y + weights["b"].reshape((1,) * (y.ndim - 1) + (-1,))
    return y, None

  thresholds = {n: plan.threshold[n] for n in CONFIG.sites.names}
  ref = model_pass(params, toks, config=CONFIG, hook=own, hook_xs=thresholds).hidden
  got = model_pass(params, toks, config=CONFIG, plan=plan).hidden
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_teal_greedy_reaches_the_layer_target_and_differs_from_uniform(model):
  params, calib, _ = model
  built = th.teal_plan(
    params, CONFIG, calib, sparsity=0.5, allocation="greedy", greedy_step=0.1, show_progress=False
  )
  macs = {s.name: s.macs_per_token for s in CONFIG.sites}
  for layer in range(CONFIG.n_layers):
    s = {n: v[layer] for n, v in built.site_sparsity.items()}
    layer_share = sum(macs[n] * s.get(n, 0) for n in macs) / sum(macs.values())
    assert 0.5 <= layer_share < 0.5 + 0.1 + 1e-9
  spread = np.ptp([v[0] for v in built.site_sparsity.values()])
  assert spread > 0.05  # the greedy search chose unequal sparsities


def test_cats_thresholds_the_gated_activation(model):
  params, calib, held = model
  built = th.cats_plan(params, CONFIG, calib, sparsity=0.6, show_progress=False)
  got = th.measure_activation_sparsity(params, CONFIG, built.plan, held)
  assert np.abs(got["down"] - 0.6).max() < 0.03
  assert np.abs(got["gate"]).max() < 0.01  # only the activation is sparse
  # the model equals a plain implementation of CATS's MLP
  toks = jnp.asarray(held[:2])
  t = built.plan.gate_threshold

  def own(name, x, weights, row, linear):
    return linear(x), x if name == "down" else None

  rec = model_pass(params, toks, config=CONFIG, plan=built.plan, hook=own).records["down"]
  ins = site_inputs(params, held[:2])
  for layer in range(CONFIG.n_layers):
    w_g = np.asarray(params["layers"]["gate"]["w"][layer])
    w_u = np.asarray(params["layers"]["up"]["w"][layer])
    # gate/up inputs of layer 0 are the dense ones; layer 1 inherits layer 0's sparsity
    if layer == 0:
      g = ins["gate"][0] @ w_g
      a = g / (1 + np.exp(-g))
      a = np.where(np.abs(a) > float(t[0]), a, 0)
      want = a * (ins["up"][0] @ w_u)
      np.testing.assert_allclose(
        np.asarray(rec[0]).reshape(-1, want.shape[-1]), want, rtol=1e-4, atol=1e-4
      )
  assert built.removed == pytest.approx(
    0.6 * 2 * 64 * 128 / sum(s.macs_per_token for s in CONFIG.sites)
  )


@pytest.mark.parametrize("method", ["teal_uniform", "cats"])
def test_thresholds_in_decode_only_when_asked(model, method):
  params, calib, held = model
  prompt = jnp.asarray(held[:1, :16])
  results = {}
  for decode in (False, True):
    built = build_method(
      params,
      CONFIG,
      method,
      sparsity=0.5,
      calib_windows=calib,
      options={"decode": decode},
      show_progress=False,
    )
    logits, cache = prefill(params, prompt, config=CONFIG, plan=built.plan, max_len=24)
    step, _ = decode_step(params, prompt[:, -1:], cache, config=CONFIG, plan=built.plan)
    results[decode] = np.asarray(step)
  _, cache = prefill(params, prompt, config=CONFIG, plan=built.plan, max_len=24)
  dense_step, _ = decode_step(params, prompt[:, -1:], cache, config=CONFIG, plan=None)
  np.testing.assert_array_equal(results[False], np.asarray(dense_step))
  assert np.abs(results[True] - results[False]).max() > 1e-3


def test_threshold_plan_save_and_restore(model, tmp_path):
  params, calib, held = model
  for method in ("teal_uniform", "cats"):
    built = build_method(
      params,
      CONFIG,
      method,
      sparsity=0.5,
      calib_windows=calib,
      options={"decode": True},
      show_progress=False,
    )
    path = tmp_path / method
    save_sparsity_plan(path, built.plan, metadata={"model": "tiny"})
    back, _ = load_sparsity_plan(path, config=CONFIG)
    assert back.threshold_decode
    specs = plan_specs(back, sites=CONFIG.sites)  # a sharded run places them: replicated
    if method == "cats":
      assert specs.gate_threshold == P()
    else:
      assert all(all(a is None for a in spec) for spec in specs.threshold.values())
    a = forward(params, jnp.asarray(held[:2]), config=CONFIG, plan=built.plan)
    b = forward(params, jnp.asarray(held[:2]), config=CONFIG, plan=back)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# The registry and bad input


def test_registry_names_and_kinds():
  kinds = {
    n: resolve_method(n).kind for n in ("wanda", "sparsegpt", "teal", "teal_uniform", "cats")
  }
  assert kinds == {
    "wanda": "weight",
    "sparsegpt": "weight",
    "teal": "threshold",
    "teal_uniform": "threshold",
    "cats": "threshold",
  }
  assert resolve_method("amber").kind == "nm" and resolve_method("dense").kind == "dense"
  assert all(resolve_method(n).needs_calibration for n in kinds)
  with pytest.raises(ValueError, match="build_method"):
    resolve_method("wanda").amber_config("2:4")


def test_build_method_records_cost_and_removed_share(model):
  params, calib, _ = model
  built = build_method(
    params, CONFIG, "sparsegpt", pattern="2:4", calib_windows=calib, show_progress=False
  )
  assert built.coverage == pytest.approx(1.0) and built.removed == pytest.approx(0.5)
  assert built.seconds > 0 and built.record["options"]["damp"] == 0.01
  amber = build_method(params, CONFIG, "naive", pattern="2:4", show_progress=False)
  assert amber.removed == pytest.approx(0.5) and amber.params is params


@pytest.mark.parametrize(
  ("method", "kwargs", "match"),
  [
    ("teal", {"pattern": "2:4"}, "takes a sparsity"),
    ("amber", {"sparsity": 0.5}, "takes an N:M pattern"),
    ("wanda", {}, "exactly one"),
    ("wanda", {"pattern": "2:4", "sparsity": 0.5}, "exactly one"),
    ("teal", {"sparsity": 0.0}, r"in \(0, 1\)"),
    ("cats", {"sparsity": 1.0}, r"in \(0, 1\)"),
    ("sparsegpt", {"sparsity": -0.1}, r"in \(0, 1\)"),
  ],
)
def test_bad_targets(method, kwargs, match):
  with pytest.raises(ValueError, match=match):
    check_method_target(method, kwargs.get("pattern"), kwargs.get("sparsity"))


def test_bad_input_is_refused_before_calibration(model):
  params, calib, _ = model
  with pytest.raises(ValueError, match=r"d_in.*48|48.*d_in|must divide"):
    prune_weights(params, CONFIG, "wanda", calib_windows=calib, pattern="2:48", show_progress=False)
  with pytest.raises(ValueError, match="calibration tokens.*d_in=128"):
    prune_weights(
      params, CONFIG, "sparsegpt", calib_windows=calib[:1, :40], pattern="2:4", show_progress=False
    )
  with pytest.raises(ValueError, match="damp"):
    prune_weights(params, CONFIG, "sparsegpt", calib_windows=calib, pattern="2:4", damp=0.0)
  with pytest.raises(ValueError, match="unknown weight-pruning method"):
    prune_weights(params, CONFIG, "obs", calib_windows=calib, pattern="2:4")
  with pytest.raises(ValueError, match="unknown site"):
    prune_weights(params, CONFIG, "wanda", calib_windows=calib, pattern="2:4", sites=[(0, "qq")])
  with pytest.raises(ValueError, match="allocation"):
    th.teal_plan(params, CONFIG, calib, sparsity=0.5, allocation="best")
  with pytest.raises(ValueError, match="calib_windows"):
    build_method(params, CONFIG, "teal", sparsity=0.5, calib_windows=None)


def test_wanda_on_expert_sites_and_cats_on_a_mixture_of_experts():
  """A tiny Qwen3-MoE: Wanda scores each expert with the norms of its own routed rows (the N:M
  invariant holds per expert); CATS thresholds the experts' gated activation; SparseGPT refuses
  expert sites by name before calibrating."""
  import dataclasses

  from amber_jax.model.config import MixtureOfExperts
  from amber_jax.model.presets import init_random_params

  config = dataclasses.replace(
    CONFIG,
    qkv_bias=False,
    qk_norm=True,
    moe=MixtureOfExperts(n_experts=4, n_active=2, d_ff=32),
    architecture="qwen3_moe",
  )
  params = init_random_params(config, jax.random.key(0), dtype=jnp.float32)
  windows = np.random.default_rng(2).integers(0, config.vocab_size, (4, 32)).astype(np.int32)
  pruned = prune_weights(
    params, config, "wanda", calib_windows=windows, pattern="2:4", show_progress=False
  )
  mask = np.asarray(pruned.masks["gate"])  # [L, E, d_in, d_out]
  assert mask.shape == (config.n_layers, 4, CONFIG.d_model, 32)
  assert (mask.reshape(config.n_layers, 4, -1, 4, 32).sum(axis=3) == 2).all()
  assert pruned.record()["zero_share"] == pytest.approx(0.5)
  # each expert's mask follows its own rows: experts see different norms, so masks differ
  assert (mask[0, 0] != mask[0, 1]).any()
  y = forward(pruned.params, jnp.asarray(windows[:1]), config=config)
  assert np.isfinite(np.asarray(y)).all()
  cats = th.cats_plan(params, config, windows, sparsity=0.5, show_progress=False)
  got = th.measure_activation_sparsity(params, config, cats.plan, windows)
  assert abs(got["down"][0] - 0.5) < 0.02  # layer 0 sees the calibrated distribution
  with pytest.raises(ValueError, match="expert sites"):
    prune_weights(
      params, config, "sparsegpt", calib_windows=np.tile(windows, (2, 1)), pattern="2:4"
    )
