"""Qwen3 and Qwen3-MoE: HF goldens, the grouped experts against a reference that computes every
expert, expert sites (N:M, W8A8) against numpy, the calibration and plan stack on a MoE model,
HF config and tensor variants, bad input, and the paper's coverage of its three models.

The tiny checkpoints in tests/fixtures/hf/tiny-qwen3{,-moe} and their golden logits come from
scripts/make_hf_goldens.py (torch 2.13 + transformers 5.24, fp32, eager attention).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.core.linear import ExpertRows, LinearSpec, site_linear
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import sparsify
from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.io.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint
from amber_jax.model import forward, generate_greedy
from amber_jax.model.config import LlamaConfig, MixtureOfExperts
from amber_jax.model.moe import moe_mlp
from amber_jax.model.presets import PRESETS, init_random_params
from amber_jax.plan.coverage import plan_coverage
from amber_jax.plan.schema import make_plan
from amber_jax.runs.coverage import coverage_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
NAMES = ("tiny-qwen3", "tiny-qwen3-moe")


@pytest.fixture(scope="module")
def moe():
  config, params = load_hf_checkpoint(FIXTURES / "tiny-qwen3-moe")
  golden = np.load(FIXTURES / "tiny-qwen3-moe" / "golden.npz")
  return config, params, jnp.asarray(golden["tokens"])


# ----------------------------------------------------------------------------------------------
# Against HF transformers.


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_goldens(name):
  config, params = load_hf_checkpoint(FIXTURES / name)
  golden = np.load(FIXTURES / name / "golden.npz")
  logits = np.asarray(forward(params, jnp.asarray(golden["tokens"]), config=config))
  diff = np.abs(logits - golden["logits"])
  print(f"{name}: max |logit diff| {diff.max():.2e}, mean {diff.mean():.2e}")
  assert diff.max() <= 1e-4, (diff.max(), diff.mean())
  assert config.qk_norm and (config.moe is not None) == (name == "tiny-qwen3-moe")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_with_the_cache_equals_the_full_forward(name):
  config, params = load_hf_checkpoint(FIXTURES / name)
  prompt = jnp.asarray(np.load(FIXTURES / name / "golden.npz")["tokens"][:, :6])
  cached = np.asarray(generate_greedy(params, prompt, config=config, max_new_tokens=5))
  tokens = prompt
  for _ in range(5):  # no cache: the whole sequence again for every token
    nxt = jnp.argmax(forward(params, tokens, config=config)[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(cached, np.asarray(tokens[:, 6:]))


# ----------------------------------------------------------------------------------------------
# The grouped experts against every expert computed densely.


def _moe_reference(x_NxD, router_DxE, w, moe_cfg):
  """numpy: every expert on every token, combined with the top-k softmax weights."""
  logits = x_NxD @ router_DxE
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1, kind="stable")[:, : moe_cfg.n_active]
  weights = np.take_along_axis(p, top, axis=-1)
  if moe_cfg.norm_topk_prob:
    weights /= weights.sum(-1, keepdims=True)
  out = np.zeros_like(x_NxD)
  for e in range(moe_cfg.n_experts):
    g = x_NxD @ w["gate"][e]
    h = g / (1 + np.exp(-g)) * (x_NxD @ w["up"][e])
    y = h @ w["down"][e]
    gain = np.where(top == e, weights, 0).sum(-1)
    out += gain[:, None] * y
  return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_grouped_experts_equal_every_expert_computed_densely(norm_topk_prob):
  rng = np.random.default_rng(0)
  moe_cfg = MixtureOfExperts(n_experts=6, n_active=2, d_ff=24, norm_topk_prob=norm_topk_prob)
  d, n = 16, 40
  x = rng.standard_normal((2, n // 2, d)).astype(np.float32)
  router = rng.standard_normal((d, 6)).astype(np.float32)
  w = {
    "gate": rng.standard_normal((6, d, 24)).astype(np.float32) / 4,
    "up": rng.standard_normal((6, d, 24)).astype(np.float32) / 4,
    "down": rng.standard_normal((6, 24, d)).astype(np.float32) / 5,
  }

  def lin(rows_x, name, rows):
    return site_linear(rows_x, {"w": jnp.asarray(w[name])}, None, LinearSpec(), rows)

  got = np.asarray(moe_mlp(jnp.asarray(x), jnp.asarray(router), moe_cfg, lin)).reshape(n, d)
  want = _moe_reference(x.reshape(n, d), router, w, moe_cfg)
  err = np.abs(got - want).max()
  print(f"grouped vs dense experts: max |diff| {err:.2e}")
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _rows(rng, n_experts, n_rows):
  sizes = rng.multinomial(n_rows, np.ones(n_experts) / n_experts).astype(np.int32)
  ids = np.repeat(np.arange(n_experts), sizes).astype(np.int32)
  return ExpertRows(jnp.asarray(sizes), jnp.asarray(ids)), ids


def test_expert_site_nm_uses_each_rows_expert_factors():
  rng = np.random.default_rng(1)
  e, d_in, d_out, r = 4, 32, 8, 30
  rows, ids = _rows(rng, e, r)
  x = rng.standard_normal((r, d_in)).astype(np.float32)
  w = rng.standard_normal((e, d_in, d_out)).astype(np.float32)
  factors = rng.uniform(0.2, 3.0, (e, d_in)).astype(np.float32)
  pattern = NMPattern.parse("2:4")
  row = {"enabled": jnp.asarray(True), "factors": jnp.asarray(factors)}
  got = site_linear(jnp.asarray(x), {"w": jnp.asarray(w)}, row, LinearSpec(pattern=pattern), rows)
  want = np.stack(
    [
      np.asarray(sparsify(jnp.asarray(x[i]), pattern, jnp.asarray(factors[ids[i]]))) @ w[ids[i]]
      for i in range(r)
    ]
  )
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  off = site_linear(
    jnp.asarray(x),
    {"w": jnp.asarray(w)},
    {**row, "enabled": jnp.asarray(False)},
    LinearSpec(pattern=pattern),
    rows,
  )
  dense = np.stack([x[i] @ w[ids[i]] for i in range(r)])
  np.testing.assert_allclose(np.asarray(off), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act_mode", ["token", "tensor"])
def test_expert_site_w8a8_equals_per_expert_int8_reference(act_mode):
  rng = np.random.default_rng(2)
  e, d_in, d_out, r = 3, 16, 8, 25
  rows, ids = _rows(rng, e, r)
  x = rng.standard_normal((r, d_in)).astype(np.float32)
  w = rng.standard_normal((e, d_in, d_out)).astype(np.float32)
  w_scale = np.abs(w).max(axis=1) / 127  # [E, d_out]
  w_q = np.clip(np.round(w / w_scale[:, None, :]), -127, 127).astype(np.int8)
  div = rng.uniform(0.5, 2.0, (e, d_in)).astype(np.float32)
  act_scale = rng.uniform(0.01, 0.03, (e,)).astype(np.float32)
  q = {
    "w_q": jnp.asarray(w_q),
    "w_scale": jnp.asarray(w_scale),
    "act_div": jnp.asarray(div),
    "fold": jnp.ones((e, d_in)),
    "act_scale": jnp.asarray(act_scale),
    "in_float": jnp.zeros((e,), bool),
    "act_absmax": jnp.ones((e, d_in)),
  }
  got = np.asarray(
    site_linear(
      jnp.asarray(x), {"w": jnp.asarray(w)}, {"quant": q}, LinearSpec(act_mode=act_mode), rows
    )
  )
  want = np.zeros((r, d_out), np.float32)
  for i in range(r):
    xs = x[i] / div[ids[i]]
    s = act_scale[ids[i]] if act_mode == "tensor" else max(np.abs(xs).max() / 127, 1e-30)
    xq = np.clip(np.round(xs / s), -127, 127).astype(np.int32)
    want[i] = (xq @ w_q[ids[i]].astype(np.int32)) * s * w_scale[ids[i]]
  err = np.abs(got - want).max()
  print(f"expert W8A8 ({act_mode}) vs numpy: max |diff| {err:.2e}")
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Plans on a MoE model.


def test_expert_sites_and_plan_shapes(moe):
  config, _, _ = moe
  sites = config.sites
  assert [s.name for s in sites if s.experts] == ["gate", "up", "down"]
  assert sites["gate"].experts == 8 and sites["gate"].active == 2
  plan = make_plan(config, "2:4")
  assert plan.factors["gate"].shape == (2, 8, 64) and plan.factors["q"].shape == (2, 64)
  assert plan.enabled["down"].shape == (2,)
  with pytest.raises(ValueError, match="channel orders of expert sites"):
    make_plan(config, "2:4", channel_order={"down": np.tile(np.arange(32), (2, 1))})


@pytest.mark.parametrize("policy", ["paper", "auto"])
def test_amber_plans_on_moe(moe, policy):
  config, params, tokens = moe
  calib = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
  amber = AmberConfig(pattern=NMPattern.parse("2:4"), score="robust", policy=policy, coverage=0.3)
  info = build_plan(params, config, amber, calib_windows=calib, show_progress=False)
  assert info.plan.factors["down"].shape == (2, 8, 32)
  # The per-expert factors differ between experts (each expert's own weight columns).
  assert not np.allclose(info.plan.factors["down"][0, 0], info.plan.factors["down"][0, 1])
  dense = forward(params, tokens, config=config)
  sparse = forward(params, tokens, config=config, plan=info.plan)
  assert np.isfinite(np.asarray(sparse)).all()
  assert float(jnp.abs(sparse - dense).max()) > 1e-3
  assert plan_coverage(config, info.plan).covered >= (0.5 if policy == "paper" else 0.3) - 1e-9


def test_corrections_are_refused_on_moe(moe):
  config, params, _ = moe
  calib = np.zeros((1, 8), np.int32) + 3
  amber = AmberConfig(pattern=NMPattern.parse("2:4"), policy="paper", correction="median+bias")
  with pytest.raises(ValueError, match="expert sites"):
    build_plan(params, config, amber, calib_windows=calib, show_progress=False)


def test_w8a8_plan_on_moe_saves_and_restores_bit_for_bit(moe, tmp_path):
  from amber_jax.calibrate.stats import collect_input_absmax, measure_quant_errors
  from amber_jax.plan.io import load_sparsity_plan, save_sparsity_plan
  from amber_jax.plan.quant_state import build_quant_state

  config, params, tokens = moe
  calib = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
  absmax = collect_input_absmax(params, calib, config=config, show_progress=False)
  state, _ = build_quant_state(params, config, absmax, float_sites=[(1, "down")])
  assert state.sites["down"]["w_q"].shape == (2, 8, 32, 64)
  assert state.sites["gate"]["act_div"].shape == (2, 8, 64)
  errors = measure_quant_errors(params, calib, state, config=config, show_progress=False)
  assert np.isfinite(errors).all() and (errors > 0).all() and errors.max() < 0.2, errors
  plan = make_plan(config, "2:4", sites=[(0, "down"), (1, "q")]).replace(quant=state)
  logits = forward(params, tokens, config=config, plan=plan)
  dense = forward(params, tokens, config=config)
  rel = float(jnp.linalg.norm(logits - dense) / jnp.linalg.norm(dense))
  assert 0 < rel < 0.5, rel
  save_sparsity_plan(tmp_path / "plan", plan, metadata={"model": "tiny-qwen3-moe"})
  restored, _ = load_sparsity_plan(tmp_path / "plan", config=config)
  np.testing.assert_array_equal(
    np.asarray(forward(params, tokens, config=config, plan=restored)), np.asarray(logits)
  )


# ----------------------------------------------------------------------------------------------
# HF configs and files as they are written.


def _copy(tmp_path, name="tiny-qwen3-moe"):
  out = tmp_path / name
  shutil.copytree(FIXTURES / name, out)
  return out


def _rewrite(path, fn):
  """Rewrites every tensor of a checkpoint directory through ``fn(tensors) -> tensors`` into
  one model.safetensors."""
  from safetensors.numpy import save_file

  from amber_jax.io.hf import read_safetensors

  tensors = {}
  for f in sorted(path.glob("*.safetensors")):
    tensors.update({k: np.array(v) for k, v in read_safetensors(f).items()})
    f.unlink()
  (path / "model.safetensors.index.json").unlink(missing_ok=True)
  save_file(fn(tensors), str(path / "model.safetensors"))


def test_stacked_expert_tensors_load_like_per_expert_ones(moe, tmp_path):
  _, params, _ = moe
  path = _copy(tmp_path)

  def stack(t):
    out = {k: v for k, v in t.items() if ".mlp.experts." not in k}
    for i in range(2):
      per = lambda n, i=i: np.stack(
        [t[f"model.layers.{i}.mlp.experts.{e}.{n}.weight"] for e in range(8)]
      )
      out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
        [per("gate_proj"), per("up_proj")], axis=1
      )
      out[f"model.layers.{i}.mlp.experts.down_proj"] = per("down_proj")
    return out

  _rewrite(path, stack)
  _, stacked = load_hf_checkpoint(path)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_bf16_files_load_as_bf16_or_float32(moe, tmp_path):
  _, params, _ = moe
  path = _copy(tmp_path)
  _rewrite(path, lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  _, as_bf16 = load_hf_checkpoint(path, dtype=ml_dtypes.bfloat16)
  _, as_f32 = load_hf_checkpoint(path)
  for a, b, ref in zip(*(jax.tree.leaves(t) for t in (as_bf16, as_f32, params)), strict=True):
    assert a.dtype == ml_dtypes.bfloat16 and b.dtype == np.float32
    np.testing.assert_array_equal(a.astype(np.float32), b)
    np.testing.assert_array_equal(b, np.asarray(ref).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_hub_and_transformers5_config_keys_agree():
  hub = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())  # num_experts, rope_theta
  t5 = {k: v for k, v in hub.items() if k not in ("num_experts", "rope_theta", "rope_scaling")}
  t5.update(num_local_experts=128, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
  assert config_from_hf(hub) == config_from_hf(t5) == PRESETS["qwen3-30b-a3b"]


def test_save_and_reload_a_moe_checkpoint(moe, tmp_path):
  config, params, tokens = moe
  save_hf_checkpoint(config, params, tmp_path / "out")
  config2, params2 = load_hf_checkpoint(tmp_path / "out")
  assert config2 == config
  np.testing.assert_array_equal(
    np.asarray(forward(params2, tokens, config=config2)),
    np.asarray(forward(params, tokens, config=config)),
  )


# ----------------------------------------------------------------------------------------------
# Bad input.


def _config_dict(**changes):
  d = json.loads((FIXTURES / "tiny-qwen3-moe" / "config.json").read_text())
  d.update(changes)
  return d


def test_unknown_model_type_lists_the_supported():
  with pytest.raises(UnsupportedArchitectureError, match="deepseek_v3.*qwen3_moe"):
    config_from_hf(_config_dict(model_type="deepseek_v3"))


def test_more_active_experts_than_experts_is_an_error():
  with pytest.raises(ModelFileError, match="num_experts_per_tok=9 must be in 1..num_experts=8"):
    config_from_hf(_config_dict(num_experts_per_tok=9))


def test_mixed_dense_and_moe_layers_are_refused():
  with pytest.raises(UnsupportedArchitectureError, match=r"layers \[1\] have a dense MLP"):
    config_from_hf(_config_dict(mlp_only_layers=[1]))
  with pytest.raises(UnsupportedArchitectureError, match=r"layers \[0\] have a dense MLP"):
    config_from_hf(_config_dict(decoder_sparse_step=2))


def test_missing_expert_tensor_is_named(tmp_path):
  path = _copy(tmp_path)
  _rewrite(
    path, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.experts.5.up_proj" not in k}
  )
  with pytest.raises(ModelFileError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj.*expert 5"):
    load_hf_checkpoint(path)


def test_head_dim_that_the_qk_norms_do_not_match(tmp_path):
  path = _copy(tmp_path, "tiny-qwen3")
  d = json.loads((path / "config.json").read_text())
  d["head_dim"] = 16  # the q/k norm weights have 32 entries
  (path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ModelFileError, match="q_norm.weight.*head_dim"):
    load_hf_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# The paper's coverage of its three models, and the presets.


@pytest.mark.parametrize(
  "name, skip, paper",
  [
    ("llama-3.1-8b", (19, 21, 28, 30, 31), 56.1),
    ("qwen2-7b", (0, 6, 23, 26, 27), 57.6),
    ("qwen3-30b-a3b", (41, 46, 47), 56.9),
  ],
)
def test_coverage_of_the_papers_models(name, skip, paper):
  config = config_from_hf(json.loads((CONFIGS / f"{name}.json").read_text()))
  assert config == PRESETS[name]
  report = coverage_report(config, model=name, policy="paper", skip_layers=skip)
  assert round(100 * report.coverage, 1) == paper, report.coverage
  assert report.removed == pytest.approx(report.coverage / 2)


def test_coverage_experiment_writes_json(tmp_path):
  out = tmp_path / "cov.json"
  cmd = [
    sys.executable,
    str(ROOT / "experiments" / "coverage.py"),
    f"--model={CONFIGS / 'qwen3-30b-a3b.json'}",
    "--skip_layers=41,46,47",
    f"--output={out}",
  ]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "coverage 56.9%" in run.stdout
  assert round(json.loads(out.read_text())["coverage"], 3) == 0.569
  bad = subprocess.run(cmd[:2] + ["--model=qwen3-30b-a3b", "--policy=auto"], capture_output=True)
  assert bad.returncode != 0


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-30b-a3b"])
def test_random_presets_have_the_loaders_layout(name):
  config = PRESETS[name]
  small = LlamaConfig(
    **{
      **{f: getattr(config, f) for f in ("qk_norm", "architecture", "rope_theta", "norm_eps")},
      "vocab_size": 64,
      "d_model": 32,
      "n_layers": 2,
      "n_heads": 4,
      "n_kv_heads": 2,
      "head_dim": 8,
      "d_ff": 48,
      "moe": None if config.moe is None else MixtureOfExperts(n_experts=4, n_active=2, d_ff=16),
    }
  )
  params = init_random_params(small, jax.random.key(0), dtype=jnp.float32)
  logits = forward(params, jnp.zeros((1, 5), jnp.int32), config=small)
  assert logits.shape == (1, 5, 64) and np.isfinite(np.asarray(logits)).all()


def test_every_expert_dispatch_equals_the_grouped_one(moe):
  import dataclasses

  config, params, tokens = moe
  every = dataclasses.replace(config, moe=dataclasses.replace(config.moe, dispatch="every"))
  np.testing.assert_allclose(
    np.asarray(forward(params, tokens, config=every)),
    np.asarray(forward(params, tokens, config=config)),
    atol=2e-5,
  )


@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0, 25, 0], [1, 1, 1, 22]])
def test_grouped_dot_equals_ragged_dot(sizes):
  from amber_jax.core.linear import grouped_dot

  rng = np.random.default_rng(3)
  r, e = sum(sizes), len(sizes)
  x = jnp.asarray(rng.standard_normal((r, 24)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((e, 24, 10)), jnp.float32)
  g = jnp.asarray(sizes, jnp.int32)
  got, want = grouped_dot(x, w, g), jax.lax.ragged_dot(x, w, g)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  xi = jnp.asarray(rng.integers(-127, 128, (r, 24)), jnp.int8)
  wi = jnp.asarray(rng.integers(-127, 128, (e, 24, 10)), jnp.int8)
  np.testing.assert_array_equal(
    np.asarray(grouped_dot(xi, wi, g, preferred_element_type=jnp.int32)),
    np.asarray(jax.lax.ragged_dot(xi, wi, g, preferred_element_type=jnp.int32)),
  )
