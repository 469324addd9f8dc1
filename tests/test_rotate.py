"""Rotations (amber_jax.rotate, amber_jax.core.hadamard): Hadamard matrices and the fast
transform against the dense product, strided layouts, and the dense model unchanged by every
folded rotation (float32 logits within 1e-4) on every architecture variant."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_CONFIG, random_params

from amber_jax.core.hadamard import (
  hadamard_factors,
  hadamard_matrix,
  hadamard_reference,
  hadamard_transform,
)
from amber_jax.core.scores import model_factors
from amber_jax.io.hf import config_to_hf
from amber_jax.model.config import LlamaConfig, MixtureOfExperts
from amber_jax.model.llama import forward
from amber_jax.model.presets import init_random_params
from amber_jax.plan.schema import make_plan
from amber_jax.rotate import Rotation, rotate_model
from amber_jax.rotate.bases import collect_rotation_stats, pca_basis, strided_order
from amber_jax.rotate.fold import fold_norms, norms_folded
from amber_jax.rotate.orthogonal import (
  check_orthogonal,
  hadamard_mlp_hidden,
  permute_mlp_hidden,
  rotate_heads,
  rotate_residual,
)

# Widths of the models we target: SmolLM2 (576, 1536), Llama-3.1-8B's d_ff (14336 = 28 x 512,
# checked by its factors only: the matrix is 1.6 GB), Qwen3-30B-A3B's expert width (768).
ORDERS = (1, 2, 4, 12, 20, 28, 36, 64, 72, 148, 576, 768, 1536)


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrices_are_hadamard(n):
  h = hadamard_matrix(n)
  assert set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_hadamard_factors_of_model_widths_and_refusals():
  assert hadamard_factors(14336) == (28, 512)
  assert hadamard_factors(18944) == (148, 128)  # Qwen2-7B's d_ff
  assert hadamard_factors(4096) == (1, 4096)
  for bad in (6, 0, -4):
    with pytest.raises(ValueError, match="Hadamard"):
      hadamard_factors(bad)


@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_fast_transform_matches_the_dense_product(n, dtype, tol):
  x = jnp.asarray(np.random.default_rng(n).normal(size=(3, 5, n)) * 3, dtype)
  fast = np.asarray(hadamard_transform(x), np.float32)
  ref = np.asarray(hadamard_reference(x), np.float32)
  err = np.abs(fast - ref).max() / np.abs(ref).max()
  print(f"n={n} {jnp.dtype(dtype).name}: max relative error {err:.1e}")
  assert err <= tol
  # Orthonormal: norms kept, and applying H^T undoes it.
  np.testing.assert_allclose(
    np.linalg.norm(fast, axis=-1), np.linalg.norm(np.asarray(x, np.float32), axis=-1), rtol=tol
  )


def test_strided_order_puts_one_channel_of_each_tier_in_every_group():
  rng = np.random.default_rng(0)
  energy = rng.random((3, 32))
  order = strided_order(energy, 4)
  assert np.array_equal(np.sort(order, axis=-1), np.broadcast_to(np.arange(32), (3, 32)))
  rank = np.argsort(np.argsort(-energy, axis=-1), axis=-1)  # channel -> its rank
  tiers = np.take_along_axis(rank, order, axis=-1) // 8  # 4 tiers of G = 8 channels
  np.testing.assert_array_equal(tiers.reshape(3, 8, 4), np.broadcast_to(np.arange(4), (3, 8, 4)))
  with pytest.raises(ValueError, match="m=5 must divide"):
    strided_order(energy, 5)


def test_pca_basis_is_orthogonal_and_diagonalises():
  a = np.random.default_rng(1).normal(size=(200, 16)) * np.arange(1, 17)
  cov = a.T @ a / len(a)
  q = pca_basis(cov, 4)
  check_orthogonal(q, 16, arg="q", atol=1e-10)
  d = q.T @ cov @ q
  assert np.abs(d - np.diag(np.diag(d))).max() < 1e-8 * np.abs(d).max()
  # Strided: the 4 largest eigenvalues open the 4 groups.
  top = np.sort(np.diag(d))[::-1][:4]
  np.testing.assert_allclose(np.diag(d)[::4], top)


def _with_random_norms(params, seed=0):
  rng = np.random.default_rng(seed)
  layers = dict(params["layers"])
  for name in ("attn_norm", "mlp_norm"):
    layers[name] = jnp.asarray(1 + 0.5 * rng.normal(size=layers[name].shape), jnp.float32)
  final = jnp.asarray(1 + 0.5 * rng.normal(size=params["final_norm"].shape), jnp.float32)
  return {**params, "layers": layers, "final_norm": final}


TIED = dataclasses.replace(SMALL_CONFIG, tie_embeddings=True, qkv_bias=False)
QWEN3 = dataclasses.replace(SMALL_CONFIG, qk_norm=True, qkv_bias=False)
MOE = dataclasses.replace(
  SMALL_CONFIG, qkv_bias=False, moe=MixtureOfExperts(n_experts=4, n_active=2, d_ff=32)
)
VARIANTS = {"qwen2_bias": SMALL_CONFIG, "tied": TIED, "qwen3": QWEN3, "moe": MOE}


def _params(config: LlamaConfig):
  if config is SMALL_CONFIG:
    return jax.tree.map(jnp.asarray, random_params(config, np.random.default_rng(0)))
  p = init_random_params(config, jax.random.PRNGKey(0), jnp.float32)
  p = jax.tree.map(lambda a: a * 10 if a.ndim >= 3 else a, p)  # less flat than an init
  for name in ("embed", "lm_head"):
    if name in p:
      p[name] = p[name] * 50
  if config.qk_norm:
    p["layers"]["q_norm"] = p["layers"]["q_norm"] * 1.5
  return _with_random_norms(p)


ROTATIONS = (
  "res_fold",
  "res_pca",
  "res_balance",
  "res_hadamard",
  "res_random",
  "head_pca",
  "head_hadamard",
  "head_random",
  "down_balance",
  "down_hadamard",
  "res_pca+head_pca+down_balance",
  "res_hadamard+head_hadamard+down_hadamard",
)


# Every rotation on the biased, untied model and the tied one; the combined ones on Qwen3's
# per-head norms and on a mixture of experts (whose hidden channels are refused, tested below).
CASES = [(v, r) for v in ("qwen2_bias", "tied") for r in ROTATIONS] + [
  ("qwen3", "res_pca+head_pca+down_balance"),
  ("qwen3", "res_hadamard+head_hadamard+down_hadamard"),
  ("moe", "res_pca+head_pca"),
  ("moe", "res_hadamard+head_random"),
]


@pytest.mark.parametrize("variant,rotation", CASES)
def test_every_rotation_keeps_the_dense_model(variant, rotation):
  config = VARIANTS[variant]
  params = _params(config)
  rng = np.random.default_rng(3)
  windows = rng.integers(0, config.vocab_size, size=(2, 17))
  tokens = windows[:, :16]
  rotated = rotate_model(
    params, config, rotation, m=4, calib_windows=windows, check_tokens=tokens, show_progress=False
  )
  scale = float(jnp.abs(forward(params, jnp.asarray(tokens), config=config)).max())
  print(
    f"{variant} {rotation}: max |dlogit| {rotated.dense_logit_gap:.1e} (logits up to {scale:.1f})"
  )
  assert scale > 1.0  # the check is not on a flat model
  assert rotated.dense_logit_gap <= 1e-4 and rotated.dense_logit_gap_f64 <= 1e-4
  before = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  after = dict(jax.tree_util.tree_flatten_with_path(rotated.params)[0])
  changed = [k for k in after if k not in before or not np.array_equal(before[k], after[k])]
  assert changed  # something was rotated


def test_folding_then_rotation_changes_what_the_groups_see():
  """A rotated model's sparse output differs from the plain one: the groups see other channels
  (its dense output is the same, ``test_every_rotation_keeps_the_dense_model``)."""
  config = SMALL_CONFIG
  params = _params(config)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, size=(2, 16)))
  rotated = rotate_model(params, config, "res_hadamard", m=4)

  def sparse_logits(p, c):
    plan = make_plan(c, "2:4", factors=model_factors(p, "weight"))
    return forward(p, tokens, config=c, plan=plan)

  gap = float(
    jnp.abs(sparse_logits(params, config) - sparse_logits(rotated.params, rotated.config)).max()
  )
  assert gap > 1e-2


def test_fold_norms_unties_the_head_and_sets_unit_norms():
  params = _params(TIED)
  folded, config = fold_norms(params, TIED)
  assert not config.tie_embeddings and "lm_head" in folded
  assert norms_folded(folded) and not norms_folded(params)
  tokens = jnp.asarray(np.arange(16)[None] % TIED.vocab_size)
  np.testing.assert_allclose(
    forward(folded, tokens, config=config), forward(params, tokens, config=TIED), atol=1e-4
  )


def test_rotation_stats_are_second_moments_of_the_normed_stream():
  config = TIED
  folded, fconfig = fold_norms(_params(config), config)
  windows = np.random.default_rng(5).integers(0, config.vocab_size, size=(3, 16))
  stats = collect_rotation_stats(folded, windows, config=fconfig, batch_size=2, show_progress=False)
  # Every normed (weightless) token has mean square 1 (up to eps): trace = d_model.
  np.testing.assert_allclose(np.trace(stats.residual_cov), config.d_model, rtol=1e-3)
  assert stats.tokens == windows.size
  for cov in stats.head_cov.reshape(-1, config.head_dim, config.head_dim):
    assert np.linalg.eigvalsh(cov).min() > -1e-6
  assert stats.hidden_energy.shape == (config.n_layers, config.d_ff)
  assert np.all(stats.hidden_energy > 0)


def test_rotation_names_round_trip_and_bad_names_are_refused():
  r = Rotation.parse("res_pca+head_hadamard+down_balance")
  assert (r.residual, r.heads, r.hidden) == ("pca", "hadamard", "balance")
  assert Rotation.parse(r.name) == r and r.calibrated and r.inference_cost == "none"
  assert Rotation.parse("none").is_identity
  assert Rotation.parse("down_hadamard").inference_cost != "none"
  for bad, match in [
    ("", "non-empty"),
    ("pca", "<place>_<basis>"),
    ("res_pca+res_random", "twice"),
    ("head_balance", "head_ takes"),
    ("res_none", "res_ takes"),
    ("mlp_pca", "place one of"),
  ]:
    with pytest.raises(ValueError, match=match):
      Rotation.parse(bad)
  with pytest.raises(ValueError, match="residual"):
    Rotation(residual="svd")


def test_bad_rotation_inputs_are_refused_before_work():
  config = SMALL_CONFIG
  params = _params(config)
  with pytest.raises(ValueError, match="fold_norms first"):
    rotate_residual(params, config, np.eye(config.d_model))
  folded, fconfig = fold_norms(params, config)
  with pytest.raises(ValueError, match="not orthogonal"):
    rotate_residual(folded, fconfig, 2 * np.eye(config.d_model))
  with pytest.raises(ValueError, match=r"\[\.\.\., 64, 64\]"):
    rotate_residual(folded, fconfig, np.eye(8))
  with pytest.raises(ValueError, match="n_kv_heads=2"):
    rotate_heads(params, config, np.broadcast_to(np.eye(16), (2, 3, 16, 16)))
  with pytest.raises(ValueError, match="permutation"):
    permute_mlp_hidden(params, config, np.zeros((2, config.d_ff), int))
  with pytest.raises(ValueError, match=r"\+-1"):
    hadamard_mlp_hidden(params, config, np.zeros((2, config.d_ff)))
  with pytest.raises(ValueError, match="give calib_windows"):
    rotate_model(params, config, "res_pca", m=4)
  with pytest.raises(ValueError, match="not a multiple of the group size M=48"):
    rotate_model(params, config, "res_pca", m=48, calib_windows=np.zeros((1, 8), int))
  with pytest.raises(ValueError, match="mixture-of-experts"):
    rotate_model(_params(MOE), MOE, "down_balance", m=4, calib_windows=np.zeros((1, 8), int))
  with pytest.raises(ValueError, match="mixture of experts"):
    dataclasses.replace(MOE, mlp_hidden_hadamard=True)
  _, hconfig = hadamard_mlp_hidden(params, config, np.ones((2, config.d_ff)))
  with pytest.raises(ValueError, match="mlp_hidden_hadamard"):
    config_to_hf(hconfig)
  with pytest.raises(ValueError, match="already rotated"):
    hadamard_mlp_hidden(params, hconfig, np.ones((2, config.d_ff)))


def test_quant_table_runs_every_row_on_each_rotated_model(tmp_path):
  from amber_jax.runs.quant_table import QuantTableConfig, quant_table_markdown, run_quant_table

  text = tmp_path / "main.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(300)), encoding="utf-8")
  cfg = QuantTableConfig(
    model=str(pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"),
    text=str(text),
    patterns=("2:4",),
    rotations=("none", "res_pca+head_pca"),
    seq_len=32,
    num_windows=2,
    calib_windows=2,
    batch_size=2,
    cache_dir=str(tmp_path / "cache"),
  )
  result = run_quant_table(cfg, log=lambda *a: None, show_progress=False)
  rows = result["rows"]
  plain = [r for r in rows if "rotation" not in r]
  rotated = [r for r in rows if r.get("rotation") == "res_pca+head_pca"]
  assert len(plain) == 6 and len(rotated) == 5  # the dense row only once
  assert all(r["method"].endswith("[res_pca+head_pca M=4]") for r in rotated)
  assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows)
  markdown = quant_table_markdown(result, "python experiments/quant_table.py")
  assert "Outstanding-sparse 2:4 (sparsify first) [res_pca+head_pca M=4]" in markdown
  with pytest.raises(ValueError, match="name one rotation twice"):
    QuantTableConfig(rotations=("res_pca", "res_pca"), cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="res_ takes"):
    QuantTableConfig(rotations=("res_x",), cache_dir=str(tmp_path))


def test_hadamard_bench_times_every_variant():
  from amber_jax.bench.hadamard_bench import run_hadamard_bench

  b = run_hadamard_bench(tokens=8, d_ff=24, d_model=16, repeats=2)
  assert set(b.ms) == {"down", "hadamard", "hadamard_dense", "hadamard_down"}
  assert all(v > 0 for v in b.ms.values()) and b.ratios()["down"] == 1.0
  assert b.transform_ops_per_row == 24 * (12 + 1) and b.down_macs_per_row == 24 * 16
  with pytest.raises(ValueError, match="Hadamard"):
    run_hadamard_bench(tokens=8, d_ff=6, d_model=16)


def test_learned_rotation_is_orthogonal_and_lowers_the_kl():
  from amber_jax.calibrate.learned_factors import dense_teacher, ste_kl
  from amber_jax.rotate.learned import cayley, learn_residual_rotation, with_learned_rotation

  a = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)) * 0.3, jnp.float32)
  check_orthogonal(np.asarray(cayley(a)), 8, arg="cayley", atol=1e-5)
  np.testing.assert_allclose(np.asarray(cayley(jnp.zeros((8, 8)))), np.eye(8), atol=1e-7)

  config = SMALL_CONFIG
  params = _params(config)
  windows = np.random.default_rng(6).integers(0, config.vocab_size, size=(4, 17))
  base = rotate_model(params, config, "res_fold", m=4)
  plan = make_plan(base.config, "2:4", factors=model_factors(base.params, "robust"))
  learned = learn_residual_rotation(
    base.params, base.config, plan, windows, steps=6, learning_rate=0.02, show_progress=False
  )
  check_orthogonal(learned.q, config.d_model, arg="learned q", atol=1e-10)
  print(f"learned rotation: KL {learned.initial_kl:.4f} -> {learned.final_kl:.4f}")
  assert len(learned.losses) == 6 and learned.final_kl < 0.97 * learned.initial_kl
  rotation = Rotation.parse("res_fold+learn6")
  rm, record = with_learned_rotation(
    base,
    rotation,
    plan,
    windows,
    original=(params, config),
    check_tokens=windows[:, :16],
    learning_rate=0.02,
    show_progress=False,
  )
  assert rm.rotation == rotation and rm.dense_logit_gap_f64 <= 1e-4
  np.testing.assert_allclose(record.q, learned.q, atol=1e-6)  # the same seed, the same steps
  # The learned Q, folded into the weights, gives the KL the training measured in the graph.
  tokens = jnp.asarray(windows[:, :16])
  teacher = dense_teacher(params, tokens, config=config)
  folded_kl = float(ste_kl(rm.params, tokens, teacher, plan, config=rm.config))
  assert abs(folded_kl - learned.final_kl) <= 1e-3 * learned.final_kl + 1e-6
  with pytest.raises(ValueError, match="needs a plan"):
    rotate_model(params, config, rotation, m=4)
  with pytest.raises(ValueError, match="base is rotated by res_fold, not res_pca"):
    with_learned_rotation(base, Rotation.parse("res_pca+learn2"), plan, windows)
  with pytest.raises(ValueError, match="residual basis to start from"):
    Rotation.parse("head_pca+learn2")
  with pytest.raises(ValueError, match="learn<N> with N >= 1"):
    Rotation.parse("res_pca+learn0")
  assert Rotation.parse("res_pca+learn8").name == "res_pca+learn8"


def test_rotation_costs_runner_measures_every_projection(tmp_path):
  from amber_jax.runs.rotation_costs import (
    RotationCostsConfig,
    rotation_costs_markdown,
    run_rotation_costs,
  )

  text = tmp_path / "main.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(300)), encoding="utf-8")
  other = tmp_path / "other.txt"
  other.write_text(" ".join(f"other {i} words here" for i in range(300)), encoding="utf-8")
  cfg = RotationCostsConfig(
    model=str(pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"),
    text=str(text),
    patterns=("2:4",),
    rotations=("none", "res_pca", "down_hadamard"),
    transfer_text=str(other),
    seq_len=32,
    num_windows=2,
    calib_windows=2,
    search_windows=1,
    batch_size=2,
    cache_dir=str(tmp_path / "cache"),
  )
  result = run_rotation_costs(cfg, log=lambda *a: None, show_progress=False)
  rows = {r["rotation"]: r for r in result["rows"]}
  assert all(list(r["kl"]) == [str(text), str(other)] for r in rows.values())
  assert set(rows) == {"none", "res_pca", "down_hadamard"}
  for r in rows.values():
    kl = r["kl"][str(text)]
    assert list(kl) == ["q", "k", "v", "o", "o mixed", "gate", "up", "down"]
    assert all(v > 0 for v in kl.values())
    assert r["dense_logit_gap_f64"] <= 1e-4
  kl = {name: r["kl"][str(text)] for name, r in rows.items()}
  # A residual rotation leaves o and down's inputs alone; down_hadamard changes only down's.
  assert kl["res_pca"]["q"] != kl["none"]["q"]
  assert kl["down_hadamard"]["down"] != kl["none"]["down"]
  np.testing.assert_allclose(kl["down_hadamard"]["q"], kl["none"]["q"], rtol=1e-3)
  assert rows["down_hadamard"]["inference_cost"] != "none"
  markdown = rotation_costs_markdown(result, "python experiments/rotation_costs.py")
  assert "| res_pca |" in markdown and f"**2:4, {other}**" in markdown and "x |" in markdown
  with pytest.raises(ValueError, match="need a plan"):
    RotationCostsConfig(rotations=("res_pca+learn2",), cache_dir=str(tmp_path))
