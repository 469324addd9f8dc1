"""Writes tests/fixtures/plans/v1_*: plans saved by the code before the core redesign.

Run once at commit 7df4621 (the last layout before sites became data):
    git worktree add /tmp/v1 7df4621 && cd /tmp/v1 && \
      PYTHONPATH=. python <this file> <repo>/tests/fixtures/plans
tests/test_plan_checkpoint.py restores them with today's code and rebuilds the same recipes.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.correction_fit import identity_correction
from amber_jax.core.scores import model_factors
from amber_jax.model.config import LlamaConfig
from amber_jax.model.presets import init_random_params
from amber_jax.plan.channel_order import model_channel_order
from amber_jax.plan.io import save_sparsity_plan
from amber_jax.plan.quant_state import build_quant_state
from amber_jax.plan.schema import make_plan

out = Path(sys.argv[1])
cfg = LlamaConfig(
  vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
params = init_random_params(cfg, jax.random.key(0))
factors = model_factors(params, "robust")
plan = make_plan(
  cfg,
  "2:4",
  sites=[(0, "q"), (1, "gate"), (0, "down"), (1, "down"), (1, "o")],
  factors=factors,
  channel_order=model_channel_order(cfg, "mixed"),
)
rng = np.random.default_rng(3)
corr = identity_correction(cfg)
corr = jax.tree.map(lambda a: a + jnp.asarray(rng.uniform(0, 0.1, a.shape), a.dtype), corr)
save_sparsity_plan(out / "v1_float", plan.replace(correction=corr), metadata={"fixture": "float"})
absmax = {
  p: rng.uniform(0.5, 3, (cfg.n_layers, s[0])).astype(np.float32)
  for p, s in cfg.linear_shapes().items()
}
state, smoothed = build_quant_state(
  params, cfg, absmax, smooth="smoothquant", float_sites=[(1, "o")]
)
wplan = make_plan(
  cfg,
  "2:4",
  sites=[(0, "q"), (1, "down")],
  factors=model_factors({"layers": {p: {"w": w} for p, w in smoothed.items()}}, "robust"),
).replace(quant=state)
save_sparsity_plan(out / "v1_w8a8", wplan, metadata={"fixture": "w8a8"})
print("wrote", out)
# orbax's commit marker names the absolute temporary path it was written to: keep the fixture
# free of this machine's paths (the loader only needs the marker to exist).
for marker in out.glob("*/arrays/commit_success.txt"):
  marker.write_text(
    "Checkpoint commit was successful (fixture written by scripts/make_plan_fixtures.py)"
  )
