"""Sharding: meshes, partition specs, and sharded evaluation equal to one device.

The sharded checks need 8 devices, and XLA_FLAGS must be set before JAX starts, so they run in a
subprocess: this file run as a script (``python tests/test_sharding.py tiny|real [cache_dir]``)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and ``JAX_PLATFORMS=cpu``. The script
computes every comparison (single device vs sharded, same process) and prints one JSON line;
the tests below assert on it. Errors that need no devices are checked in this process.

Runtime on 2 shared CPU cores: about 50 s for the tiny model (mostly compiling some 25
programs, 1-3 s each with 8 devices), about 20 s for the real-model check (loading included).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_DEVICES = 8


def _run_script(*args: str, timeout: int = 300) -> dict:
  env = {
    **os.environ,
    # Flags already set (e.g. --xla_cpu_max_isa=AVX2 to round as another CPU does) are kept.
    "XLA_FLAGS": " ".join(
      f
      for f in (os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={N_DEVICES}")
      if f
    ),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
  }
  proc = subprocess.run(
    [sys.executable, __file__, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )
  if proc.returncode:
    pytest.fail(f"sharding script {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny() -> dict:
  out = _run_script("tiny")
  print("\nsharded vs single device (max abs differences):")
  for name, value in out["diffs"].items():
    print(f"  {name}: {value}")
  return out


# ------------------------------------------------------------------------------------------------
# In-process: spec rules and errors that need no devices.


def test_param_specs_are_megatron_layout():
  from jax.sharding import PartitionSpec as P

  from amber_jax.model import LlamaConfig
  from amber_jax.plan.sharding import param_specs

  sites = LlamaConfig(
    vocab_size=8, d_model=4, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=4
  ).sites
  params = {
    "embed": np.zeros((8, 4)),
    "lm_head": np.zeros((4, 8)),
    "final_norm": np.zeros(4),
    "layers": {
      "attn_norm": np.zeros((2, 4)),
      "mlp_norm": np.zeros((2, 4)),
      **{p: {"w": np.zeros((2, 4, 4))} for p in ("q", "k", "v", "o", "gate", "up", "down")},
      "q": {"w": np.zeros((2, 4, 4)), "b": np.zeros((2, 4))},
    },
  }
  specs = param_specs(params, sites=sites)
  assert specs["layers"]["q"]["w"] == P(None, None, "model")  # column parallel: heads
  assert specs["layers"]["q"]["b"] == P(None, "model")
  assert specs["layers"]["gate"]["w"] == P(None, None, "model")
  assert specs["layers"]["o"]["w"] == P(None, "model", None)  # row parallel: its input
  assert specs["layers"]["down"]["w"] == P(None, "model", None)
  assert specs["embed"] == P("model", None) and specs["lm_head"] == P(None, "model")
  assert specs["layers"]["attn_norm"] == P() and specs["final_norm"] == P()
  fsdp = param_specs(params, sites=sites, fsdp=True, vocab_parallel=False)
  assert fsdp["layers"]["up"]["w"] == P(None, "data", "model")
  assert fsdp["layers"]["down"]["w"] == P(None, "model", "data")
  assert fsdp["embed"] == P() and fsdp["lm_head"] == P()


def test_plan_specs_follow_the_weights():
  from conftest import TINY_V64_CONFIG
  from jax.sharding import PartitionSpec as P

  from amber_jax.plan.schema import make_plan
  from amber_jax.plan.sharding import plan_specs

  cfg = TINY_V64_CONFIG
  specs = plan_specs(make_plan(cfg, "8:16"), sites=cfg.sites)
  assert specs.enabled["o"] == P()
  assert specs.factors["o"] == P(None, "model") and specs.factors["down"] == P(None, "model")
  assert specs.factors["q"] == P() and specs.factors["gate"] == P()  # inputs replicated
  # The same rules by leaf path for the W8A8 state and output corrections (dicts stand in).
  q = {"w_q": 0, "w_scale": 0, "act_div": 0, "fold": 0, "act_scale": 0, "in_float": 0}
  c = {"center": 0, "in_scale": 0, "token_rescale": 0, "out_scale": 0, "out_bias": 0}
  tree = {"quant": {"sites": {"o": q, "up": q}, "norms": {"attn_norm": 0}}, "correction": {"o": c}}
  specs = plan_specs(tree, sites=cfg.sites, fsdp=True)
  assert specs["quant"]["sites"]["o"]["w_q"] == P(None, "model", "data")
  assert specs["quant"]["sites"]["up"]["w_q"] == P(None, "data", "model")
  assert specs["quant"]["sites"]["o"]["w_scale"] == P()
  assert specs["quant"]["sites"]["up"]["w_scale"] == P(None, "model")
  assert specs["quant"]["sites"]["o"]["act_div"] == P(None, "model")
  assert specs["quant"]["sites"]["up"]["act_div"] == P()
  assert specs["quant"]["norms"]["attn_norm"] == P()
  assert specs["correction"]["o"]["center"] == P(None, "model")
  assert specs["correction"]["o"]["out_bias"] == P()
  assert specs["correction"]["o"]["token_rescale"] == P()
  with pytest.raises(ValueError, match="no partition rule for plan leaf 'quant/sites/o/extra'"):
    plan_specs({"quant": {"sites": {"o": {"extra": 0}}}}, sites=cfg.sites)
  from amber_jax.plan.channel_order import model_channel_order

  mixed = make_plan(cfg, "8:16", channel_order=model_channel_order(cfg, "mixed"))
  assert (
    plan_specs(mixed, sites=cfg.sites).channel_order["o"] == P()
  )  # a permutation of the whole input


def test_unknown_params_leaf_is_a_clear_error():
  from amber_jax.model.presets import preset
  from amber_jax.plan.sharding import param_specs

  with pytest.raises(ValueError, match="no partition rule for params leaf 'layers/q/scale'"):
    param_specs({"layers": {"q": {"scale": np.zeros(3)}}}, sites=preset("smollm2-135m").sites)


def test_mesh_size_must_match_device_count():
  import jax

  from amber_jax.plan.sharding import make_mesh

  n = len(jax.devices())
  with pytest.raises(ValueError, match=rf"data=3 x model=3 needs 9 devices, but devices has {n}"):
    make_mesh(data=3, model=3)
  with pytest.raises(ValueError, match="model must be a positive integer"):
    make_mesh(data=1, model=0)


@pytest.mark.parametrize(
  ("sizes", "kwargs", "message"),
  [
    ((1, 2), {}, r"model=2 \(mesh axis 'model'\) must divide the model's n_heads=9"),
    ((1, 9), {}, r"model=9 .* must divide the model's n_kv_heads=3; valid model sizes: \[1, 3\]"),
    ((2, 3), {"batch_size": 3}, r"data=2 \(mesh axis 'data'\) must divide the batch: batch_size=3"),
    ((5, 3), {"fsdp": True}, r"data=5 .* must divide d_model=576 with fsdp=True"),
  ],
)
def test_mesh_must_divide_heads_ffn_and_batch(sizes, kwargs, message):
  from jax.sharding import AbstractMesh

  from amber_jax.model.presets import PRESETS
  from amber_jax.plan.sharding import check_mesh

  # SmolLM2-135M: 9 query heads, 3 KV heads, FFN 1536, d_model 576.
  with pytest.raises(ValueError, match=message):
    check_mesh(AbstractMesh(sizes, ("data", "model")), config=PRESETS["smollm2-135m"], **kwargs)
  check_mesh(AbstractMesh((2, 3), ("data", "model")), config=PRESETS["smollm2-135m"], batch_size=4)


# ------------------------------------------------------------------------------------------------
# Subprocess with 8 host devices: the tiny model.

# Tolerances: float all-reduces of o/down reorder partial sums (float32 rounding, ~1e-6 relative);
# int8 dots accumulate in int32, so W8A8 differs only where a float rounding moves a value across
# a quantization step. Logits reach about 30.
LOGIT_TOL = 1e-3
# Plans run through the public perplexity() / score_requests() and with FSDP as well (every
# plan runs through prefill and window_nll): each 8-device compile costs seconds on 2 cores.
PUBLIC_API_PLANS = ("dense", "w8a8 + 8:16")
FSDP_PLANS = ("dense", "w8a8 + 8:16")


ALL_PLANS = ["dense", "8:16 naive", "8:16 factors", "w8a8", "w8a8 + 8:16"]


@pytest.mark.parametrize("plan", ALL_PLANS)
def test_sharded_prefill_equals_single_device(tiny, plan):
  d = tiny["diffs"]
  if plan == "dense":
    assert d["prefill dense: logits"] < LOGIT_TOL
    assert d["prefill dense: kv cache"] < LOGIT_TOL
    assert d["prefill dense fsdp: logits"] < LOGIT_TOL
    return
  # N:M masks and int8 codes are discontinuous: a score within float rounding of the N-th
  # largest (an activation within rounding of a code boundary) selects (rounds) differently
  # when another program rounds differently, and that row then diverges. The sharded program
  # reorders the o/down partial sums, and XLA compiles every program its own way: on the real
  # model, W8A8 logits of one device differ by up to ~3 between jit(prefill) and jit(forward).
  # Here one row of "8:16 naive" differed (logits off by ~1) on the machine that wrote this; on
  # an AMD EPYC none differs with XLA's CPU code at its default or capped at AVX2, and capped at
  # SSE4.2 one row of "w8a8 + 8:16" with FSDP. So at most one row may differ, and the others
  # must agree ...
  assert d[f"prefill {plan}: rows whose logits differ"] <= 1
  assert d[f"prefill {plan}: logits, other rows"] < LOGIT_TOL
  if d[f"prefill {plan}: rows whose logits differ"] == 0:
    assert d[f"prefill {plan}: kv cache"] < LOGIT_TOL
  if plan in FSDP_PLANS:
    assert d[f"prefill {plan} fsdp: rows whose logits differ"] <= 1
    assert d[f"prefill {plan} fsdp: logits, other rows"] < LOGIT_TOL
  # ... and in the same model with every site's input recorded, every row whose masks differ
  # at all first differs on a near-tie (N-th and (N+1)-th score within 1e-5 relative), and the
  # rows without a flip agree everywhere (hidden states and every site's input).
  # (Recorded only where the prefill differed: each compile of the 8-device program costs
  # seconds on 2 cores.)
  if plan in tiny["flips"]:
    flips = tiny["flips"][plan]
    assert flips["largest first-flip gap"] < 1e-5, flips
    assert len(flips["rows with flips"]) <= 1, flips
    assert d[f"recorded {plan}: hidden and site inputs, rows without mask flips"] < LOGIT_TOL


@pytest.mark.parametrize("plan", ALL_PLANS)
def test_sharded_perplexity_equals_single_device(tiny, plan):
  d = tiny["diffs"]
  # window_nll (perplexity's jitted core) with the batch split over "data", row by row (at most
  # one row may differ by a mask flip, as above); and perplexity() itself with sharded params
  # and plan (its numpy batches are replicated over "data").
  if plan == "dense":
    assert d["window_nll dense sharded batch: relative"] < 1e-5
    assert d["perplexity dense: relative"] < 1e-5
    return
  assert d[f"window_nll {plan} sharded batch: relative, other rows"] < 1e-5
  if plan in PUBLIC_API_PLANS:  # 6 windows in 2 batches: a flip moves the total, not much
    assert d[f"perplexity {plan}: relative"] < 1e-2


@pytest.mark.parametrize("plan", PUBLIC_API_PLANS)
def test_sharded_multiple_choice_equals_single_device(tiny, plan):
  d = tiny["diffs"]
  # score_requests() with sharded params and plan (vocab-parallel LM head: the argmax and the
  # log-softmax reduce across the "model" devices). 6 requests in 5 rows (two choices share
  # one); with a discontinuous plan one row (two requests) may differ by a flip, as above.
  if plan == "dense":
    assert d["score_requests dense: loglik"] < 1e-4
    assert d["score_requests dense: greedy equal"] == 1.0
  else:
    assert d[f"score_requests {plan}: requests whose loglik differs"] <= 2


def test_placed_params_and_plan_are_really_sharded(tiny):
  s = tiny["specs"]
  # Specs read back from x.sharding.spec of the placed arrays, and the shape of one shard.
  assert s["params/layers/q/w"] == ["None", "None", "model"]
  assert s["params/layers/o/w"] == ["None", "model", "None"]
  assert s["params/layers/down/w"] == ["None", "model", "None"]
  assert s["params/embed"] == ["model", "None"]
  assert s["params/layers/attn_norm"] == []
  assert s["plan/factors/o"] == ["None", "model"]
  assert s["plan/factors/q"] == []
  assert s["plan/quant/sites/up/w_q"] == ["None", "None", "model"]
  assert s["plan/quant/sites/up/w_scale"] == ["None", "model"]
  assert s["plan/quant/sites/down/act_div"] == ["None", "model"]
  assert s["fsdp params/layers/gate/w"] == ["None", "data", "model"]
  shards = tiny["shard_shapes"]  # tiny: L=2, D=64, q_dim=128, F=128, V=448; mesh data 2 x model 4
  assert shards["params/layers/q/w"] == [2, 64, 32]
  assert shards["params/layers/down/w"] == [2, 32, 64]
  assert shards["params/embed"] == [112, 64]
  assert shards["plan/quant/sites/o/w_q"] == [2, 32, 64]
  assert shards["fsdp params/layers/gate/w"] == [2, 32, 32]
  assert shards["batch tokens"] == [2, 32]


def _numel(shape: str) -> int:
  dims = shape[shape.index("[") + 1 : -1]
  return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def test_hlo_has_megatron_collectives_and_no_param_all_gather(tiny):
  hlo = tiny["hlo"]
  activation = "f32[2,32,64]"  # [B / data, T, D] of one data shard
  # Dense tensor parallel: in the layer scan one all-reduce after o and one after down, of the
  # local batch's activations; one more for the vocab-parallel embedding lookup; the LM head
  # reduces softmax statistics ([B / data, chunk] values, never logits). Nothing is gathered,
  # and no collective is as large as a weight matrix (the smallest, k, has 64 x 64 values).
  dense = hlo["dense"]
  assert dense["all-gather"] == dense["all-to-all"] == dense["collective-permute"] == []
  assert dense["all-reduce in a loop"].count(activation) == 2
  assert dense["all-reduce outside loops"].count(activation) == 1
  assert max(_numel(s) for s in dense["all-reduce"]) == 2 * 32 * 64
  assert all(_numel(s) <= 2 * 32 for s in dense["all-reduce"] if s != activation)
  # W8A8 + 8:16: the int8 dots of o/down all-reduce exact int32 partial sums; the per-token
  # absmax of their (split) input reduces with max; the site kept in float (layer 1 down) has
  # its own float all-reduce in the other branch of its cond.
  w8a8 = hlo["w8a8 + 8:16"]
  assert w8a8["all-gather"] == w8a8["all-to-all"] == w8a8["collective-permute"] == []
  assert w8a8["all-reduce in a loop"].count("s32[2,32,64]") == 2
  assert max(_numel(s) for s in w8a8["all-reduce"]) == 2 * 32 * 64
  # FSDP with the activations' batch axis pinned to "data" (constrain_batch): each layer
  # all-gathers its 7 weight slices ([d_in, d_out] of one "model" device, the "data" split
  # gathered) inside the scan, never the stacked [L, ...] weights nor any activation; the
  # activations still all-reduce over "model" after o and down.
  fsdp = hlo["fsdp constrained"]
  q_gate_up, k_v, o_down = ["f32[64,32]"] * 3, ["f32[64,16]"] * 2, ["f32[32,64]"] * 2
  assert sorted(fsdp["all-gather in a loop"]) == sorted(q_gate_up + k_v + o_down)
  assert fsdp["all-gather outside loops"] == []
  assert fsdp["all-reduce in a loop"] == [activation, activation]
  assert tiny["diffs"]["fsdp constrained hidden vs single"] < LOGIT_TOL


def test_constrain_batch_splits_numpy_batches(tiny):
  # With a mesh set, a numpy batch (as perplexity() passes it) is split over "data" once the
  # model constrains its activations; without the constraint it is replicated.
  assert tiny["input_sharding"]["numpy batch"] == []
  assert tiny["input_sharding"]["numpy batch, constrain_batch"] == ["data"]


def test_bad_meshes_on_real_devices(tiny):
  e = tiny["errors"]
  assert "model=3 (mesh axis 'model') must divide the model's n_heads=8" in e["model=3 on tiny"]
  assert "needs 6 devices, but devices has 8" in e["2x3 on 8 devices"]
  assert "data=2 (mesh axis 'data') must divide the batch: batch_size=3" in e["batch of 3"]
  assert "is not divisible by the mesh's 'model' size 4" in e["odd vocab"]


@pytest.mark.real_model
def test_real_model_sharded_perplexity(cache_dir):
  out = _run_script("real", str(cache_dir))
  print(f"\nreal model {out}")
  single, sharded = out["ppl single"], out["ppl sharded"]
  assert 20 < single < 40  # 2 windows of 256 tokens of lee_background
  assert abs(sharded - single) / single < 1e-5


# ------------------------------------------------------------------------------------------------
# The subprocess script.


def _collectives(hlo_text: str) -> dict:
  """Collective ops of a compiled HLO module: kind -> result shapes, and the all-reduces and
  all-gathers split by whether they sit in a loop body (the layer scan, the LM-head chunks)."""
  import re

  kinds = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
  out = {k: [] for k in kinds}
  for k in ("all-reduce", "all-gather"):
    out[f"{k} in a loop"], out[f"{k} outside loops"] = [], []
  for line in hlo_text.splitlines():
    m = re.search(rf"= (.+?) ({'|'.join(kinds)})(?:-start)?\(", line)
    if not m:
      continue
    shapes = re.findall(r"[a-z]+\d+\[[\d,]*\]", m.group(1))
    kind = m.group(2)
    out[kind] += shapes
    if kind in ("all-reduce", "all-gather"):
      out[f"{kind} in a loop" if "/while/body/" in line else f"{kind} outside loops"] += shapes
  return out


def _site_inputs(cfg, params, tokens, plan):
  """A prefill's last hidden state [B, T, D] and every site's input (proj -> [L, B, T, d_in]),
  recorded at the model's injection point."""
  import jax.numpy as jnp

  from amber_jax.model.llama import model_pass

  def recording(name, x, weights, row, linear):
    return linear(x), x

  out = model_pass(params, tokens, config=cfg, plan=plan, dtype=jnp.float32, hook=recording)
  return out.hidden, out.records


