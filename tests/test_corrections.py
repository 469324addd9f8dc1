"""Output corrections of sparse sites: numpy references, plan wiring, no recompiles, errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_V64_CONFIG, init_params

from amber_jax.calibrate.correction_fit import (
  CORRECTION_KEYS,
  CorrectionSpec,
  calibrate_corrections,
  channel_median,
  check_correction_tree,
  fit_site_correction,
  identity_correction,
)
from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.core.correction import corrected_sparse_matmul
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import sparsify
from amber_jax.eval.perplexity import make_windows, window_nll
from amber_jax.model import PROJECTIONS, decode_step, forward, prefill
from amber_jax.model.llama import lm_head, model_pass
from amber_jax.plan.schema import make_plan

CONFIG = dataclasses.replace(TINY_V64_CONFIG, max_seq_len=64, qkv_bias=True)
P24 = NMPattern.parse("2:4")
SPECS = [
  "scale",
  "scale_channel",
  "bias",
  "median",
  "mean",
  "rescale",
  "rescale_channel",
  "scale+bias",
  "scale_channel+bias",
  "median+rescale_channel+scale_channel+bias",
  "mean+rescale+scale+bias",
]


@pytest.fixture(scope="module")
def model():
  params = init_params(CONFIG)
  windows = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, 17)).astype(np.int32)
  return params, windows


# ----------------------------------------------------------------------------------------------
# Plain numpy references.


def np_keep(score_TxD: np.ndarray, n: int, m: int) -> np.ndarray:
  """Top-n of every m along the last axis, ties to the lower index."""
  t, d = score_TxD.shape
  groups = score_TxD.reshape(t, d // m, m)
  order = np.argsort(-groups, axis=-1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(m)[None, None, :].repeat(t, 0).repeat(d // m, 1), -1)
  return (rank < n).reshape(t, d)


def np_fit(x, w, f, spec: str, n=2, m=4):
  """The corrections by their closed forms, in float64."""
  s = CorrectionSpec.parse(spec)
  x, w = x.astype(np.float64), w.astype(np.float64)
  c = {"median": np.median(x, 0), "mean": x.mean(0)}.get(s.center, np.zeros(x.shape[1]))
  xc = x - c
  keep = np_keep(np.abs(xc) * f, n, m)
  xs = xc * keep
  k = np.sqrt((xc**2).sum(0) / (xs**2).sum(0)) if s.rescale == "channel" else np.ones(x.shape[1])
  g = np.linalg.norm(xc, axis=1) / np.linalg.norm(xs, axis=1) if s.rescale == "token" else 1.0
  y = x @ w
  y_hat = ((xs * k) @ w) * np.reshape(g, (-1, 1)) + c @ w
  if s.bias:
    yc, hc = y - y.mean(0), y_hat - y_hat.mean(0)
    num, den = (yc * hc).sum(0), (hc * hc).sum(0)
  else:
    num, den = (y * y_hat).sum(0), (y_hat * y_hat).sum(0)
  alpha = {"site": np.full(w.shape[1], num.sum() / den.sum()), "channel": num / den}.get(
    s.scale, np.ones(w.shape[1])
  )
  b = y.mean(0) - alpha * y_hat.mean(0) if s.bias else np.zeros(w.shape[1])
  return {"center": c, "in_scale": k, "out_scale": alpha, "out_bias": alpha * (c @ w) + b}, y


def site_data(seed=0, t=300, d_in=32, d_out=24):
  rng = np.random.default_rng(seed)
  # Shifted, skewed channels (the case centring is for), never zero.
  x = (rng.standard_normal((t, d_in)) * rng.uniform(0.5, 2, d_in) + rng.uniform(-1, 1, d_in)) ** 3
  w = rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)
  f = rng.uniform(1, 3, d_in)
  return x.astype(np.float32), w.astype(np.float32), f.astype(np.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_fit_matches_closed_forms(spec):
  x, w, f = site_data()
  arrays, errors = fit_site_correction(
    jnp.asarray(x), jnp.asarray(w), jnp.asarray(f), P24, CorrectionSpec.parse(spec)
  )
  ref, y = np_fit(x, w, f, spec)
  for key, value in ref.items():
    np.testing.assert_allclose(np.asarray(arrays[key]), value, rtol=2e-4, atol=2e-4, err_msg=key)
  assert float(arrays["token_rescale"]) == (1.0 if "rescale" in spec.split("+") else 0.0)
  # The errors it reports are those of the plain and of the corrected output.
  plain = (x.astype(np.float64) * np_keep(np.abs(x) * f, 2, 4)) @ w
  corrected = np.asarray(
    corrected_sparse_matmul(jnp.asarray(x), jnp.asarray(w), P24, jnp.asarray(f), arrays)
  )
  np.testing.assert_allclose(float(errors[0]), ((y - plain) ** 2).sum(), rtol=1e-4)
  np.testing.assert_allclose(float(errors[1]), ((y - corrected) ** 2).sum(), rtol=1e-3)
  np.testing.assert_allclose(float(errors[2]), (y**2).sum(), rtol=1e-4)


def test_closed_forms_named_in_the_issue():
  x, w, f = site_data(seed=3)
  keep = np_keep(np.abs(x) * f, 2, 4)
  y, y_s = x.astype(np.float64) @ w, (x * keep).astype(np.float64) @ w
  scale, _ = fit_site_correction(x, w, f, P24, CorrectionSpec.parse("scale"))
  alpha = (y * y_s).sum() / (y_s * y_s).sum()  # <Y, Y_s> / <Y_s, Y_s>
  np.testing.assert_allclose(np.asarray(scale["out_scale"]), np.full(w.shape[1], alpha), rtol=1e-4)
  bias, _ = fit_site_correction(x, w, f, P24, CorrectionSpec.parse("bias"))
  expected = (x * (1 - keep)).astype(np.float64).mean(0) @ w  # W @ E[x * (1 - m)]
  np.testing.assert_allclose(np.asarray(bias["out_bias"]), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(bias["out_scale"]), 1.0)


def test_corrected_matmul_matches_reference():
  x, w, f = site_data(seed=5, t=7)
  rng = np.random.default_rng(6)
  corr = {
    "center": rng.standard_normal(32).astype(np.float32),
    "in_scale": rng.uniform(1, 2, 32).astype(np.float32),
    "token_rescale": np.float32(1.0),
    "out_scale": rng.uniform(0.5, 1.5, 24).astype(np.float32),
    "out_bias": rng.standard_normal(24).astype(np.float32),
  }
  got = corrected_sparse_matmul(
    jnp.asarray(x).reshape(1, 7, 32), w, P24, f, jax.tree.map(jnp.asarray, corr)
  )
  xc = x.astype(np.float64) - corr["center"]
  xs = xc * np_keep(np.abs(xc) * f, 2, 4)
  g = np.linalg.norm(xc, axis=1, keepdims=True) / np.linalg.norm(xs, axis=1, keepdims=True)
  expected = ((xs * corr["in_scale"]) @ w) * g * corr["out_scale"] + corr["out_bias"]
  np.testing.assert_allclose(np.asarray(got)[0], expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Calibration on the model.


def recorded_inputs(params, windows):
  """proj -> [L, tokens, d_in]: every site's input in one dense pass."""

  def record(name, x, weights, row, linear):
    return linear(x), x.reshape(-1, x.shape[-1])

  return model_pass(params, jnp.asarray(windows), config=CONFIG, hook=record).records


