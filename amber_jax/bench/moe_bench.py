"""Mixture-of-experts prefill: the grouped experts against a dense model of the same active
multiply-adds and against computing every expert, measured side by side on random weights.

The three models share everything but the MLP: ``grouped`` is the MoE as the model runs it
(each token's rows go to its ``n_active`` experts, one ``grouped_dot`` per site: tiles of
rows sorted by expert), ``dense_equal`` replaces the MoE with one dense SwiGLU of width
``n_active * d_ff`` (the same linear multiply-adds per token, no routing), ``every_expert``
sends every token through every expert (``MixtureOfExperts.dispatch == "every"``, E / n_active
times the expert work). With a
pattern, ``grouped_sparse`` is the MoE under the paper's rules (q, gate, down sparse).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.bench.prefill_bench import DTYPES, param_bytes, prefill_flops, time_interleaved
from amber_jax.calibrate.policy import policy_sites
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import prefill
from amber_jax.model.presets import init_random_params
from amber_jax.plan.schema import make_plan

_PREFILL = jax.jit(
  lambda params, tokens, plan, config, dtype: prefill(
    params, tokens, config=config, plan=plan, dtype=dtype
  )[0][:, -1],
  static_argnames=("config", "dtype"),
)


def scaled_moe_config(config: LlamaConfig, *, divisor: int, n_layers: int) -> LlamaConfig:
  """``config`` with d_model, the heads and both FFN widths divided by ``divisor`` (head_dim,
  the expert count and n_active kept) and ``n_layers`` layers: the same routing at a size a CPU
  runs. ValueError unless the config has experts and ``divisor`` divides its widths."""
  if config.moe is None:
    raise ValueError("scaled_moe_config needs a mixture-of-experts config (config.moe)")
  if divisor < 1 or n_layers < 1:
    raise ValueError(f"divisor and n_layers must be >= 1, got {divisor}, {n_layers}")
  for name, size in (
    ("d_model", config.d_model),
    ("n_heads", config.n_heads),
    ("moe.d_ff", config.moe.d_ff),
  ):
    if size % divisor:
      raise ValueError(f"divisor={divisor} must divide {name}={size}")
  return dataclasses.replace(
    config,
    d_model=config.d_model // divisor,
    n_heads=config.n_heads // divisor,
    n_kv_heads=max(1, config.n_kv_heads // divisor),
    d_ff=max(1, config.d_ff // divisor),
    n_layers=n_layers,
    moe=dataclasses.replace(config.moe, d_ff=config.moe.d_ff // divisor),
  )


def dense_equal_config(config: LlamaConfig) -> LlamaConfig:
  """The dense model with the MoE's active linear multiply-adds: one SwiGLU of width
  ``n_active * d_ff`` in place of the experts (and no router)."""
  return dataclasses.replace(
    config, moe=None, d_ff=config.moe.n_active * config.moe.d_ff, architecture="qwen3"
  )


def bench_moe(
  config: LlamaConfig,
  *,
  name: str,
  batch_sizes: Sequence[int],
  seq_lens: Sequence[int],
  pattern: str | None = "8:16",
  repeats: int = 5,
  dtype: str = "float32",
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Median prefill ms of each model (module docstring) per batch x seq_len, with the ratios
  grouped / dense_equal and every_expert / grouped and each model's counted FLOPs."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if repeats < 1 or not batch_sizes or not seq_lens or min(*batch_sizes, *seq_lens) < 1:
    raise ValueError("repeats, batch_sizes and seq_lens must be >= 1 (and non-empty)")
  jdtype = DTYPES[dtype]
  every = dataclasses.replace(config, moe=dataclasses.replace(config.moe, dispatch="every"))
  dense = dense_equal_config(config)
  params = init_random_params(config, jax.random.key(0), dtype=jdtype)
  dense_params = init_random_params(dense, jax.random.key(0), dtype=jdtype)
  models = {
    "grouped": (config, params, None),
    "dense_equal": (dense, dense_params, None),
    "every_expert": (every, params, None),
  }
  if pattern is not None:
    plan = make_plan(config, pattern, sites=policy_sites(config, "paper"))
    models["grouped_sparse"] = (config, params, plan)
  rng = np.random.default_rng(0)
  rows = []
  for b in batch_sizes:
    for t in seq_lens:
      tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
      fns = {
        key: (
          lambda c=c, p=p, plan=plan, tokens=tokens: jax.block_until_ready(
            _PREFILL(p, tokens, plan, config=c, dtype=jdtype)
          )
        )
        for key, (c, p, plan) in models.items()
      }
      for fn in fns.values():
        fn()  # compile
      med = {k: statistics.median(v) for k, v in time_interleaved(fns, repeats).items()}
      rows.append(
        {
          "batch": b,
          "seq_len": t,
          "median_ms": {k: 1e3 * v for k, v in med.items()},
          "grouped_over_dense_equal": med["grouped"] / med["dense_equal"],
          "every_over_grouped": med["every_expert"] / med["grouped"],
          "gflop": {
            "grouped": prefill_flops(config, b, t).total / 1e9,
            "dense_equal": prefill_flops(dense, b, t).total / 1e9,
            "every_expert": prefill_flops(
              dataclasses.replace(
                config, moe=dataclasses.replace(config.moe, n_active=config.moe.n_experts)
              ),
              b,
              t,
            ).total
            / 1e9,
          },
        }
      )
      log(f"{name} batch {b} x {t}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items()))
  return {
    "preset": name,
    "config": {
      "d_model": config.d_model,
      "n_layers": config.n_layers,
      "n_heads": config.n_heads,
      "n_experts": config.moe.n_experts,
      "n_active": config.moe.n_active,
      "expert_d_ff": config.moe.d_ff,
    },
    "pattern": pattern,
    "dtype": dtype,
    "repeats": repeats,
    "param_bytes": param_bytes(params),
    "rows": rows,
  }


def format_moe_table(result: dict[str, Any]) -> str:
  """The result as a Markdown table."""
  names = list(result["rows"][0]["median_ms"])
  header = ["batch", "seq_len", *[f"{n} ms" for n in names], "grouped/dense_equal", "every/grouped"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
  for r in result["rows"]:
    cells = [str(r["batch"]), str(r["seq_len"]), *[f"{r['median_ms'][n]:.1f}" for n in names]]
    cells += [f"{r['grouped_over_dense_equal']:.2f}", f"{r['every_over_grouped']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