def _mask_flips(cfg, plan, single, sharded):
  """Where the N:M masks of two runs (site inputs from ``_site_inputs``) differ, and why.

  The masks are recomputed from the recorded inputs and, for each row, the first site (in
  execution order) where they differ is found. Returns (rows with any flip, summary): the
  largest relative gap between the N-th and the (N+1)-th score of the first run over those
  first flips (about 1e-7 when a float rounding difference crossed an exact tie: the mask is
  discontinuous there).
  """
  import jax.numpy as jnp

  from amber_jax.core.sparsity import nm_mask, nm_scores
  from amber_jax.model.config import PROJECTIONS

  n, m = plan.pattern.n, plan.pattern.m
  first = {}  # row -> (site order, relative gaps of the flipped groups there)
  total = 0
  for layer in range(cfg.n_layers):
    for order, proj in enumerate(PROJECTIONS):
      if not bool(plan.enabled[proj][layer]):
        continue
      xs = [r[proj][layer] for r in (single, sharded)]
      if plan.quant is not None:  # the W8A8 path selects on the smoothed input
        xs = [x / np.asarray(plan.quant.sites[proj]["act_div"][layer]) for x in xs]
      factors = plan.factors[proj][layer]
      scores = [np.asarray(nm_scores(jnp.asarray(x), factors)) for x in xs]
      masks = [np.asarray(nm_mask(jnp.asarray(s), plan.pattern)) for s in scores]
      b_, t_, d = scores[0].shape
      differ = (masks[0] != masks[1]).reshape(b_, t_, d // m, m).any(-1)
      total += int(differ.sum())
      for row, tok_, group in np.argwhere(differ):
        key = (layer, order)
        if row in first and first[row][0] < key:
          continue
        top = np.sort(scores[0][row, tok_, group * m : (group + 1) * m])[::-1]
        gap = float((top[n - 1] - top[n]) / max(top[n - 1], 1e-30))
        gaps = first[row][1] if row in first and first[row][0] == key else []
        first[row] = (key, gaps + [gap])
  rows = sorted(int(r) for r in first)
  largest = max((g for _, gaps in first.values() for g in gaps), default=0.0)
  summary = {"flips": total, "rows with flips": rows, "largest first-flip gap": largest}
  return rows, summary


def _row_diffs(prefix: str, a, b) -> dict:
  """Largest |a - b| of [B, ...] arrays, how many rows differ by more than LOGIT_TOL, and the
  largest difference of the other rows (all but the worst)."""
  rows = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1)
  rows = rows.max(axis=1)
  return {
    f"{prefix}: logits": float(rows.max()),
    f"{prefix}: rows whose logits differ": int((rows > LOGIT_TOL).sum()),
    f"{prefix}: logits, other rows": float(np.sort(rows)[-2]),
  }


