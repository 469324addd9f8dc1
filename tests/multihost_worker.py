"""One process of the 2-process test of the multi-host path (tests/test_multihost.py).

Run as ``python tests/multihost_worker.py PROCESS_ID PORT OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and ``JAX_PLATFORMS=cpu``: it joins a
2-process JAX cluster (coordinator on 127.0.0.1:PORT, CPU collectives over gloo), so that the
global mesh (data 2 x model 2) has 4 devices, "model" within a process. It places the params and
plans with ``shard_params``/``shard_plan`` (each process builds the same host copy), its own rows
of the batch with ``shard_batch(rows, mesh, process_local=True)``, runs the jitted prefill with
the dense and the sparse plan and writes to OUT_DIR/process_<id>.npz the global logits and KV
cache (``process_allgather``) and what it saw of the cluster.

Not collected by pytest (no ``test_`` prefix). ``build`` is the model, batch and plans that the
test recomputes on one device.
"""

from __future__ import annotations

import sys

import numpy as np
from conftest import TINY_V64_CONFIG, random_params

N_PROCESSES = 2
LOCAL_DEVICES = 2
DATA, MODEL = 2, 2  # "model" within a process: a process's 2 devices are consecutive
BATCH, SEQ = 4, 32  # 2 rows per process


def build():
  """(config, params, tokens [BATCH, SEQ], plans): the same on every process (fixed seed).

  TINY_V64_CONFIG: 4 query heads on 2 KV heads, d_ff 64, vocabulary 64, all divisible by
  "model" = 2 (heads, FFN columns and the vocab-parallel embedding and LM head split in 2);
  random_params' weights (std 0.2) so that logits spread and the N:M masks select something.
  The sparse plan is 8:16 on every site with the robust score factors (the o/down inputs and
  their factors are split over "model": each device masks its own groups).
  """
  from amber_jax.core.scores import model_factors
  from amber_jax.plan.schema import make_plan

  cfg = TINY_V64_CONFIG
  rng = np.random.default_rng(0)
  params = random_params(cfg, rng)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
  plans = {
    "dense": None,
    "sparse": make_plan(cfg, "8:16", factors=model_factors(params, "robust")),
  }
  return cfg, params, tokens, plans


def main(process_id: int, port: int, out_dir: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=N_PROCESSES,
    process_id=process_id,
    initialization_timeout=120,
  )
  from jax.experimental import multihost_utils

  from amber_jax.model.llama import prefill
  from amber_jax.plan import sharding as sh

  assert jax.process_index() == process_id and jax.process_count() == N_PROCESSES
  assert len(jax.local_devices()) == LOCAL_DEVICES, jax.local_devices()
  assert len(jax.devices()) == N_PROCESSES * LOCAL_DEVICES, jax.devices()

  cfg, params, tokens, plans = build()
  mesh = sh.make_mesh(data=DATA, model=MODEL, config=cfg, batch_size=BATCH)
  # Each "model" row of the mesh (the devices one data shard's tensor parallelism spans) is
  # one process's.
  mesh_processes = [[d.process_index for d in row] for row in mesh.devices]
  s_params = sh.shard_params(params, mesh, config=cfg)
  # This process's rows: data shard p of the batch is held by process p's devices.
  rows = BATCH // N_PROCESSES
  local = tokens[process_id * rows : (process_id + 1) * rows]
  s_tokens = sh.shard_batch(local, mesh, process_local=True)

  jit_prefill = jax.jit(prefill, static_argnames=("config", "max_len", "dtype"))
  out = {
    "mesh_processes": np.asarray(mesh_processes),
    "params_fully_addressable": np.asarray(
      [x.is_fully_addressable for x in jax.tree.leaves(s_params)]
    ),
    "tokens_shape": np.asarray(s_tokens.shape),
    "tokens_local_rows": np.asarray(
      sorted({s.index[0].start or 0 for s in s_tokens.addressable_shards})
    ),
  }
  for name, plan in plans.items():
    s_plan = sh.shard_plan(plan, mesh, config=cfg)
    logits, cache = jit_prefill(s_params, s_tokens, config=cfg, plan=s_plan)
    # Each addressable shard as this process holds it, with its global index (start, stop of
    # every axis), so the test checks this process's own part without any collective.
    for i, shard in enumerate(logits.addressable_shards):
      bounds = [sl.indices(n)[:2] for sl, n in zip(shard.index, logits.shape, strict=True)]
      out[f"{name}/shard{i}/index"] = np.asarray(bounds)
      out[f"{name}/shard{i}/data"] = np.asarray(shard.data)
    gathered = multihost_utils.process_allgather((logits, cache.k, cache.v), tiled=True)
    for key, value in zip(("logits", "k", "v"), gathered, strict=True):
      out[f"{name}/{key}"] = np.asarray(value, np.float32)
  np.savez(f"{out_dir}/process_{process_id}.npz", **out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
