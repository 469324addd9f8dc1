"""Expert parallelism: a Qwen3-MoE model's experts split over the mesh's "model" axis (whole
experts per device), run on 8 emulated CPU devices (data 2 x model 4) against one device.

The script half runs in a subprocess with ``--xla_force_host_platform_device_count=8``; the
test half checks its numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-3  # float all-reduces reorder partial sums; logits are O(1) here


@pytest.fixture(scope="module")
def result() -> dict:
  env = {
    **os.environ,
    "XLA_FLAGS": " ".join(
      f for f in (os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=8") if f
    ),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
  }
  proc = subprocess.run(
    [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT
  )
  if proc.returncode:
    pytest.fail(f"expert-parallel script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  print("\nexpert parallel vs one device:", json.dumps(out, indent=1))
  return out


def test_experts_are_split_over_the_model_axis(result):
  # Each device holds 8 / 4 = 2 whole experts of every expert weight and plan array.
  assert result["expert weight shard"] == [2, 2, 64, 32]
  assert result["expert factors shard"] == [2, 2, 64]
  assert result["w_q shard"] == [2, 2, 32, 64]


@pytest.mark.parametrize("plan", ["dense", "2:4 amber", "w8a8", "w8a8 + 2:4"])
def test_expert_parallel_prefill_equals_one_device(result, plan):
  d = result["diffs"][plan]
  # N:M masks and int8 codes can flip at a near-tie when the sharded program rounds otherwise
  # (tests/test_sharding.py measures and explains it); so do router choices. At most one row
  # may differ, the others must agree.
  assert d["rows that differ"] <= 1, d
  assert d["other rows"] < LOGIT_TOL, d


def _script() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from amber_jax.calibrate.stats import collect_input_absmax
  from amber_jax.core.scores import model_factors
  from amber_jax.model import prefill
  from amber_jax.model.config import LlamaConfig, MixtureOfExperts
  from amber_jax.model.presets import init_random_params
  from amber_jax.plan.quant_state import build_quant_state
  from amber_jax.plan.schema import make_plan
  from amber_jax.plan.sharding import make_mesh, shard_batch, shard_params, shard_plan

  config = LlamaConfig(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    head_dim=16,
    d_ff=96,
    qk_norm=True,
    moe=MixtureOfExperts(n_experts=8, n_active=2, d_ff=32),
    architecture="qwen3_moe",
  )
  key = jax.random.key(0)
  params = jax.tree.map(np.asarray, init_random_params(config, key, dtype=jnp.float32))
  rng = np.random.default_rng(0)
  # O(1) activations: weights of unit-variance outputs (the presets' 0.02 gives tiny logits).
  for leaf in params["layers"].values():
    if isinstance(leaf, dict):
      w = leaf["w"]
      leaf["w"] = (rng.standard_normal(w.shape) / np.sqrt(w.shape[-2])).astype(np.float32)
  params["layers"]["router"] = rng.standard_normal(params["layers"]["router"].shape).astype(
    np.float32
  )
  params["embed"] = rng.standard_normal(params["embed"].shape).astype(np.float32)
  tokens = rng.integers(0, config.vocab_size, (4, 16)).astype(np.int32)
  factors = model_factors(params, "robust")
  absmax = collect_input_absmax(params, tokens, config=config, show_progress=False)
  state, _ = build_quant_state(params, config, absmax)
  paper = [(l, p) for l in range(2) for p in ("q", "gate", "down")]
  plans = {
    "dense": None,
    "2:4 amber": make_plan(config, "2:4", sites=paper, factors=factors),
    "w8a8": make_plan(config, None).replace(quant=state),
    "w8a8 + 2:4": make_plan(config, "2:4", sites=paper, factors=factors).replace(quant=state),
  }
  mesh = make_mesh(data=2, model=4, config=config, batch_size=4)
  sharded_params = shard_params(params, mesh, config=config)
  fn = jax.jit(lambda p, t, plan: prefill(p, t, config=config, plan=plan)[0])
  diffs = {}
  for name, plan in plans.items():
    one = np.asarray(fn(params, tokens, plan))
    splan = None if plan is None else shard_plan(plan, mesh, config=config)
    with jax.set_mesh(mesh):
      many = np.asarray(fn(sharded_params, shard_batch(tokens, mesh), splan))
    row = np.abs(one - many).max(axis=(1, 2))
    bad = row > LOGIT_TOL
    diffs[name] = {
      "max": float(row.max()),
      "rows that differ": int(bad.sum()),
      "other rows": float(row[~bad].max()) if (~bad).any() else 0.0,
    }
  shard = lambda a: list(a.addressable_shards[0].data.shape)
  splan = shard_plan(plans["w8a8 + 2:4"], mesh, config=config)
  print(
    json.dumps(
      {
        "diffs": diffs,
        "expert weight shard": shard(sharded_params["layers"]["gate"]["w"]),
        "expert factors shard": shard(splan.factors["gate"]),
        "w_q shard": shard(splan.quant.sites["down"]["w_q"]),
      }
    )
  )


if __name__ == "__main__":
  _script()