def _tiny_script() -> dict:
  import jax
  import jax.numpy as jnp

  from amber_jax.calibrate.stats import collect_input_absmax
  from amber_jax.core.scores import model_factors
  from amber_jax.eval.multiple_choice import score_requests
  from amber_jax.eval.perplexity import perplexity, window_nll
  from amber_jax.io.tokenizer import load_hf_tokenizer
  from amber_jax.model import LlamaConfig
  from amber_jax.model.llama import embed, model_pass, prefill
  from amber_jax.model.presets import init_random_params
  from amber_jax.plan import sharding as sh
  from amber_jax.plan.quant_state import build_quant_state
  from amber_jax.plan.schema import make_plan

  jax.config.update("jax_numpy_rank_promotion", "raise")
  assert len(jax.devices()) == N_DEVICES, jax.devices()
  cfg = LlamaConfig(
    vocab_size=448,
    d_model=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    head_dim=16,
    d_ff=128,
    qkv_bias=True,
  )
  # Random weights with std 0.2 (not the preset's 0.02), so logits spread over ~30 and the N:M
  # masks and int8 codes have something to select; an outlier channel as in real LLMs.
  params = jax.jit(init_random_params, static_argnums=(0, 2))(cfg, jax.random.key(0), jnp.float32)
  for site in params["layers"].values():
    if isinstance(site, dict):
      site.update({k: v * 10.0 for k, v in site.items()})
  params["lm_head"] = params["lm_head"] * 10.0
  params["embed"] = (params["embed"] * 10.0).at[:, 5].multiply(20.0)
  rng = np.random.default_rng(0)
  batch, seq = 4, 32
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
  windows = rng.integers(0, cfg.vocab_size, (6, seq + 1)).astype(np.int32)

  absmax = collect_input_absmax(params, tokens, config=cfg, show_progress=False)
  quant, smoothed = build_quant_state(
    params, cfg, absmax, smooth="smoothquant", float_sites=[(1, "down")]
  )
  robust = model_factors(params, "robust")
  robust_smoothed = model_factors({"layers": {p: {"w": w} for p, w in smoothed.items()}}, "robust")
  some_sites = [(0, "q"), (0, "o"), (0, "gate"), (0, "down"), (1, "k"), (1, "o"), (1, "up")]
  plans = {
    "dense": None,
    "8:16 naive": make_plan(cfg, "8:16"),
    "8:16 factors": make_plan(cfg, "8:16", sites=some_sites, factors=robust),
    # W8A8 without sparsity as an 8:16 plan with no site enabled: exactly the W8A8 model, and
    # the same compiled program as "w8a8 + 8:16" (each compile of the 8-device program costs
    # seconds on 2 cores; naive and factors plans share one likewise).
    "w8a8": make_plan(cfg, "8:16", sites=()).replace(quant=quant),
    "w8a8 + 8:16": make_plan(cfg, "8:16", factors=robust_smoothed).replace(quant=quant),
  }

  mesh = sh.make_mesh(data=2, model=4, config=cfg, batch_size=batch)
  s_params = sh.shard_params(params, mesh, config=cfg)
  f_params = sh.shard_params(params, mesh, config=cfg, fsdp=True)
  s_tokens = sh.shard_batch(tokens, mesh)
  jit_prefill = jax.jit(prefill, static_argnames=("config", "max_len", "dtype"))
  site_inputs = jax.jit(functools.partial(_site_inputs, cfg))
  flips = {}
  f32 = jnp.float32

  def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

  diffs, hlo = {}, {}
  tok = load_hf_tokenizer(ROOT / "tests" / "fixtures" / "hf" / "tiny-llama" / "tokenizer.json")
  # Short requests (one row each, or two choices packed in one), one batch: one compile.
  requests = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " dog"),
    ("One two three", " four"),
    ("Hello there", " you"),
    ("a b c d e f", " g"),
    ("Numbers: 1 2 3", " 4"),
  ]
  # window_nll on the prefill's tokens (plus one target each), row by row (one-hot row weights),
  # so that its rows line up with the mask-flip analysis of the prefill.
  nll_windows = np.concatenate([tokens, windows[:batch, :1]], axis=1)
  s_nll_windows = sh.shard_batch(nll_windows, mesh)
  one_hot = np.eye(batch, dtype=np.float32)
  for name, plan in plans.items():
    s_plan = sh.shard_plan(plan, mesh, config=cfg)
    f_plan = sh.shard_plan(plan, mesh, config=cfg, fsdp=True)
    logits, cache = jit_prefill(params, jnp.asarray(tokens), config=cfg, plan=plan)
    s_logits, s_cache = jit_prefill(s_params, s_tokens, config=cfg, plan=s_plan)
    if maxdiff(logits, s_logits) > LOGIT_TOL:
      # The same model with every site's input as an output: which rows' N:M masks flipped
      # between the two runs, and whether each first flip sat on a near-tie. (Its rounding
      # is that of this program, so a flip seen in prefill may not recur here and vice versa.)
      runs = [
        jax.tree.map(np.asarray, site_inputs(*a))
        for a in ((params, jnp.asarray(tokens), plan), (s_params, s_tokens, s_plan))
      ]
      rows, flips[name] = _mask_flips(cfg, plan, runs[0][1], runs[1][1])
      same = np.asarray([b for b in range(batch) if b not in rows], int)
      diffs[f"recorded {name}: hidden and site inputs, rows without mask flips"] = max(
        maxdiff(a[same], b[same]) if a.ndim == 3 else maxdiff(a[:, same], b[:, same])
        for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True)
      )
    diffs.update(_row_diffs(f"prefill {name}", logits, s_logits))
    diffs[f"prefill {name}: kv cache"] = max(
      maxdiff(cache.k, s_cache.k), maxdiff(cache.v, s_cache.v)
    )
    diffs[f"prefill {name}: argmax agreement"] = float(
      np.mean(np.argmax(logits, -1) == np.argmax(s_logits, -1))
    )
    if name in FSDP_PLANS:
      f_logits, _ = jit_prefill(f_params, s_tokens, config=cfg, plan=f_plan)
      diffs.update(_row_diffs(f"prefill {name} fsdp", logits, f_logits))

    per_row = []
    for b in range(batch):
      nll, _ = window_nll(params, nll_windows, one_hot[b], plan, config=cfg, dtype=f32)
      w = sh.shard_batch(one_hot[b], mesh)
      s_nll, _ = window_nll(s_params, s_nll_windows, w, s_plan, config=cfg, dtype=f32)
      per_row.append(abs(float(s_nll) / float(nll) - 1))
    diffs[f"window_nll {name} sharded batch: relative"] = max(per_row)
    diffs[f"window_nll {name} sharded batch: relative, other rows"] = sorted(per_row)[-2]
    if name in ("dense", "w8a8 + 8:16"):
      args = (s_params, s_nll_windows, sh.shard_batch(one_hot[0], mesh), s_plan)
      hlo[name] = _collectives(window_nll.lower(*args, config=cfg, dtype=f32).compile().as_text())

    if name in PUBLIC_API_PLANS:
      kw = dict(config=cfg, batch_size=4, show_progress=False)
      ppl = perplexity(params, windows, plan=plan, **kw)
      s_ppl = perplexity(s_params, windows, plan=s_plan, **kw)
      diffs[f"perplexity {name}: relative"] = abs(s_ppl.perplexity / ppl.perplexity - 1)
      kw = dict(config=cfg, tokenizer=tok, batch_size=8, show_progress=False)
      single = score_requests(params, requests, plan=plan, **kw)
      sharded = score_requests(s_params, requests, plan=s_plan, **kw)
      pairs = list(zip(single, sharded, strict=True))
      gaps = sorted(abs(a[0] - b[0]) for a, b in pairs)
      diffs[f"score_requests {name}: loglik"] = gaps[-1]
      diffs[f"score_requests {name}: requests whose loglik differs"] = sum(g > 1e-4 for g in gaps)
      diffs[f"score_requests {name}: greedy equal"] = float(all(a[1:] == b[1:] for a, b in pairs))

  # The proposed model hook: constrain_batch on the activations. Shown through the public
  # harness (model_pass with a site hook that constrains each site's input).
  def hidden(params_, tokens_, plan_):
    def constrained(name, x, weights, row, linear):
      return linear(sh.constrain_batch(x)), None

    h = sh.constrain_batch(embed(params_, tokens_, f32))
    out = model_pass(params_, config=cfg, plan=plan_, dtype=f32, hook=constrained, h_BxTxD=h)
    return out.hidden

  with jax.set_mesh(mesh):
    compiled = jax.jit(hidden).lower(f_params, s_tokens, None).compile()
    hlo["fsdp constrained"] = _collectives(compiled.as_text())
    h_fsdp = jax.jit(hidden)(f_params, s_tokens, None)
    h_single = jax.jit(hidden)(params, jnp.asarray(tokens), None)
  diffs["fsdp constrained hidden vs single"] = maxdiff(h_fsdp, h_single)

  def first_input_spec(fn, *args):
    spec = fn.lower(*args).compile().input_shardings[0][1].spec
    return [str(a) for a in spec]

  input_sharding = {
    "numpy batch": first_input_spec(jax.jit(lambda p, t: embed(p, t, f32)), s_params, tokens),
  }
  with jax.set_mesh(mesh):
    input_sharding["numpy batch, constrain_batch"] = first_input_spec(
      jax.jit(lambda p, t: sh.constrain_batch(embed(p, t, f32))), s_params, tokens
    )

  # What the placed arrays say about themselves: x.sharding.spec and the shape of one shard.
  specs, shard_shapes = {}, {}
  placed = {
    "params": s_params,
    "fsdp params": f_params,
    "plan": sh.shard_plan(plans["w8a8 + 8:16"], mesh, config=cfg),
  }
  for prefix, tree in placed.items():
    shapes = [list(x.addressable_shards[0].data.shape) for x in jax.tree.leaves(tree)]
    for (path, spec), shape in zip(sh.describe(tree).items(), shapes, strict=True):
      specs[f"{prefix}/{path}"] = [str(a) for a in spec]
      shard_shapes[f"{prefix}/{path}"] = shape
  shard_shapes["batch tokens"] = list(s_tokens.addressable_shards[0].data.shape)

  errors = {}

  def error(name, fn):
    try:
      fn()
      errors[name] = "no error"
    except ValueError as e:
      errors[name] = str(e)

  error(
    "model=3 on tiny", lambda: sh.make_mesh(data=1, model=3, devices=jax.devices()[:3], config=cfg)
  )
  error("2x3 on 8 devices", lambda: sh.make_mesh(data=2, model=3))
  error("batch of 3", lambda: sh.shard_batch(np.zeros((3, 4), np.int32), mesh))
  odd = {"embed": np.zeros((447, 64), np.float32)}
  error("odd vocab", lambda: sh.shard_params(odd, mesh, config=cfg))
  return {
    "diffs": diffs,
    "flips": flips,
    "hlo": hlo,
    "specs": specs,
    "shard_shapes": shard_shapes,
    "input_sharding": input_sharding,
    "errors": errors,
  }


