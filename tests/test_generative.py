"""Generative evaluation: task loading, left-padded batched greedy answers, exact match."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_multiple_choice import CFG, TOKENIZER_FILE
from test_multiple_choice import params as params  # noqa: F401  (the tiny model fixture)

from amber_jax.data.bigbench import BigBenchTaskError, bigbench_task_path, load_bigbench_task
from amber_jax.eval.generative_tasks import (
  GenExample,
  GenTask,
  cut_answer,
  evaluate_generation,
  generative_task,
  greedy_continuations,
  load_generative_task,
)
from amber_jax.io.tokenizer import load_hf_tokenizer
from amber_jax.model import generate_greedy
from amber_jax.plan.schema import make_plan


@pytest.fixture(scope="module")
def tok():
  return load_hf_tokenizer(TOKENIZER_FILE)


PROMPTS = ["the cat", "a quick brown fox jumps over the lazy dog and", "x", "runs far away to the"]


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_batched_continuations_equal_each_prompt_alone(params, tok, pattern):  # noqa: F811
  plan = make_plan(CFG, pattern)
  ids = [tok.encode(p).ids for p in PROMPTS]
  batched = greedy_continuations(
    params, ids, config=CFG, max_new_tokens=5, plan=plan, batch_size=3, show_progress=False
  )
  for p, got in zip(ids, batched, strict=True):
    alone = generate_greedy(
      params, np.asarray([p], np.int32), config=CFG, max_new_tokens=5, plan=plan
    )
    assert got == np.asarray(alone)[0].tolist()


def test_exact_match_and_agreement_with_known_answers(params, tok):  # noqa: F811
  """Answers taken from the model itself (cut at the stop string) must all match; wrong ones
  must not; agreement with a reference counts equal answers."""
  ids = [tok.encode(p).ids for p in PROMPTS]
  gen = greedy_continuations(params, ids, config=CFG, max_new_tokens=6, show_progress=False)
  own = [cut_answer(tok.decode(g), ["\n"]) for g in gen]
  assert all(own), "the tiny model produced an empty answer; pick other prompts"
  answers = [(a,) if i % 2 == 0 else ("definitely wrong",) for i, a in enumerate(own)]
  task = GenTask("toy", tuple(GenExample(p, a) for p, a in zip(PROMPTS, answers, strict=True)))
  out = evaluate_generation(
    params, task, config=CFG, tokenizer=tok, max_new_tokens=6, batch_size=2,
    reference=own[:2] + ["other", "other"], show_progress=False,
  )  # fmt: skip
  assert out["answers"] == own
  assert out["exact_match"] == pytest.approx(0.5) and out["n"] == 4
  assert out["exact_match_stderr"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
  assert out["agreement"] == pytest.approx(0.5)
  print(f"\ntiny model answers: {own}")


def test_answers_are_cut_at_the_first_of_the_eos_ids(params, tok):  # noqa: F811
  """Text generated after an end-of-text id does not join the answer; any of several ids ends
  it. The tiny random model never says </s>, so a token it does generate mid-answer plays EOS."""
  ids = [tok.encode(p).ids for p in PROMPTS]
  gen = greedy_continuations(params, ids, config=CFG, max_new_tokens=8, show_progress=False)
  k, eos = next((k, t) for k, t in enumerate(gen[0]) if k >= 2 and t not in gen[0][:k])
  unused = next(t for t in range(CFG.vocab_size) if all(t not in g for g in gen))
  task = GenTask("toy", tuple(GenExample(p, ("x",)) for p in PROMPTS))
  kw = dict(config=CFG, tokenizer=tok, max_new_tokens=8, stop=(), show_progress=False)
  whole = evaluate_generation(params, task, **kw)["answers"]
  assert whole == [cut_answer(tok.decode(g), ()) for g in gen]
  for eos_ids in (eos, [unused, eos], (eos, unused)):
    got = evaluate_generation(params, task, eos_token_ids=eos_ids, **kw)["answers"]
    want = [cut_answer(tok.decode(g[: g.index(eos)] if eos in g else g), ()) for g in gen]
    assert got == want
  assert got[0] == cut_answer(tok.decode(gen[0][:k]), ()) and len(got[0]) < len(whole[0])
  assert evaluate_generation(params, task, eos_token_ids=[unused], **kw)["answers"] == whole
  for bad in (CFG.vocab_size, [2, -1], "2", [2.0], True):
    with pytest.raises(ValueError, match="eos_token_ids"):
      evaluate_generation(params, task, eos_token_ids=bad, **kw)


def test_cut_answer():
  assert cut_answer("  plausible\nQ: next", ["\n"]) == "plausible"
  assert cut_answer(" 05/01/2021. Q", ["\n", "."]) == "05/01/2021"
  assert cut_answer("abc", []) == "abc"


def test_multiple_choice_task_as_generative():
  mc = load_bigbench_task(bigbench_task_path("sports_understanding"))
  task = generative_task(mc, num_fewshot=2, seed=0)
  ex, mc0 = task.examples[0], mc.examples[0]
  assert ex.answers == tuple(mc0.choices[g] for g in mc0.gold)
  assert ex.prompt.endswith(mc0.query) and ex.prompt.count("Statement:") == 3
  assert load_generative_task(bigbench_task_path("sports_understanding")).examples[0].answers


def test_generative_task_file(tmp_path):
  f = tmp_path / "gen.json"
  examples = [{"input": f"{i}+1?", "target": [str(i + 1), f"{i + 1}.0"]} for i in range(4)]
  examples[0]["target"] = "1"
  f.write_text(json.dumps({"name": "add", "task_prefix": "Add.", "examples": examples}))
  task = load_generative_task(f, num_fewshot=1, seed=0)
  assert task.name == "add" and task.examples[0].answers == ("1",)
  assert task.examples[2].prompt.startswith("Add.\nQ: ") and task.examples[2].prompt.endswith(
    "\nQ: 2+1?\nA:"
  )
  assert task.examples[2].prompt.count("\nA: ") == 1  # one solved shot


@pytest.mark.parametrize(
  "examples,message",
  [
    ([], "non-empty list"),
    ([{"target": "a"}], "example 0: needs a non-empty string 'input'"),
    ([{"input": "q", "target": []}], "example 0: 'target' must be"),
    ([{"input": "q", "target": "a"}, {"input": "q", "target": ["a", " "]}], "example 1: every"),
  ],
)
def test_bad_generative_task_files(tmp_path, examples, message):
  f = tmp_path / "bad.json"
  f.write_text(json.dumps({"examples": examples}))
  with pytest.raises(BigBenchTaskError, match=message) as e:
    load_generative_task(f)
  assert str(f) in str(e.value)
  f.write_text("{not json")
  with pytest.raises(BigBenchTaskError, match="not a readable JSON"):
    load_generative_task(f)


def test_bad_arguments(params, tok):  # noqa: F811
  task = GenTask("toy", (GenExample("the", ("cat",)),))
  with pytest.raises(ValueError, match="max_new_tokens"):
    evaluate_generation(params, task, config=CFG, tokenizer=tok, max_new_tokens=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    evaluate_generation(params, task, config=CFG, tokenizer=tok, max_new_tokens=10**6)
  with pytest.raises(ValueError, match="reference"):
    evaluate_generation(params, task, config=CFG, tokenizer=tok, reference=[])
  with pytest.raises(ValueError, match="batch_size"):
    greedy_continuations(params, [[1]], config=CFG, max_new_tokens=2, batch_size=0)
