"""The Llama-family model on tiny random configs: KV cache, plans, generation, padding, compiles."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_V64_CONFIG, init_params

from amber_jax.eval.perplexity import make_windows, perplexity, window_nll
from amber_jax.model import (
  PROJECTIONS,
  LlamaConfig,
  RopeScaling,
  decode_step,
  forward,
  generate_greedy,
  prefill,
)
from amber_jax.plan.schema import dense_plan, make_plan

BASE = dict(vocab_size=64, d_model=32, n_layers=2, head_dim=8, d_ff=64, max_seq_len=64)
CONFIGS = {
  # Grouped-query attention: 4 query heads share 2 KV heads.
  "gqa": LlamaConfig(**BASE, n_heads=4, n_kv_heads=2),
  # Qwen2-style q/k/v biases, tied embeddings, one KV head.
  "qkv_bias": LlamaConfig(
    **BASE, n_heads=4, n_kv_heads=1, qkv_bias=True, tie_embeddings=True, rope_theta=1e6
  ),
  # Llama-3 RoPE scaling, with a short original context so every frequency band is exercised.
  "rope_scaling": LlamaConfig(
    **BASE,
    n_heads=4,
    n_kv_heads=2,
    rope_scaling=RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
  ),
}

ATOL = 1e-5


def tokens(config: LlamaConfig, shape, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), jnp.int32)


forward_jit = jax.jit(forward, static_argnames=("config", "dtype"))
prefill_jit = jax.jit(prefill, static_argnames=("config", "max_len", "dtype"))
decode_jit = jax.jit(decode_step, static_argnames=("config", "dtype"))


# Every test uses these shapes, so each jitted function compiles once per config.
B, T, K = 2, 5, 4  # Batch, prompt length, new tokens.


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  """Each tiny config (for the cache and RoPE tests)."""
  config = CONFIGS[request.param]
  return config, init_params(config)


@pytest.fixture(scope="module")
def gqa():
  """One tiny config (for the tests that do not depend on the architecture variant)."""
  return CONFIGS["gqa"], init_params(CONFIGS["gqa"])


def test_random_model_is_not_degenerate(model):
  config, params = model
  logits = np.asarray(forward_jit(params, tokens(config, (B, T + K)), config=config))
  assert logits.shape == (B, T + K, config.vocab_size) and logits.dtype == np.float32
  assert np.isfinite(logits).all()
  assert logits.std() > 0.3  # So that the differences checked below are not noise-level.


def test_prefill_then_decode_reproduces_forward(model):
  config, params = model
  toks = tokens(config, (B, T + K))
  full = np.asarray(forward_jit(params, toks, config=config))
  logits, cache = prefill_jit(params, toks[:, :T], config=config, max_len=T + K)
  np.testing.assert_allclose(logits, full[:, :T], atol=ATOL, rtol=0)
  assert cache.k.shape == (config.n_layers, B, T + K, config.n_kv_heads, config.head_dim)
  assert cache.v.shape == cache.k.shape
  assert int(cache.length) == T
  # One token at a time, then the last two in one step.
  for i in range(T, T + K - 2):
    logits, cache = decode_jit(params, toks[:, i : i + 1], cache, config=config)
    assert logits.shape == (B, 1, config.vocab_size)
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=ATOL, rtol=0)
  logits, cache = decode_jit(params, toks[:, T + K - 2 :], cache, config=config)
  np.testing.assert_allclose(logits, full[:, T + K - 2 :], atol=ATOL, rtol=0)
  assert int(cache.length) == T + K


def test_decode_from_an_empty_cache_equals_forward(gqa):
  config, params = gqa
  toks = tokens(config, (B, T + K))
  _, cache = prefill_jit(params, toks[:, :0], config=config, max_len=T + K)
  assert int(cache.length) == 0
  logits, _ = decode_jit(params, toks, cache, config=config)
  np.testing.assert_allclose(logits, forward_jit(params, toks, config=config), atol=ATOL, rtol=0)


def test_prefill_max_len_too_small(gqa):
  config, params = gqa
  with pytest.raises(ValueError, match=r"max_len=3 must be >= the prompt length 4"):
    prefill(params, tokens(config, (1, 4)), config=config, max_len=3)


def test_dense_plans_equal_no_plan_and_sparse_plan_differs(gqa):
  config, params = gqa
  toks = tokens(config, (B, T))
  dense, dense_cache = prefill_jit(params, toks, config=config, max_len=T + K)
  for plan in (dense_plan(config), make_plan(config, None)):
    assert plan.pattern is None
    assert plan.enabled_sites() == []
    logits, cache = prefill_jit(params, toks, config=config, plan=plan, max_len=T + K)
    np.testing.assert_array_equal(logits, dense)
    np.testing.assert_array_equal(cache.k, dense_cache.k)
  sparse_plan = make_plan(config, "2:4")
  assert len(sparse_plan.enabled_sites()) == config.n_layers * len(PROJECTIONS)
  sparse, sparse_cache = prefill_jit(params, toks, config=config, plan=sparse_plan, max_len=T + K)
  assert np.abs(np.asarray(sparse) - np.asarray(dense)).max() > 1e-2
  # Sparse prefill writes other keys into the cache (the k-projection input was sparsified).
  assert np.abs(np.asarray(sparse_cache.k) - np.asarray(dense_cache.k)).max() > 1e-3


def test_pattern_with_no_site_enabled_is_dense(gqa):
  config, params = gqa
  toks = tokens(config, (B, T + K))
  plan = make_plan(config, "2:4", sites=())
  assert plan.pattern is not None and plan.enabled_sites() == []
  np.testing.assert_array_equal(
    forward_jit(params, toks, config=config, plan=plan), forward_jit(params, toks, config=config)
  )


def test_single_site_plan(gqa):
  config, params = gqa
  toks = tokens(config, (B, T + K))
  dense = np.asarray(forward_jit(params, toks, config=config))
  one = make_plan(config, "2:4", sites=[(1, "down")])
  assert one.enabled_sites() == [(1, "down")]
  one_logits = np.asarray(forward_jit(params, toks, config=config, plan=one))
  all_logits = np.asarray(forward_jit(params, toks, config=config, plan=make_plan(config, "2:4")))
  assert np.abs(one_logits - dense).max() > 1e-3
  assert np.abs(one_logits - all_logits).max() > 1e-3


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_generate_greedy_deterministic_and_equals_manual_loop(gqa, pattern):
  config, params = gqa
  plan = make_plan(config, pattern)
  prompt = tokens(config, (B, T), seed=3)
  gen = functools.partial(generate_greedy, config=config, max_new_tokens=K, plan=plan)
  first, second = np.asarray(gen(params, prompt)), np.asarray(gen(params, prompt))
  assert first.shape == (B, K) and first.dtype == np.int32
  np.testing.assert_array_equal(first, second)
  # Prefill per the plan, then the dense decode step on that cache, argmax each time.
  logits, cache = prefill_jit(params, prompt, config=config, plan=plan, max_len=T + K)
  manual = []
  for _ in range(K):
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    manual.append(nxt)
    logits, cache = decode_jit(params, nxt[:, None], cache, config=config)
  np.testing.assert_array_equal(first, np.stack(manual, axis=1))


def test_decode_never_sparsifies(gqa):
  # decode_step takes a plan only for its W8A8 part: a sparse plan must decode exactly as dense.
  config, params = gqa
  toks = tokens(config, (B, T + 1))
  _, cache = prefill(
    params, toks[:, :T], config=config, plan=make_plan(config, "2:4"), max_len=T + 1
  )
  dense, _ = decode_step(params, toks[:, T:], cache, config=config)
  with_plan, _ = decode_step(
    params, toks[:, T:], cache, config=config, plan=make_plan(config, "2:4")
  )
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(with_plan))


def test_generate_greedy_needs_a_new_token(gqa):
  config, params = gqa
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    generate_greedy(params, tokens(config, (1, 3)), config=config, max_new_tokens=0)


def test_bf16_forward_is_close_to_fp32(gqa):
  config, params = gqa
  toks = tokens(config, (B, T + K))
  fp32 = np.asarray(forward_jit(params, toks, config=config))
  bf16 = forward_jit(params, toks, config=config, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32  # Logits are accumulated in float32.
  bf16 = np.asarray(bf16)
  assert np.isfinite(bf16).all()
  # bf16 keeps 8 mantissa bits: errors of a few percent of the logit scale after 2 layers.
  assert np.abs(bf16 - fp32).max() < 0.1 * np.abs(fp32).max()
  assert np.mean(bf16.argmax(-1) == fp32.argmax(-1)) >= 0.75


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_right_padding_with_valid_mask(gqa, pattern):
  config, params = gqa
  plan = make_plan(config, pattern)
  long_row = tokens(config, (1, T + K), seed=5)
  short_row = tokens(config, (1, T), seed=6)
  padded = jnp.concatenate([short_row, jnp.zeros((1, K), jnp.int32)], axis=1)
  batch = jnp.concatenate([padded, long_row], axis=0)
  valid = jnp.asarray([[1] * T + [0] * K, [1] * (T + K)], bool)
  logits = np.asarray(forward_jit(params, batch, config=config, plan=plan, valid_BxT=valid))
  alone = np.asarray(
    forward_jit(params, jnp.concatenate([short_row, short_row], 0), config=config, plan=plan)
  )
  np.testing.assert_allclose(logits[0, :T], alone[0], atol=ATOL, rtol=0)
  full = np.asarray(
    forward_jit(params, jnp.concatenate([long_row, long_row], 0), config=config, plan=plan)
  )
  np.testing.assert_allclose(logits[1], full[0], atol=ATOL, rtol=0)
  assert np.isfinite(logits).all()  # Padded positions give finite (ignored) logits.


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_left_padded_generation_equals_each_prompt_alone(gqa, pattern):
  """Prompts of different lengths in one batch (start_B): logits and greedy tokens as alone."""
  config, params = gqa
  plan = make_plan(config, pattern)
  lengths = [T, T - 3, 2]
  rows = [tokens(config, (1, n), seed=10 + i)[0] for i, n in enumerate(lengths)]
  start = np.asarray([T - n for n in lengths], np.int32)
  batch = jnp.stack([jnp.pad(r, (T - len(r), 0), constant_values=7) for r in rows])
  logits, _ = prefill_jit(params, batch, config=config, plan=plan, start_B=start)
  gen = generate_greedy(params, batch, config=config, max_new_tokens=K, plan=plan, start_B=start)
  for i, row in enumerate(rows):
    alone_logits, _ = prefill_jit(params, row[None], config=config, plan=plan)
    np.testing.assert_allclose(
      np.asarray(logits[i, start[i] :]), np.asarray(alone_logits[0]), atol=ATOL, rtol=0
    )
    alone = generate_greedy(params, row[None], config=config, max_new_tokens=K, plan=plan)
    np.testing.assert_array_equal(np.asarray(gen[i]), np.asarray(alone[0]))


# make_plan: bad sites, widths and factors.


def test_make_plan_sites_out_of_range():
  config = CONFIGS["gqa"]
  for layer in (2, -1):
    with pytest.raises(ValueError, match=rf"layer {layer} out of range.*layers 0\.\.1"):
      make_plan(config, "2:4", sites=[(layer, "q")])


def test_make_plan_unknown_projection():
  with pytest.raises(ValueError, match=r"unknown projection 'qkv'; valid: q, k, v, o, gate, up"):
    make_plan(CONFIGS["gqa"], "2:4", sites=[(0, "qkv")])


def test_make_plan_sites_string_must_be_all():
  with pytest.raises(ValueError, match=r"sites must be 'all' or \(layer, projection\) pairs"):
    make_plan(CONFIGS["gqa"], "2:4", sites="some")


def test_make_plan_m_must_divide_the_projection_width():
  # d_model 32 is a multiple of 32; d_ff 48, the down projection's input, is not.
  config = LlamaConfig(**{**BASE, "d_ff": 48}, n_heads=4, n_kv_heads=2)
  with pytest.raises(
    ValueError, match=r"16:32.*M=32 must divide the down-projection input width 48"
  ):
    make_plan(config, "16:32")
  with pytest.raises(ValueError, match=r"down-projection input width 48"):
    make_plan(config, "16:32", sites=[(0, "q"), (1, "down")])
  # Without the down projection the pattern fits.
  plan = make_plan(config, "16:32", sites=[(l, p) for l in range(2) for p in PROJECTIONS[:-1]])
  assert (1, "down") not in plan.enabled_sites()
  # q_dim 32 (the o input) with M=64: the error names the first projection that does not fit.
  with pytest.raises(ValueError, match=r"M=64 must divide the q-projection input width 32"):
    make_plan(config, "32:64")


def test_make_plan_bad_pattern():
  with pytest.raises(ValueError, match="1 <= N < M"):
    make_plan(CONFIGS["gqa"], "3:2")


def test_make_plan_factors():
  config = CONFIGS["gqa"]
  f = np.full((2, 32), 2.0, np.float32)
  plan = make_plan(config, "2:4", factors={"q": f})
  np.testing.assert_array_equal(plan.factors["q"], f)
  np.testing.assert_array_equal(plan.factors["k"], np.ones((2, 32)))
  assert plan.factors["down"].shape == (2, config.d_ff)
  with pytest.raises(ValueError, match=r"factors\['q'\] must have shape \(2, 32\), got \(32,\)"):
    make_plan(config, "2:4", factors={"q": np.ones((32,))})


def test_plan_is_a_pytree_with_static_pattern():
  config = CONFIGS["gqa"]
  plan = make_plan(config, "8:16", sites=[(0, "q")])
  leaves, treedef = jax.tree.flatten(plan)
  assert len(leaves) == 2 * len(PROJECTIONS)
  other = make_plan(config, "8:16", sites=[(1, "up")])
  assert jax.tree.structure(other) == treedef
  assert jax.tree.structure(make_plan(config, "2:4")) != treedef


# Compilation: the plan is data.


def _window_nll_compiles() -> int:
  # The jit cache's size (a private but long-standing method of jitted functions).
  if not hasattr(window_nll, "_cache_size"):
    pytest.skip("this jax has no _cache_size() on jitted functions")
  return window_nll._cache_size()


def test_changing_enabled_sites_or_factors_does_not_recompile():
  config = CONFIGS["gqa"]
  params = init_params(config)
  windows = jnp.asarray(make_windows(np.asarray(tokens(config, (40,))), 9, 3)[:2])
  weight = jnp.ones((2,), jnp.float32)
  run = lambda plan: float(
    window_nll(params, windows, weight, plan, config=config, dtype=jnp.float32)[0]
  )
  first = run(make_plan(config, "2:4", sites=[(0, "q")]))
  compiles = _window_nll_compiles()
  second = run(make_plan(config, "2:4", sites=[(1, "down"), (0, "up")]))
  factors = {"gate": np.random.default_rng(0).uniform(0.5, 2, (2, 32)).astype(np.float32)}
  third = run(make_plan(config, "2:4", sites=[(0, "gate")], factors=factors))
  fourth = run(make_plan(config, "2:4", sites=[(0, "gate")]))
  assert _window_nll_compiles() == compiles
  # The plans are really used: different sites or factors give different losses.
  assert len({first, second, third, fourth}) == 4
  # Another N:M is another static pattern: one more compilation.
  run(make_plan(config, "4:8", sites=[(0, "q")]))
  assert _window_nll_compiles() == compiles + 1


def test_perplexity_equals_manual_nll():
  config = CONFIGS["qkv_bias"]
  params = init_params(config)
  windows = make_windows(np.asarray(tokens(config, (60,))), 9, 5)  # 5 windows: a padded batch.
  plan = make_plan(config, "2:4", sites=[(0, "up"), (1, "o")])
  result = perplexity(params, windows, config=config, plan=plan, batch_size=2, show_progress=False)
  logits = forward_jit(params, jnp.asarray(windows[:, :-1]), config=config, plan=plan)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), windows[:, 1:, None], axis=-1).mean()
  assert result.windows == 5 and result.tokens == 5 * 9
  np.testing.assert_allclose(result.nll, nll, rtol=1e-5)
  np.testing.assert_allclose(result.perplexity, math.exp(nll), rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 10), (10,), (3, 1), (2, 3, 10)])
def test_perplexity_rejects_windows_of_a_bad_shape(shape):
  """No window (or not [W, seq_len + 1]) is a ValueError naming windows, not an IndexError."""
  config = CONFIGS["gqa"]
  with pytest.raises(ValueError, match=r"windows must be .*got shape"):
    perplexity(None, np.zeros(shape, np.int32), config=config, show_progress=False)


def test_decode_past_the_cache_is_an_error_not_a_clamped_write(gqa):
  # dynamic_update_slice clamps its index: writing past max_len would silently overwrite the
  # last slot. A concrete length raises; a traced one (under jit) gives NaN logits.
  config, params = gqa
  toks = tokens(config, (B, T + 1))
  _, cache = prefill(params, toks[:, :T], config=config, max_len=T)
  with pytest.raises(ValueError, match=f"the cache holds {T} positions"):
    decode_step(params, toks[:, T:], cache, config=config)
  logits, _ = jax.jit(decode_step, static_argnames="config")(
    params, toks[:, T:], cache, config=config
  )
  assert np.isnan(np.asarray(logits)).all()
  _, roomy = prefill(params, toks[:, :T], config=config, max_len=T + 1)
  fits, _ = jax.jit(decode_step, static_argnames="config")(
    params, toks[:, T:], roomy, config=config
  )
  assert np.isfinite(np.asarray(fits)).all()


def test_sequences_beyond_the_window_are_refused_and_padding_stays_within_it():
  """A windowed model (Mistral v0.1 style) attends fully causally, exact only up to the window:
  longer passes and generations raise; left-padded batches near the limit still run (their
  bucketed padding is capped at the limit)."""
  from amber_jax.eval.generative_tasks import greedy_generate
  from amber_jax.model.presets import init_random_params

  config = dataclasses.replace(TINY_V64_CONFIG, n_layers=1, sliding_window=40)
  params = init_random_params(config, jax.random.key(0), dtype=jnp.float32)
  with pytest.raises(ValueError, match="t=41 exceeds"):
    forward(params, tokens(config, (1, 41)), config=config)
  forward(params, tokens(config, (1, 40)), config=config)
  with pytest.raises(ValueError, match="t=41 exceeds"):
    generate_greedy(params, tokens(config, (1, 36)), config=config, max_new_tokens=6)
  generate_greedy(params, tokens(config, (1, 36)), config=config, max_new_tokens=5)
  # 35 and 20 tokens: the bucket (64) would pass the window; it is capped at 40.
  prompts = [
    list(np.asarray(tokens(config, (1, 35)))[0]),
    list(np.asarray(tokens(config, (1, 20)))[0]),
  ]
  out = greedy_generate(params, prompts, config=config, max_new_tokens=5)
  alone = generate_greedy(params, jnp.asarray([prompts[0]]), config=config, max_new_tokens=5)
  assert out[0] == [int(v) for v in np.asarray(alone)[0]]