def test_dense_calibration_equals_numpy_on_recorded_inputs(model):
  params, windows = model
  f = np.random.default_rng(2).uniform(1, 2, (CONFIG.n_layers, CONFIG.d_ff)).astype(np.float32)
  plan = make_plan(CONFIG, "2:4", sites=[(0, "q"), (1, "down"), (1, "gate")], factors={"down": f})
  inputs = recorded_inputs(params, windows)
  for spec in ("bias", "median+scale_channel+bias"):
    result = calibrate_corrections(
      params, plan, windows, config=CONFIG, correction=spec, show_progress=False
    )
    assert result.spec == spec and result.inputs == "dense" and result.tokens == windows.size
    for layer, proj in plan.enabled_sites():
      x = np.asarray(inputs[proj][layer])
      w = np.asarray(params["layers"][proj]["w"][layer])
      ref, _ = np_fit(x, w, np.asarray(plan.factors[proj][layer]), spec)
      for key, value in ref.items():
        got = np.asarray(result.correction[proj][key][layer])
        np.testing.assert_allclose(got, value, rtol=1e-3, atol=1e-4, err_msg=f"{proj}{layer}")
    # Dense sites keep the identity.
    identity = identity_correction(CONFIG)
    for key in CORRECTION_KEYS:
      np.testing.assert_array_equal(
        np.asarray(result.correction["o"][key]), np.asarray(identity["o"][key])
      )
    assert result.errors_before[0, PROJECTIONS.index("o")] == 0.0


