"""Multiple-choice evaluation: BIG-bench loading, log-likelihood scoring, acc / acc_norm."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_TOKENIZER_CONFIG as CFG
from conftest import random_params

from amber_jax.core.scores import model_factors
from amber_jax.data.bigbench import (
  BIGBENCH_TASKS,
  BigBenchTaskError,
  MCExample,
  MCTask,
  bigbench_task_path,
  few_shot_context,
  load_bigbench_task,
)
from amber_jax.eval.multiple_choice import (
  encode_request,
  evaluate_task,
  mean_stderr,
  score_requests,
)
from amber_jax.io.tokenizer import load_hf_tokenizer
from amber_jax.plan.schema import make_plan

TOKENIZER_FILE = Path(__file__).parent / "fixtures" / "hf" / "tiny-llama" / "tokenizer.json"
V = CFG.vocab_size  # >= the tiny tokenizer's 435 ids


@pytest.fixture(scope="module")
def tok():
  return load_hf_tokenizer(TOKENIZER_FILE)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, np.random.default_rng(0))


def _write_task(path: Path, examples, **fields) -> Path:
  path.write_text(json.dumps({"name": "toy", **fields, "examples": examples}))
  return path


# --- loader -----------------------------------------------------------------------------------


def test_loader_builds_bigbench_prompts(tmp_path):
  f = _write_task(
    tmp_path / "t.json",
    [{"input": "2+2?", "target_scores": {"4": 1, "5": 0.0}}],
    task_prefix="Math.",
    append_choices_to_input=False,
  )
  task = load_bigbench_task(f)
  (ex,) = task.examples
  assert task.name == "toy"
  assert ex.context == "Math.\nQ: 2+2?\nA:"
  assert ex.choices == ("4", "5") and ex.continuations == (" 4", " 5") and ex.gold == (0,)
  # BIG-bench's default appends the choices to the input.
  f2 = _write_task(tmp_path / "t2.json", [{"input": "x", "target_scores": {"a": 0, "b": 1}}])
  assert load_bigbench_task(f2).examples[0].context == "\nQ: x\n  choice: a\n  choice: b\nA:"


@pytest.mark.parametrize(
  "content,message",
  [
    ('{"examples": [', "malformed JSON"),
    ('{"name": "x"}', "missing 'examples'"),
    ('{"examples": [{"target_scores": {"a": 1}}]}', "example 0: missing 'input'"),
    (
      '{"examples": [{"input": "q", "target_scores": {"a": 1}}, {"input": "q"}]}',
      "example 1: missing 'target_scores'",
    ),
    ('{"examples": [{"input": "q", "target_scores": {}}]}', "example 0: empty choice list"),
    (
      '{"examples": [{"input": "q", "target_scores": {"a": 1}}, '
      '{"input": "q", "target_scores": {"a": 0, "b": 0.5}}]}',
      "example 1: no correct choice",
    ),
    ('{"examples": [{"input": "q", "target_scores": {"a": "1"}}]}', "example 0: non-numeric"),
  ],
)
def test_loader_rejects_bad_files(tmp_path, content, message):
  f = tmp_path / "bad_task.json"
  f.write_text(content)
  with pytest.raises(BigBenchTaskError, match=message) as e:
    load_bigbench_task(f)
  assert "bad_task.json" in str(e.value)


def test_real_bigbench_tasks_load():
  assert len(BIGBENCH_TASKS) == 10 and "date_understanding" in BIGBENCH_TASKS
  task = load_bigbench_task(bigbench_task_path("date_understanding"))
  assert task.name == "date_understanding" and len(task.examples) == 369
  for ex in task.examples:
    assert 5 <= len(ex.choices) <= 6 and len(ex.gold) == 1 and 0 <= ex.gold[0] < len(ex.choices)
    assert ex.context.endswith("\nA:")
  winowhy = load_bigbench_task(bigbench_task_path("winowhy"))
  assert len(winowhy.examples) == 2865
  with pytest.raises(KeyError):
    bigbench_task_path("nope")


def test_few_shot_context_is_deterministic():
  task = load_bigbench_task(bigbench_task_path("sports_understanding"))
  a = few_shot_context(task, 5, 3, seed=1)
  assert a == few_shot_context(task, 5, 3, seed=1)
  assert a != few_shot_context(task, 5, 3, seed=2)
  assert a.startswith(task.task_prefix) and a.endswith(task.examples[5].query)
  assert task.examples[5].query not in a[: -len(task.examples[5].query)]  # not its own shot
  assert a.count("Plausible/implausible?") == 4
  assert few_shot_context(task, 5, 0) == task.examples[5].context


# --- scoring with controlled logits ---------------------------------------------------------


def test_acc_and_acc_norm_with_uniform_logits(tok):
  """Uniform logits: loglik = -n_tokens * log V, so short choices win acc, long ones acc_norm."""
  uniform = lambda tokens, positions, mask: jnp.zeros(tokens.shape + (V,), jnp.float32)
  short, long = "a", "abcdefgh"  # 1 token, 1 byte / 7 tokens, 8 bytes
  ex = lambda gold: MCExample(context="\nA:", choices=(short, long), gold=(gold,), query="\nA:")
  task = MCTask(name="toy", examples=(ex(0), ex(0), ex(1)))
  scores = score_requests(
    None, [("\nA:", " " + short), ("\nA:", " " + long)], config=None, tokenizer=tok,
    logits_fn=uniform, show_progress=False,
  )  # fmt: skip
  assert [s[1] for s in scores] == [1, 7]
  np.testing.assert_allclose([s[0] for s in scores], [-math.log(V), -7 * math.log(V)], rtol=1e-5)
  out = evaluate_task(
    None, task, config=None, tokenizer=tok, logits_fn=uniform, show_progress=False
  )
  assert out["n"] == 3
  assert out["acc"] == pytest.approx(2 / 3) and out["acc_norm"] == pytest.approx(1 / 3)
  assert out["acc_stderr"] == pytest.approx(np.std([1, 1, 0], ddof=1) / math.sqrt(3))
  assert out["acc_norm_stderr"] == pytest.approx(out["acc_stderr"])


def test_acc_norm_divides_by_characters_and_acc_bytes_by_bytes(tok):
  """As lm-eval: acc_norm normalizes by len(choice) in characters, acc_bytes by UTF-8 bytes.

  Uniform logits: loglik = -n_tokens * log V. " q" is 2 tokens for 1 character (1 byte);
  " 日本" is 7 tokens for 2 characters (6 bytes). Per character "q" wins (2 < 3.5), per byte
  "日本" wins (7/6 < 2).
  """
  uniform = lambda tokens, positions, mask: jnp.zeros(tokens.shape + (V,), jnp.float32)
  ascii_, cjk = "q", "日本"
  scores = score_requests(
    None, [("\nA:", " " + ascii_), ("\nA:", " " + cjk)], config=None, tokenizer=tok,
    logits_fn=uniform, show_progress=False,
  )  # fmt: skip
  assert [s[1] for s in scores] == [2, 7]
  ex = lambda gold: MCExample(context="\nA:", choices=(ascii_, cjk), gold=(gold,), query="\nA:")
  task = MCTask(name="toy", examples=(ex(0), ex(0), ex(1)))
  out = evaluate_task(
    None, task, config=None, tokenizer=tok, logits_fn=uniform, show_progress=False
  )
  assert out["correct"] == [1.0, 1.0, 0.0] and out["acc"] == pytest.approx(2 / 3)
  assert out["correct_norm"] == [1.0, 1.0, 0.0] and out["acc_norm"] == pytest.approx(2 / 3)
  assert out["correct_bytes"] == [0.0, 0.0, 1.0] and out["acc_bytes"] == pytest.approx(1 / 3)
  assert out["acc_bytes_stderr"] == pytest.approx(np.std([0, 0, 1], ddof=1) / math.sqrt(3))
  # The packaged BIG-bench tasks have ASCII choices only: there acc_norm equals acc_bytes.
  for name in BIGBENCH_TASKS:
    task = load_bigbench_task(bigbench_task_path(name))
    assert all(c.isascii() for ex in task.examples for c in ex.choices), name


def test_bigram_logits_give_known_loglik_and_greedy(tok):
  ctx, good, bad = "\nA:", " abcdefgh", " the cat"
  ids = tok.encode(ctx + good, add_special_tokens=False).ids
  table = np.zeros((V, V), np.float32)
  for p, n in zip(ids[:-1], ids[1:], strict=True):
    table[p, n] = 10.0
  bigram = lambda tokens, positions, mask: jnp.asarray(table)[tokens]
  (g_ll, g_n, g_greedy), (b_ll, b_n, b_greedy) = score_requests(
    None, [(ctx, good), (ctx, bad)], config=None, tokenizer=tok, logits_fn=bigram,
    batch_size=2, show_progress=False,
  )  # fmt: skip
  step = 10.0 - math.log(math.exp(10.0) + V - 1)
  assert g_n == 7 and g_greedy and g_ll == pytest.approx(7 * step, abs=1e-5)
  assert not b_greedy and b_ll < g_ll and b_n == 4


def test_encode_request_moves_trailing_space_and_keeps_tail(tok):
  ctx, cont = encode_request(tok, "\nA: ", "abcdefgh")
  assert ctx == tok.encode("\nA:").ids and ctx + cont == tok.encode("\nA: abcdefgh").ids
  with pytest.raises(ValueError, match="prefix_token_id"):
    encode_request(tok, "", " a")
  assert encode_request(tok, "", " a", prefix_ids=[0]) == ([0], [259])


def test_mean_stderr():
  assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
  assert math.isnan(mean_stderr([1.0]))


# --- the real (tiny random) model -----------------------------------------------------------


def _requests_of_many_lengths():
  words = "the quick brown fox jumps over a lazy dog and runs far away".split()
  reqs = []
  for i, n in enumerate([1, 3, 90, 7, 40, 2, 150, 12, 25]):
    ctx = " ".join(words[(i + j) % len(words)] for j in range(n))
    reqs.append((ctx, " " + " ".join(words[i % 5 : i % 5 + 1 + i % 3])))
  return reqs


@pytest.mark.parametrize("sparse", [False, True])
def test_padding_does_not_change_scores(params, tok, sparse):
  reqs = _requests_of_many_lengths()
  plan = None
  if sparse:
    sites = [(0, "q"), (0, "down"), (1, "gate"), (1, "o")]
    plan = make_plan(CFG, "2:4", sites=sites, factors=model_factors(params, "naive"), impl="xla")
  kw = dict(config=CFG, tokenizer=tok, plan=plan, show_progress=False)
  one = score_requests(params, reqs, batch_size=1, **kw)
  for bs in (8, 4):
    batched = score_requests(params, reqs, batch_size=bs, **kw)
    np.testing.assert_allclose([s[0] for s in batched], [s[0] for s in one], atol=1e-4)
    assert [s[1:] for s in batched] == [s[1:] for s in one]
  assert all(np.isfinite(s[0]) and s[0] < 0 for s in one)


def test_evaluate_task_speed_batched_vs_one_at_a_time(params, tok):
  """Prints examples/s (batch 8 vs batch 1) on the tiny model; no timing asserts."""
  task = load_bigbench_task(bigbench_task_path("sports_understanding"))
  task = MCTask(name=task.name, examples=task.examples[:48], task_prefix=task.task_prefix)
  rates = {}
  for bs in (8, 1):
    kw = dict(config=CFG, tokenizer=tok, batch_size=bs, show_progress=False)
    first = evaluate_task(params, task, **kw)  # compiles the bucket shapes
    start = time.perf_counter()
    again = evaluate_task(params, task, **kw)
    rates[bs] = len(task.examples) / (time.perf_counter() - start)
    assert again == first and first["n"] == 48 and 0 <= first["acc"] <= 1
  print(f"\ntiny model, {len(task.examples)} examples x 2 choices: batched(8) {rates[8]:.1f} ex/s, "
        f"one-at-a-time {rates[1]:.1f} ex/s")  # fmt: skip


def _questions_sharing_contexts():
  """Requests as BIG-bench makes them: each context with several choices of 1-5 tokens."""
  words = "the quick brown fox jumps over a lazy dog and runs far away".split()
  reqs = []
  for i, n in enumerate([4, 30, 2, 60, 9]):
    ctx = " ".join(words[(i + j) % len(words)] for j in range(n)) + "\nA:"
    for k in range(2 + i % 3):
      reqs.append((ctx, " " + " ".join(words[(i + k) % 9 : (i + k) % 9 + 1 + k])))
  return reqs


@pytest.mark.parametrize("kind", ["dense", "sparse", "w8a8"])
def test_packed_rows_equal_one_row_per_request(params, tok, kind):
  """Choices packed behind one shared context score as they do alone (dense, N:M, W8A8)."""
  from amber_jax.calibrate.stats import collect_input_absmax
  from amber_jax.plan.quant_state import build_quant_state

  reqs = _questions_sharing_contexts()
  plan = None
  if kind == "sparse":
    sites = [(0, "q"), (0, "down"), (1, "gate"), (1, "o")]
    plan = make_plan(CFG, "2:4", sites=sites, factors=model_factors(params, "robust"), impl="xla")
  elif kind == "w8a8":
    calib = np.asarray([tok.encode(reqs[3][0] * 3).ids[:16]] * 2, np.int32)
    absmax = collect_input_absmax(params, calib, config=CFG, show_progress=False)
    state, _ = build_quant_state(params, CFG, absmax, smooth="smoothquant")
    plan = make_plan(CFG, None).replace(quant=state)
  kw = dict(config=CFG, tokenizer=tok, plan=plan, show_progress=False)
  alone = score_requests(params, reqs, batch_size=1, pack=False, **kw)
  packed = score_requests(params, reqs, batch_size=3, **kw)
  err = np.max(np.abs(np.array([s[0] for s in packed]) - [s[0] for s in alone]))
  print(f"{kind}: {len(reqs)} requests in 5 packed rows, max |loglik diff| {err:.1e}")
  assert err < 1e-4
  assert [s[1:] for s in packed] == [s[1:] for s in alone]
  assert len({s[1] for s in alone}) > 2  # continuations of several lengths were packed


def test_packed_rows_respect_max_length(params, tok):
  """A group that would overflow max_length is split; a request too long alone is truncated."""
  reqs = _questions_sharing_contexts()
  kw = dict(config=CFG, tokenizer=tok, show_progress=False, max_length=24)
  alone = score_requests(params, reqs, batch_size=1, pack=False, **kw)
  packed = score_requests(params, reqs, batch_size=4, **kw)
  np.testing.assert_allclose([s[0] for s in packed], [s[0] for s in alone], atol=1e-4)
