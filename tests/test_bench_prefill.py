"""amber_jax.bench.prefill_bench on a tiny random model: structure, FLOP count, ratios.

No timing is asserted (times on a shared machine prove nothing); the benchmark itself is
experiments/bench_prefill.py and its numbers live in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest

from amber_jax.bench.prefill_bench import (
  FLOP_COUNTING,
  HFUnavailable,
  bench_prefill,
  format_table,
  load_hf_prefill,
  prefill_flops,
  time_interleaved,
  token_batch,
)
from amber_jax.model.config import LlamaConfig
from amber_jax.plan.schema import make_plan

TINY = LlamaConfig(
  vocab_size=64,
  d_model=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  head_dim=8,
  d_ff=48,
  rope_theta=10000.0,
  tie_embeddings=True,
  max_seq_len=64,
)


def _random_params(config: LlamaConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  n, d = config.n_layers, config.d_model
  f32 = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  layers = {"attn_norm": 1 + f32(n, d, scale=0.1), "mlp_norm": 1 + f32(n, d, scale=0.1)}
  for proj, (d_in, d_out) in config.linear_shapes().items():
    layers[proj] = {"w": f32(n, d_in, d_out, scale=d_in**-0.5)}
  return {
    "embed": f32(config.vocab_size, d),
    "layers": layers,
    "final_norm": np.ones(d, np.float32),
  }


def test_flop_count_by_hand():
  b, t = 3, 10
  # Per layer and token: q 32*32, k 32*16, v 32*16, o 32*32, gate/up 32*48 each, down 48*32.
  linear_macs = 2 * (1024 + 512 + 512 + 1024 + 1536 + 1536 + 1536)
  assert linear_macs == 15360
  # Scores and values: 2 matmuls x B x heads x T x T x head_dim, per layer.
  attn_macs = 2 * 2 * b * 4 * t * t * 8
  head_macs = b * t * 32 * 64
  flops = prefill_flops(TINY, b, t)
  assert flops.linear == 2 * linear_macs * b * t
  assert flops.attention == 2 * attn_macs
  assert flops.lm_head == 2 * head_macs
  assert flops.total == 2 * (linear_macs * b * t + attn_macs + head_macs) == 1_121_280
  assert flops.as_dict()["total"] == flops.total
  with pytest.raises(ValueError, match="batch"):
    prefill_flops(TINY, 0, 4)


def test_token_batch_cuts_and_repeats():
  ids = np.arange(10)
  np.testing.assert_array_equal(token_batch(ids, 2, 3), [[0, 1, 2], [3, 4, 5]])
  out = token_batch(ids, 3, 4)  # 12 > 10 tokens: the stream repeats.
  assert out.shape == (3, 4) and out.dtype == np.int32
  np.testing.assert_array_equal(out.reshape(-1)[10:], [0, 1])


def test_time_interleaved_rotates_order():
  calls = []
  fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
  times = time_interleaved(fns, 3)
  assert calls == list("abcbcacab")
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
  assert all(t >= 0 for v in times.values() for t in v)
  with pytest.raises(ValueError, match="repeats"):
    time_interleaved(fns, 0)


def test_bench_prefill_structure_and_ratios():
  params = _random_params(TINY)
  plan = make_plan(TINY, "2:4")
  ids = np.random.default_rng(1).integers(0, TINY.vocab_size, 200)
  logs = []
  result = bench_prefill(
    params,
    TINY,
    ids,
    sparse_plan=plan,
    batch_sizes=(1, 2),
    seq_lens=(8,),
    repeats=2,
    log=logs.append,
  )
  json.dumps(result)  # JSON-ready.
  assert [(r["batch"], r["seq_len"]) for r in result["rows"]] == [(1, 8), (2, 8)]
  assert result["pattern"] == "2:4"
  assert result["sparse_sites"] == result["total_sites"] == 14
  assert result["coverage"] == 1.0
  assert result["hf"] == {"status": "skipped", "reason": "not requested"}
  assert result["logit_check"] is None
  assert result["flop_counting"] == FLOP_COUNTING
  assert result["param_bytes"] == 4 * sum(
    a.size for a in [params["embed"], params["final_norm"]] + list(_leaves(params["layers"]))
  )
  for r in result["rows"]:
    assert r["tokens"] == r["batch"] * r["seq_len"]
    assert r["flops"] == prefill_flops(TINY, r["batch"], r["seq_len"]).as_dict()
    assert r["hf"] is None and r["hf_over_dense"] is None
    for col in ("dense", "sparse"):
      s = r[col]
      assert len(s["times_ms"]) == 2
      assert s["median_ms"] > 0 and s["min_ms"] > 0 and s["first_call_s"] > 0
      assert s["tokens_per_s"] == pytest.approx(r["tokens"] / (s["median_ms"] / 1e3))
      assert s["gflop_per_s"] == pytest.approx(r["flops"]["total"] / s["median_ms"] / 1e6)
    assert r["sparse_over_dense"] == pytest.approx(
      r["sparse"]["median_ms"] / r["dense"]["median_ms"]
    )
    assert r["sparse_over_dense"] > 0 and r["sparse_over_dense_paired"] > 0
    assert r["hf_over_dense_paired"] is None
  assert len(logs) == 2
  table = format_table(result)
  assert "sparse/dense" in table and "HF column skipped: not requested" in table
  md = format_table(result, markdown=True).splitlines()
  assert md[0].startswith("| batch | seq_len |") and md[1].startswith("|---:|")
  assert len([line for line in md if line.startswith("| ")]) == 3  # header + 2 rows


def _leaves(tree):
  for v in tree.values():
    yield from _leaves(v) if isinstance(v, dict) else [v]


def test_bench_prefill_dense_only_and_bad_arguments():
  params = _random_params(TINY)
  ids = np.arange(40) % TINY.vocab_size
  result = bench_prefill(
    params, TINY, ids, sparse_plan=None, batch_sizes=(1,), seq_lens=(4,), repeats=1, log=print
  )
  (row,) = result["rows"]
  assert row["sparse"] is None and row["sparse_over_dense"] is None
  assert result["pattern"] is None and result["sparse_sites"] == 0
  assert "n/a" in format_table(result)
  common = dict(sparse_plan=None, batch_sizes=(1,), seq_lens=(4,))
  with pytest.raises(ValueError, match="matmul_precision"):
    bench_prefill(params, TINY, ids, matmul_precision="fast", **common)
  with pytest.raises(ValueError, match="dtype"):
    bench_prefill(params, TINY, ids, dtype="float16", **common)
  with pytest.raises(ValueError, match="seq_lens"):
    bench_prefill(params, TINY, ids, sparse_plan=None, batch_sizes=(1,), seq_lens=(0,))


@pytest.mark.slow
def test_bench_prefill_with_hf_transformers():
  """The HF column runs on the same weights and tokens and agrees with our dense logits."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  params = _random_params(TINY)
  try:
    hf = load_hf_prefill(TINY, params, device="cpu", threads=1)
  except HFUnavailable as e:
    pytest.skip(str(e))
  ids = np.random.default_rng(2).integers(0, TINY.vocab_size, 100)
  result = bench_prefill(
    params,
    TINY,
    ids,
    sparse_plan=make_plan(TINY, "2:4"),
    batch_sizes=(2,),
    seq_lens=(8,),
    repeats=2,
    hf=hf,
    matmul_precision="highest",
    log=print,
  )
  assert result["hf"]["status"] == "ran" and result["hf"]["threads"] == 1
  check = result["logit_check"]
  assert (check["batch"], check["seq_len"]) == (2, 8)
  assert check["max_abs_diff"] < 1e-4
  assert check["argmax_agreement"] == 1.0
  (row,) = result["rows"]
  assert len(row["hf"]["times_ms"]) == 2
  assert row["hf_over_dense"] == pytest.approx(row["hf"]["median_ms"] / row["dense"]["median_ms"])
  assert row["hf_over_dense"] > 0 and row["hf_over_dense_paired"] > 0
  assert "HF vs our dense logits" in format_table(result)