def _real_script(cache_dir: str) -> dict:
  import math

  import jax
  import jax.numpy as jnp

  from amber_jax.data.texts import load_text
  from amber_jax.eval.perplexity import make_windows, perplexity, window_nll
  from amber_jax.io.loading import load_model, load_tokenizer
  from amber_jax.io.sources import DEFAULT_MODEL, resolve_model
  from amber_jax.plan import sharding as sh

  source = resolve_model(DEFAULT_MODEL, cache_dir)
  loaded = load_model(source, cache_dir, show_progress=False)
  cfg = loaded.config
  params = jax.tree.map(jnp.asarray, loaded.params)
  ids = np.asarray(load_tokenizer(source).encode(load_text("lee_background", cache_dir)).ids)
  windows = make_windows(ids, 256, 2)
  single = perplexity(params, windows, config=cfg, batch_size=2, show_progress=False)
  # 9 query heads, 3 KV heads: "model" can be 1 or 3, and 3 does not divide 8 devices, so the
  # mesh is data 2 x model 3 on 6 of the 8.
  mesh = sh.make_mesh(data=2, model=3, devices=jax.devices()[:6], config=cfg, batch_size=2)
  s_params = sh.shard_params(params, mesh, config=cfg)
  weight = np.ones(2, np.float32)
  nll, count = window_nll(
    s_params,
    sh.shard_batch(windows, mesh),
    sh.shard_batch(weight, mesh),
    None,
    config=cfg,
    dtype=jnp.float32,
  )
  return {"ppl single": single.perplexity, "ppl sharded": math.exp(float(nll) / float(count))}


if __name__ == "__main__":
  mode = sys.argv[1]
  result = _tiny_script() if mode == "tiny" else _real_script(sys.argv[2])
  print(json.dumps(result))