@pytest.mark.parametrize("inputs", ["dense", "sequential", "global"])
@pytest.mark.parametrize("spec", ["scale", "scale_channel", "bias", "scale_channel+bias"])
def test_least_squares_corrections_reduce_site_error(model, spec, inputs):
  params, windows = model
  plan = make_plan(CONFIG, "2:4")
  result = calibrate_corrections(
    params, plan, windows, config=CONFIG, correction=spec, inputs=inputs, show_progress=False
  )
  # Least squares over a family that contains "no correction": never worse, and better here.
  assert np.all(result.errors_after <= result.errors_before + 1e-6)
  assert result.errors_after.mean() < result.errors_before.mean()


def test_centring_reduces_site_error_on_the_model(model):
  params, windows = model
  plan = make_plan(CONFIG, "2:4")
  result = calibrate_corrections(
    params, plan, windows, config=CONFIG, correction="median+bias", show_progress=False
  )
  assert result.errors_after.mean() < result.errors_before.mean()


@pytest.mark.parametrize("inputs", ["sequential", "global"])
def test_sequential_fits_on_the_sparse_models_inputs(model, inputs):
  params, windows = model
  plan = make_plan(CONFIG, "2:4")
  kw = dict(config=CONFIG, correction="median+scale_channel+bias", show_progress=False)
  dense = calibrate_corrections(params, plan, windows, inputs="dense", **kw)
  seq = calibrate_corrections(params, plan, windows, inputs=inputs, **kw)
  # Layer 0's q/k/v read the embeddings in both (and have the same target); everything after
  # sees sparse upstream sites.
  for proj in ("q", "k", "v"):
    for key in CORRECTION_KEYS:
      np.testing.assert_allclose(
        np.asarray(seq.correction[proj][key][0]),
        np.asarray(dense.correction[proj][key][0]),
        rtol=1e-5,
        atol=1e-5,
      )
  assert not np.allclose(
    np.asarray(seq.correction["down"]["out_bias"][1]),
    np.asarray(dense.correction["down"]["out_bias"][1]),
  )


def test_global_fits_to_the_dense_models_outputs(model):
  params, windows = model
  plan = make_plan(CONFIG, "2:4", sites=[(0, "q"), (1, "down")])
  kw = dict(config=CONFIG, correction="bias", show_progress=False)
  result = calibrate_corrections(params, plan, windows, inputs="global", **kw)
  # The sparse model's input of layer 1's down differs from the dense one's (layer 0's q is
  # sparse): its bias is E[dense target - plain sparse output of the sparse model's input].
  dense_x = np.asarray(recorded_inputs(params, windows)["down"][1], np.float64)
  corrected_q = plan.replace(
    correction=jax.tree.map(
      lambda c, i: c.at[1].set(i[1]), result.correction, identity_correction(CONFIG)
    )
  )

  def record(x, weights, site_x):
    del weights, site_x
    return x.reshape(-1, x.shape[-1])

  # The sparse model's inputs of down in layer 1: record them under the plan with only layer
  # 0's correction (the one the calibration pass had applied when it reached layer 1).
  def rec(name, x, weights, row, linear):
    return linear(x), (x.reshape(-1, x.shape[-1]) if name == "down" else None)

  records = model_pass(
    params, jnp.asarray(windows), config=CONFIG, plan=corrected_q, hook=rec
  ).records
  sparse_x = np.asarray(records["down"][1], np.float64)
  w = np.asarray(params["layers"]["down"]["w"][1], np.float64)
  plain = (sparse_x * np_keep(np.abs(sparse_x), 2, 4)) @ w
  expected = (dense_x @ w - plain).mean(0)
  np.testing.assert_allclose(
    np.asarray(result.correction["down"]["out_bias"][1]), expected, rtol=1e-3, atol=1e-4
  )


@pytest.mark.parametrize("shape", [(9, 5), (10, 5), (1, 3), (2, 1), (4104, 7)])
def test_channel_median_equals_numpy(shape):
  rng = np.random.default_rng(shape[0])
  x = (rng.standard_normal(shape) ** 3).astype(np.float32)
  x[0, 0] = -0.0
  if shape[0] > 3:
    x[1:3, -1] = 2.5  # duplicates
    x[3, 0] = 0.0
  np.testing.assert_array_equal(np.asarray(jax.jit(channel_median)(x)), np.median(x, axis=0))


# ----------------------------------------------------------------------------------------------
# The plan: exactness without corrections, prefill only, no recompiles.


