"""W8A8 and Outstanding-sparse in the model: smoothing exactness, int8 dots, plan checkpoints."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_CONFIG as CFG
from conftest import random_params

from amber_jax.calibrate.stats import collect_input_absmax
from amber_jax.model import decode_step, forward, prefill
from amber_jax.model.config import PROJECTIONS
from amber_jax.plan.io import PlanCheckpointError, load_sparsity_plan, save_sparsity_plan
from amber_jax.plan.quant_state import build_quant_state
from amber_jax.plan.schema import make_plan
from amber_jax.runs.prefill import PrefillRunConfig, run_prefill

ALL_SITES = [(l, p) for l in range(CFG.n_layers) for p in PROJECTIONS]
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"


@pytest.fixture(scope="module")
def model():
  rng = np.random.default_rng(0)
  params = random_params(CFG, rng)
  params["embed"][:, 5] *= 20.0  # an outlier channel, as in real LLMs
  tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
  absmax = collect_input_absmax(params, np.asarray(tokens), config=CFG, show_progress=False)
  return params, tokens, absmax


@pytest.mark.parametrize("smooth", ["none", "smoothquant", "outstanding"])
def test_smoothing_alone_leaves_dense_outputs_unchanged(model, smooth):
  params, tokens, absmax = model
  state, _ = build_quant_state(params, CFG, absmax, smooth=smooth, float_sites=ALL_SITES)
  dense = forward(params, tokens, config=CFG)
  smoothed = forward(params, tokens, config=CFG, plan=make_plan(CFG, None).replace(quant=state))
  err = float(jnp.max(jnp.abs(smoothed - dense)))
  print(f"{smooth}: smoothing folded into norms / weights, max |logit diff| {err:.2e}")
  assert err < 1e-4


def test_smoothquant_reduces_quantization_error(model):
  params, tokens, absmax = model
  dense = forward(params, tokens, config=CFG)
  errors = {}
  for smooth in ("none", "smoothquant"):
    state, _ = build_quant_state(params, CFG, absmax, smooth=smooth)
    out = forward(params, tokens, config=CFG, plan=make_plan(CFG, None).replace(quant=state))
    errors[smooth] = float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense))
  print(f"relative logit error of W8A8: {errors}")
  assert errors["smoothquant"] < errors["none"] < 0.2


def _dots(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for v in eqn.params.values():
      subs = v if isinstance(v, (list, tuple)) else [v]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _dots(inner)


@pytest.mark.parametrize("order", ["sparsify_first", "quantize_first"])
def test_quantized_prefill_jaxpr_has_int8_dots_with_int32_accumulation(model, order):
  params, tokens, absmax = model
  state, _ = build_quant_state(params, CFG, absmax, smooth="outstanding", order=order)
  plan = make_plan(CFG, "8:16").replace(quant=state)
  jaxpr = jax.make_jaxpr(lambda t: prefill(params, t, config=CFG, plan=plan)[0])(tokens).jaxpr
  int8_dots = [e for e in _dots(jaxpr) if any(v.aval.dtype == jnp.int8 for v in e.invars)]
  assert len(int8_dots) == len(PROJECTIONS)  # one per site in the scanned layer body
  for eqn in int8_dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.int8, jnp.int8]
    assert eqn.outvars[0].aval.dtype == jnp.int32


@pytest.mark.parametrize(
  "order,act_mode,pattern",
  [("sparsify_first", "token", "8:16"), ("quantize_first", "tensor", "2:4"), (None, "token", None)],
)
def test_w8a8_through_the_pallas_int8_kernel_equals_xla(model, order, act_mode, pattern):
  """impl pallas / pallas_mask run every int8 site through pallas_kernels.int8_matmul
  (interpret mode here): the same int32 sums and float32 rescale, so the same logits."""
  params, tokens, absmax = model
  kw = dict(smooth="outstanding", act_mode=act_mode)
  if order is not None:
    kw["order"] = order
  state, _ = build_quant_state(params, CFG, absmax, **kw)
  logits = {
    impl: forward(
      params, tokens, config=CFG, plan=make_plan(CFG, pattern, impl=impl).replace(quant=state)
    )
    for impl in ("xla", "pallas", "pallas_mask")
  }
  for impl in ("pallas", "pallas_mask"):
    err = float(jnp.max(jnp.abs(logits[impl] - logits["xla"])))
    print(f"\nW8A8 {order} {act_mode} {pattern}: max |{impl} - xla| logits = {err:.2e}")
    assert err <= 1e-5
  jaxpr = jax.make_jaxpr(
    lambda t: forward(
      params, t, config=CFG, plan=make_plan(CFG, pattern, impl="pallas").replace(quant=state)
    )
  )(tokens)
  assert "int8_matmul" in str(jaxpr)  # the kernel, not the jnp int8 dot


def test_decode_uses_int8_without_sparsity(model):
  params, tokens, absmax = model
  state, _ = build_quant_state(params, CFG, absmax, smooth="smoothquant")
  quant_only = make_plan(CFG, None).replace(quant=state)
  sparse = make_plan(CFG, "2:4").replace(quant=state)
  _, cache = prefill(params, tokens[:, :10], config=CFG, plan=sparse, max_len=12)
  a, _ = decode_step(params, tokens[:, 10:11], cache, config=CFG, plan=sparse)
  b, _ = decode_step(params, tokens[:, 10:11], cache, config=CFG, plan=quant_only)
  c, _ = decode_step(params, tokens[:, 10:11], cache, config=CFG)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # no sparsity in decode
  assert float(jnp.max(jnp.abs(a - c))) > 0  # but int8, not float


def test_plan_round_trip_is_bit_exact(model, tmp_path):
  params, tokens, absmax = model
  state, _ = build_quant_state(
    params,
    CFG,
    absmax,
    smooth="outstanding",
    act_mode="tensor",
    order="quantize_first",
    float_sites=[(1, "down")],
  )
  plan = make_plan(CFG, "8:16", sites=[(0, "q"), (1, "gate")]).replace(quant=state)
  save_sparsity_plan(tmp_path / "plan", plan, metadata={"pattern": "8:16", "model": "tiny"})
  restored, meta = load_sparsity_plan(tmp_path / "plan", expect={"pattern": "8:16"})
  assert jax.tree.structure(restored) == jax.tree.structure(plan)
  for a, b in zip(jax.tree.leaves(plan), jax.tree.leaves(restored), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
    forward(params, tokens, config=CFG, plan=plan),
    forward(params, tokens, config=CFG, plan=restored),
  )
  with pytest.raises(PlanCheckpointError, match="pattern 8:16, this run uses 2:4"):
    load_sparsity_plan(tmp_path / "plan", expect={"pattern": "2:4"})
  load_sparsity_plan(tmp_path / "plan", config=CFG)  # the arrays fit this model
  other = dataclasses.replace(CFG, d_ff=256)
  with pytest.raises(PlanCheckpointError, match=r"factors\['down'\] must have shape \(2, 256\)"):
    load_sparsity_plan(tmp_path / "plan", config=other)


def test_plan_with_an_unknown_impl_is_refused_on_load(tmp_path, monkeypatch):
  import amber_jax.plan.io as plan_io

  real_static = plan_io._static
  monkeypatch.setattr(plan_io, "_static", lambda plan: dict(real_static(plan), impl="cuda"))
  save_sparsity_plan(tmp_path / "plan", make_plan(CFG, "2:4"), metadata={})
  with pytest.raises(PlanCheckpointError, match=r"impl must be one of \('xla'"):
    load_sparsity_plan(tmp_path / "plan")


def test_save_and_load_plan_through_the_main_job(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(400)), encoding="utf-8")
  common = dict(
    model=str(FIXTURE),
    text=str(text),
    seq_len=32,
    num_windows=2,
    calib_windows=2,
    gen_prompts=0,
    batch_size=2,
    cache_dir=str(tmp_path / "cache"),
    quant="w8a8",
    smooth="outstanding",
  )
  first = run_prefill(
    PrefillRunConfig(pattern="8:16", save_plan=str(tmp_path / "plan"), **common),
    show_progress=False,
    log=lambda *a: None,
  )
  common.pop("smooth")  # the loaded plan fixes it (giving it again is refused, below)
  second = run_prefill(
    PrefillRunConfig(pattern="8:16", load_plan=str(tmp_path / "plan"), **common),
    show_progress=False,
    log=lambda *a: None,
  )
  assert second["sparse"]["perplexity"] == first["sparse"]["perplexity"]
  with pytest.raises(ValueError, match="pattern 8:16, this run uses 2:4"):
    run_prefill(
      PrefillRunConfig(pattern="2:4", load_plan=str(tmp_path / "plan"), **common),
      show_progress=False,
      log=lambda *a: None,
    )
  # Options the plan fixes are refused rather than ignored; the impl (speed only) is applied.
  with pytest.raises(ValueError, match="which fixes score, smooth; drop them"):
    PrefillRunConfig(
      pattern="8:16", load_plan=str(tmp_path / "plan"), score="weight", smooth="none", **common
    )
  third = run_prefill(
    PrefillRunConfig(pattern="8:16", load_plan=str(tmp_path / "plan"), impl="pallas", **common),
    show_progress=False,
    log=lambda *a: None,
  )
  assert third["sparse"]["impl"] == "pallas"
  np.testing.assert_allclose(third["sparse"]["perplexity"], first["sparse"]["perplexity"], 1e-5)


def test_automatic_float_sites_pick_the_largest_quantization_errors(model):
  from amber_jax.calibrate.stats import measure_quant_errors, most_sensitive_sites

  params, tokens, absmax = model
  state, _ = build_quant_state(params, CFG, absmax, smooth="none")
  errors = measure_quant_errors(params, np.asarray(tokens), state, config=CFG, show_progress=False)
  assert errors.shape == (CFG.n_layers, len(PROJECTIONS))
  assert (errors > 0).all() and (errors < 0.5).all()
  top = most_sensitive_sites(errors, 3, CFG.site_names)
  threshold = np.sort(errors, axis=None)[-3]
  assert all(errors[l, PROJECTIONS.index(p)] >= threshold for l, p in top)
  # Keeping those sites in float lowers the model's error.
  dense = forward(params, tokens, config=CFG)
  rel = {}
  for name, sites in (("none", ()), ("top3", top)):
    st, _ = build_quant_state(params, CFG, absmax, smooth="none", float_sites=sites)
    out = forward(params, tokens, config=CFG, plan=make_plan(CFG, None).replace(quant=st))
    rel[name] = float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense))
  print(f"relative logit error, all int8 vs top-3 sites in float: {rel}")
  assert rel["top3"] < rel["none"]
  with pytest.raises(ValueError, match="float_sites entry q:5 is out of range"):
    build_quant_state(params, CFG, absmax, float_sites=[(5, "q")])
  with pytest.raises(ValueError, match="smooth must be one of"):
    build_quant_state(params, CFG, absmax, smooth="awq")


@pytest.mark.parametrize("act_mode", ["token", "tensor"])
def test_project_w8a8_orders_against_a_hand_built_reference(act_mode):
  """The injection point's int8 path, step by step: smoothing division, N:M (before or after
  quantization), int8 dot, rescale. Fails if either order skipped or misplaced the mask."""
  from amber_jax.core.linear import LinearSpec, site_linear
  from amber_jax.core.patterns import NMPattern
  from amber_jax.core.quant import int8_dot_general, quantize_activation, quantize_weight
  from amber_jax.core.sparsity import sparsify

  kx, kw, kd = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (3, 5, 64), jnp.float32)
  act_div = jax.random.uniform(kd, (64,), jnp.float32, 0.5, 2.0)
  w = jax.random.normal(kw, (64, 48), jnp.float32) / 8
  w_q, w_scale = quantize_weight(act_div[:, None] * w)
  static = jnp.max(jnp.abs(x / act_div[None, None])) / 127 * 0.8  # some entries clip
  q = dict(
    act_div=act_div,
    fold=jnp.ones((64,), jnp.float32),
    act_scale=static,
    w_q=w_q,
    w_scale=w_scale,
    in_float=jnp.asarray(False),
  )
  factors = jax.random.uniform(jax.random.key(5), (64,), jnp.float32, 0.5, 2.0)
  plan_slice = dict(enabled=jnp.asarray(True), factors=factors)

  def reference(order):
    xs = x / act_div[None, None]
    mode = dict(mode=act_mode, static_scale=static if act_mode == "tensor" else None)
    if order == "sparsify_first":
      x_q, scale = quantize_activation(sparsify(xs, "2:4", factors), **mode)
    else:
      x_q, scale = quantize_activation(xs, **mode)
      x_q = sparsify(x_q, "2:4", factors)
    acc = int8_dot_general(x_q, w_q, (((2,), (0,)), ((), ())))
    return acc.astype(jnp.float32) * scale * w_scale[None, None]

  outs = {}
  for order in ("sparsify_first", "quantize_first"):
    spec = LinearSpec(pattern=NMPattern.parse("2:4"), act_mode=act_mode, order=order)
    outs[order] = np.asarray(site_linear(x, {"w": w}, dict(plan_slice, quant=q), spec))
    np.testing.assert_array_equal(outs[order], np.asarray(reference(order)))
  dense = site_linear(x, {"w": w}, {"quant": q}, LinearSpec(act_mode=act_mode))
  assert not np.array_equal(outs["sparsify_first"], np.asarray(dense))
  if act_mode == "token":  # the per-token scale sees the mask only when sparsifying first
    assert not np.array_equal(outs["sparsify_first"], outs["quantize_first"])