def test_hf_unavailable_says_why(monkeypatch):
  params = _random_params(TINY)
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError.
    with pytest.raises(HFUnavailable, match="torch/transformers do not import"):
      load_hf_prefill(TINY, params)
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  if torch.cuda.is_available():
    return
  with pytest.raises(HFUnavailable, match="no CUDA device"):
    load_hf_prefill(TINY, params, device="cuda")
  # JAX on a GPU with a CPU-only torch: skipped rather than timing torch on the CPU.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(HFUnavailable, match="JAX computes on gpu"):
    load_hf_prefill(TINY, params)


def test_random_preset_rows_and_floor():
  """The GPU-session bench on random weights: ratios against its own dense column, the
  compute floor from the counted FLOPs when a peak is given, and a table with it."""
  from amber_jax.bench.prefill_bench import bench_random_preset, format_random_preset_table

  result = bench_random_preset(
    "smollm2-135m", pattern="8:16", impls=["xla"], batch_sizes=[1], seq_lens=[16], repeats=1,
    dtype="float32", peak_tflops=2.0, log=lambda *a: None,
  )  # fmt: skip
  (row,) = result["rows"]
  ms = row["median_ms"]
  assert row["over_dense"]["sparse_xla"] == pytest.approx(ms["sparse_xla"] / ms["dense"])
  assert row["floor_ms"] == pytest.approx(1e3 * row["flops"] / 2.0e12)
  assert row["dense_pct_of_floor"] == pytest.approx(100 * row["floor_ms"] / ms["dense"])
  table = format_random_preset_table(result)
  assert "| floor ms | dense % of floor |" in table.splitlines()[0] + " |"
  with pytest.raises(ValueError, match="peak_tflops must be > 0"):
    bench_random_preset("smollm2-135m", pattern="8:16", impls=["xla"], batch_sizes=[1],
                        seq_lens=[16], peak_tflops=0.0, log=lambda *a: None)  # fmt: skip