def plain_reference_logits(params, toks, plan):
  """The N:M model as it was before corrections existed: sparsify, then the dense dot."""

  def own_linear(name, x, weights, site, linear):
    del name, linear  # written out here: the reference must not share the library's code
    x = jax.lax.cond(
      site["enabled"], lambda v: sparsify(v, plan.pattern, site["factors"]), lambda v: v, x
    )
    y = jnp.einsum("...i,io->...o", x, weights["w"])
    if "b" in weights:
      y = y + weights["b"].reshape((1,) * (y.ndim - 1) + (-1,))
    return y, None

  sites = {p: {"enabled": plan.enabled[p], "factors": plan.factors[p]} for p in PROJECTIONS}
  out = model_pass(params, toks, config=CONFIG, hook=own_linear, hook_xs=sites)
  return lm_head(CONFIG, params, out.hidden)


def test_no_correction_is_bit_identical_to_the_plain_plan(model):
  params, windows = model
  toks = jnp.asarray(windows)
  f = np.random.default_rng(4).uniform(1, 2, (CONFIG.n_layers, CONFIG.d_model)).astype(np.float32)
  plan = make_plan(CONFIG, "2:4", sites=[(0, "q"), (1, "o"), (1, "up")], factors={"q": f})
  assert plan.correction is None
  got = jax.jit(forward, static_argnames=("config",))(params, toks, config=CONFIG, plan=plan)
  ref = jax.jit(plain_reference_logits)(params, toks, plan)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # The identity correction takes the corrected path and changes nothing (up to rounding).
  ident = plan.replace(correction=identity_correction(CONFIG))
  np.testing.assert_allclose(
    np.asarray(forward(params, toks, config=CONFIG, plan=ident)), np.asarray(ref), atol=1e-5
  )


def test_correction_applies_in_prefill_and_decode_stays_dense_and_uncorrected(model):
  params, windows = model
  plan = make_plan(CONFIG, "2:4")
  result = calibrate_corrections(
    params, plan, windows, config=CONFIG, correction="median+bias", show_progress=False
  )
  corrected = plan.replace(correction=result.correction)
  toks = jnp.asarray(windows[:2, :9])
  logits_c, cache_c = prefill(params, toks, config=CONFIG, plan=corrected, max_len=12)
  logits_p, cache_p = prefill(params, toks, config=CONFIG, plan=plan, max_len=12)
  assert not np.allclose(np.asarray(logits_c), np.asarray(logits_p))
  nxt = jnp.argmax(logits_c[:, -1:], axis=-1)
  # Decode reads the corrected prefill's cache; the step itself equals the dense one.
  step_c, _ = decode_step(params, nxt, cache_c, config=CONFIG, plan=corrected)
  step_d, _ = decode_step(params, nxt, cache_c, config=CONFIG, plan=None)
  np.testing.assert_array_equal(np.asarray(step_c), np.asarray(step_d))


def test_changing_corrections_does_not_recompile(model):
  params, windows = model
  if not hasattr(window_nll, "_cache_size"):
    pytest.skip("this jax has no _cache_size() on jitted functions")
  plan = make_plan(CONFIG, "2:4")
  w = jnp.asarray(make_windows(windows.reshape(-1), 9, 2))
  weight = jnp.ones((2,), jnp.float32)
  losses = []
  for i, spec in enumerate(("bias", "median+scale_channel", "rescale+scale")):
    result = calibrate_corrections(
      params, plan, windows, config=CONFIG, correction=spec, show_progress=False
    )
    p = plan.replace(correction=result.correction)
    losses.append(float(window_nll(params, w, weight, p, config=CONFIG, dtype=jnp.float32)[0]))
    if i == 0:
      compiles = window_nll._cache_size()
  assert window_nll._cache_size() == compiles
  assert len(set(losses)) == 3


def test_build_plan_hooks_the_correction(model, tmp_path):
  params, windows = model
  amber = AmberConfig(pattern=P24, score="weight", policy="paper", correction="bias+median")
  info = build_plan(params, CONFIG, amber, calib_windows=windows, show_progress=False)
  assert info.correction is not None and info.correction.spec == "median+bias"
  assert info.plan.correction is info.correction.correction
  check_correction_tree(CONFIG, info.plan.correction)
  plain = build_plan(params, CONFIG, AmberConfig(pattern=P24, score="weight", policy="paper"))
  assert plain.plan.correction is None and plain.correction is None
  with pytest.raises(ValueError, match="needs calibration windows"):
    build_plan(params, CONFIG, amber, calib_windows=None)
  # A corrected plan saves and restores bit for bit.
  from amber_jax.plan.io import load_sparsity_plan, save_sparsity_plan

  save_sparsity_plan(tmp_path / "plan", info.plan, metadata={"model": "tiny"})
  restored, _ = load_sparsity_plan(tmp_path / "plan")
  for p in PROJECTIONS:
    for key in CORRECTION_KEYS:
      np.testing.assert_array_equal(
        np.asarray(restored.correction[p][key]), np.asarray(info.plan.correction[p][key])
      )


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_spec_names():
  assert str(CorrectionSpec.parse("bias+scale_channel+median")) == "median+scale_channel+bias"
  assert CorrectionSpec.parse("none").is_none
  assert str(CorrectionSpec.parse(" rescale + bias ")) == "rescale+bias"


@pytest.mark.parametrize(
  "bad, match",
  [
    ("shift", "correction has unknown name 'shift'"),
    ("none+bias", "unknown name 'none'"),
    ("", "correction must be"),
    ("median+mean", "two corrections of the same kind"),
    ("scale+scale_channel", "two corrections of the same kind"),
    ("rescale+rescale_channel", "two corrections of the same kind"),
    ("bias+bias", "two corrections of the same kind"),
  ],
)
def test_bad_correction_names(bad, match):
  with pytest.raises(ValueError, match=match):
    CorrectionSpec.parse(bad)
  with pytest.raises(ValueError, match="correction"):
    AmberConfig(pattern=P24, correction=bad)


def test_bad_calibration_arguments(model):
  params, windows = model
  plan = make_plan(CONFIG, "2:4")
  kw = dict(config=CONFIG, show_progress=False)
  with pytest.raises(
    ValueError, match="correction_inputs must be one of dense, sequential, global"
  ):
    calibrate_corrections(params, plan, windows, correction="bias", inputs="sparse", **kw)
  with pytest.raises(ValueError, match="correction_inputs"):
    AmberConfig(pattern=P24, correction="bias", correction_inputs="sparse")
  with pytest.raises(ValueError, match="nothing to correct"):
    calibrate_corrections(params, make_plan(CONFIG, None), windows, correction="bias", **kw)
  with pytest.raises(ValueError, match="windows must be a non-empty"):
    calibrate_corrections(params, plan, windows[0], correction="bias", **kw)
  with pytest.raises(ValueError, match="needs impl='xla'"):
    AmberConfig(pattern=P24, correction="bias", impl="pallas")
  bad = identity_correction(CONFIG)
  bad["q"]["out_bias"] = jnp.zeros((CONFIG.n_layers, 3))
  with pytest.raises(ValueError, match=r"correction\['q'\]\['out_bias'\] must have shape"):
    check_correction_tree(CONFIG, bad)


# ----------------------------------------------------------------------------------------------
# The ablation runner's parsing and table (no model needed).


def test_ablation_runs_and_markdown():
  from amber_jax.runs.corrections import CorrectionsConfig, corrections_markdown, parse_run

  assert parse_run("bias+median@sequential") == (CorrectionSpec.parse("median+bias"), "sequential")
  assert parse_run("scale")[1] == "dense"
  with pytest.raises(ValueError, match="correction_inputs"):
    parse_run("bias@sparse")
  with pytest.raises(ValueError, match="methods"):
    CorrectionsConfig(methods=("best",), cache_dir="x")
  with pytest.raises(ValueError, match="correction has unknown name"):
    CorrectionsConfig(corrections=("shift",), cache_dir="x")

  def row(correction, lee, wiki, inputs="dense"):
    return {
      "pattern": "8:16",
      "method": "paper",
      "correction": correction,
      "inputs": inputs,
      "perplexity": {"lee": lee, "wiki": wiki},
      "calib_seconds": 0.0 if correction == "none" else 12.0,
      "site_error_before": None if correction == "none" else 0.2,
      "site_error_after": None if correction == "none" else 0.1,
    }

  result = {
    "dense": {"lee": 30.0, "wiki": 20.0},
    "rows": [row("none", 40.0, 30.0), row("bias", 35.0, 25.0)],
    "config": {
      "model": "m",
      "num_windows": 8,
      "seq_len": 512,
      "calib_windows": 8,
      "text": "lee",
      "coverage": 0.55,
    },
    "device": {"backend": "cpu"},
    "versions": {"jax": "0"},
  }
  md = corrections_markdown(result, "cmd")
  closed_lee = math.log(40 / 35) / math.log(40 / 30)
  closed_wiki = math.log(30 / 25) / math.log(30 / 20)
  assert (
    f"| 8:16 | paper | bias | dense | 35.00 | {closed_lee:+.0%} | 25.00 | {closed_wiki:+.0%} |"
    in md
  )
  assert f"| {closed_wiki / closed_lee:.2f} | 0.200 -> 0.100 | 12.0 |" in md
