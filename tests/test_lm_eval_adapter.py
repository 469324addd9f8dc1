"""lm-evaluation-harness adapter: AmberLM against our own scoring, and lm-eval runs on local tasks.

Everything runs offline on tiny models (a random 2-layer model with the tiny HF fixture's
tokenizer, and the tiny HF checkpoint itself for the ``model_args`` path); one test marked
``real_model`` runs SmolLM2-135M through lm-eval.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import SMALL_TOKENIZER_CONFIG as CFG  # noqa: E402
from conftest import random_params  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import amber_jax.eval.generative_tasks as generative  # noqa: E402
from amber_jax.data.bigbench import MCExample, MCTask  # noqa: E402
from amber_jax.eval.generative_tasks import greedy_generate  # noqa: E402
from amber_jax.eval.lm_eval_adapter import AmberLM, rolling_windows  # noqa: E402
from amber_jax.eval.multiple_choice import evaluate_task, score_requests  # noqa: E402
from amber_jax.io.tokenizer import load_hf_tokenizer  # noqa: E402
from amber_jax.model import forward, generate_greedy  # noqa: E402
from amber_jax.plan.schema import make_plan  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"
V = CFG.vocab_size  # >= the tiny tokenizer's 435 ids
BOS, EOS = 1, 2  # the tiny tokenizer's <s> and </s>
TEXT = (
  "The quick brown fox jumps over the lazy dog. A small model reads this sentence twice, and "
  "then a third time, so that the rolling windows have something to cut."
)


@pytest.fixture(scope="module")
def tok():
  return load_hf_tokenizer(FIXTURE / "tokenizer.json")


@pytest.fixture(scope="module")
def params():
  # Larger weights than an initialisation (0.2): peaked distributions, so greedy choices and
  # accuracies are not decided by rounding.
  return random_params(CFG, np.random.default_rng(0))


@pytest.fixture(scope="module")
def plans(params, tok):
  from amber_jax.calibrate.stats import collect_input_absmax
  from amber_jax.plan.quant_state import build_quant_state

  calib = np.asarray([tok.encode(TEXT).ids[:16]] * 2, np.int32)
  absmax = collect_input_absmax(params, calib, config=CFG, show_progress=False)
  state, _ = build_quant_state(params, CFG, absmax, smooth="smoothquant")
  return {
    "dense": None,
    "sparse": make_plan(CFG, "8:16"),
    "w8a8": make_plan(CFG, None).replace(quant=state),
  }


def _lm(params, tok, plan=None, **kw):
  kw = {"batch_size": 4, "prefix_token_id": BOS, "eot_token_id": EOS, **kw}
  return AmberLM(params, CFG, tok, plan, show_progress=False, **kw)


_fwd = jax.jit(forward, static_argnames=("config",))


def _direct_logprobs(params, plan, inputs, targets) -> np.ndarray:
  """log p(targets[i] | inputs[:i+1]) from one plain ``forward`` pass (float64 log-softmax)."""
  logits = np.asarray(_fwd(params, np.asarray([inputs], np.int32), config=CFG, plan=plan))[0]
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return logp[np.arange(len(targets)), targets]


# --- loglikelihood ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "sparse", "w8a8"])
def test_loglikelihood_equals_score_requests(params, tok, plans, kind):
  plan = plans[kind]
  lm = _lm(params, tok, plan)
  reqs = [("The sky is", " blue"), ("Fish can ", "swim"), ("", "hello world"), ("2+2=", " 4")]
  got = lm.loglikelihood(reqs)
  kw = dict(config=CFG, tokenizer=tok, plan=plan, show_progress=False, batch_size=4)
  with_ctx = score_requests(params, [reqs[i] for i in (0, 1, 3)], **kw)
  empty = score_requests(params, [reqs[2]], prefix_token_id=BOS, **kw)
  want = [with_ctx[0], with_ctx[1], empty[0], with_ctx[2]]
  assert [g[1] for g in got] == [w[2] for w in want]
  diff = max(abs(g[0] - w[0]) for g, w in zip(got, want, strict=True))
  # An independent check of the empty-context rule: log p(continuation | BOS) from forward.
  ids = [BOS, *tok.encode("hello world", add_special_tokens=False).ids]
  direct = _direct_logprobs(params, plan, ids[:-1], ids[1:]).sum()
  print(
    f"{kind}: max |adapter - score_requests| {diff:.1e}, empty context vs forward "
    f"{abs(got[2][0] - direct):.1e}"
  )
  assert diff == 0.0
  assert abs(got[2][0] - direct) < 1e-4


def test_empty_context_without_prefix_token_is_a_clear_error(params, tok):
  lm = _lm(params, tok, prefix_token_id=None)  # the tiny tokenizer adds no special tokens
  assert lm.loglikelihood([("a", " b")])  # a context of its own needs no prefix
  with pytest.raises(ValueError, match="prefix_token_id"):
    lm.loglikelihood([("", "b")])
  with pytest.raises(ValueError, match="prefix_token_id"):
    lm.loglikelihood_rolling([("some text",)])


# --- loglikelihood_rolling --------------------------------------------------------------------


def test_rolling_windows_score_every_token_once():
  ids = list(range(10, 50))
  windows = rolling_windows(ids, 7, 16)
  assert windows[0][0] == [7]
  assert [t for _, scored in windows for t in scored] == ids
  assert all(len(ctx) + len(scored) - 1 <= 16 for ctx, scored in windows)
  assert rolling_windows([], 7, 16) == []


@pytest.mark.parametrize("kind", ["dense", "sparse", "w8a8"])
def test_rolling_equals_direct_forward(params, tok, plans, kind):
  """The sum of token log-probs of each window from ``forward``; several windows and one."""
  plan = plans[kind]
  ids = tok.encode(TEXT, add_special_tokens=False).ids
  assert len(ids) > 40
  lm = _lm(params, tok, plan, max_length=24)
  got = lm.loglikelihood_rolling([(TEXT,), ("",), ("short one",)])
  want = 0.0
  for ctx, scored in rolling_windows(ids, BOS, 24):
    full = [*ctx, *scored]
    want += _direct_logprobs(params, plan, full[:-1], full[1:])[-len(scored) :].sum()
  short = tok.encode("short one", add_special_tokens=False).ids
  want_short = _direct_logprobs(params, plan, [BOS, *short[:-1]], short).sum()
  # max_length above the length: one window, the whole text in one pass.
  whole = _lm(params, tok, plan, max_length=256).loglikelihood_rolling([(TEXT,)])[0]
  want_whole = _direct_logprobs(params, plan, [BOS, *ids[:-1]], ids).sum()
  errs = [abs(got[0] - want), abs(got[2] - want_short), abs(whole - want_whole)]
  print(
    f"{kind}: {len(ids)} tokens in {len(rolling_windows(ids, BOS, 24))} windows; "
    f"max |adapter - forward| {max(errs):.1e}"
  )
  assert got[1] == 0.0
  assert max(errs) < 1e-4
  assert abs(whole - got[0]) > 1e-3  # truncated windows do see less context


# --- generate_until ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "sparse", "w8a8"])
def test_greedy_generate_equals_generate_greedy(params, tok, plans, kind):
  """Padded prefill + chunked decode give the tokens of model.generate_greedy."""
  plan = plans[kind]
  prompts = [tok.encode(s).ids[:6] for s in ("Once upon a time", "A small model reads")]
  want = np.asarray(
    generate_greedy(params, np.asarray(prompts, np.int32), config=CFG, max_new_tokens=10, plan=plan)
  )
  # Three decode calls of 4 steps (9 steps asked): the chunks join up, the last is trimmed.
  got = greedy_generate(params, prompts, config=CFG, max_new_tokens=10, plan=plan, chunk=4)
  np.testing.assert_array_equal(np.asarray(got), want)


def _reference(params, plan, tok, context, n, until):
  ids = tok.encode(context).ids
  out = [
    int(x)
    for x in np.asarray(
      generate_greedy(params, np.asarray([ids], np.int32), config=CFG, max_new_tokens=n, plan=plan)
    )[0]
  ]
  if EOS in out:
    out = out[: out.index(EOS)]
  text = tok.decode(out, skip_special_tokens=True)
  for s in until:
    text = text.split(s)[0]
  return text


def test_generate_until_matches_generate_greedy_and_stops(params, tok, plans, monkeypatch):
  plan = plans["sparse"]
  lm = _lm(params, tok, plan)
  contexts = ["The quick brown fox", "Once upon a time"]
  full = lm.generate_until([(c, {"max_gen_toks": 40, "do_sample": False}) for c in contexts])
  for c, text in zip(contexts, full, strict=True):
    assert text == _reference(params, plan, tok, c, 40, [])
  # A stop string from the first generation, first seen in tokens 2..16: the text is cut before
  # it, and decoding ends after the first chunk of 16 steps instead of running all three.
  (ids,) = greedy_generate(
    params, [tok.encode(contexts[0]).ids], config=CFG, max_new_tokens=40, plan=plan
  )
  stop = next(
    piece
    for k in range(2, 17)
    if (piece := tok.decode([ids[k]]).strip()).isalnum() and piece not in tok.decode(ids[:k])
  )
  calls = []
  real = generative._decode_chunk
  monkeypatch.setattr(generative, "_decode_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
  (cut,) = lm.generate_until([(contexts[0], {"until": [stop], "max_gen_toks": 40})])
  assert cut == full[0].split(stop)[0] and len(cut) < len(full[0])
  assert len(calls) == 1
  calls.clear()
  lm.generate_until([(contexts[0], {"max_gen_toks": 40})])
  assert len(calls) == 3
  # max_gen_toks and a long context: the context keeps its last max_length - max_gen_toks tokens.
  small = _lm(params, tok, plan, max_length=12)
  (out,) = small.generate_until([(TEXT, {"max_gen_toks": 4, "until": []})])
  ids = tok.encode(TEXT).ids[-8:]
  want = [
    int(x)
    for x in np.asarray(
      generate_greedy(params, np.asarray([ids], np.int32), config=CFG, max_new_tokens=4, plan=plan)
    )[0]
  ]
  want = want[: want.index(EOS)] if EOS in want else want
  assert out == tok.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize(
  "gen_kwargs,message",
  [
    ({"do_sample": True, "temperature": 0.7}, "sampling was requested"),
    ({"temperature": 0.7}, "sampling was requested"),
    ({"num_beams": 4}, "num_beams=4"),
    ({"repetition_penalty": 1.2}, "unsupported gen_kwargs"),
    ({"until": 3}, "until must be"),
    ({"max_gen_toks": 0}, "max_gen_toks must be >= 1"),
    ({"max_gen_toks": 4096}, "leaves no room"),
  ],
)
def test_generate_until_rejects_bad_requests(params, tok, gen_kwargs, message):
  lm = _lm(params, tok, max_length=64)
  with pytest.raises(ValueError, match=message):
    lm.generate_until([("fine", {"max_gen_toks": 2}), ("hello", gen_kwargs)])


def test_generate_until_stops_at_any_of_several_eos_ids(params, tok, plans, monkeypatch):
  """A list of EOS ids (as Llama-3-Instruct's [128001, 128008, 128009]): generation stops at
  any of them and the text is cut before the first. The tiny random model never says </s>, so
  a token it generates mid-text plays one of the EOS ids."""
  plan = plans["sparse"]
  context = "The quick brown fox"
  ids = greedy_generate(
    params, [tok.encode(context).ids], config=CFG, max_new_tokens=40, plan=plan
  )[0]
  k, eos = next(
    (k, t)
    for k, t in enumerate(ids)
    if 2 <= k < 16
    and t not in ids[:k]
    and tok.decode([t], skip_special_tokens=False) not in tok.decode(ids[:k])
  )
  unused = next(t for t in range(tok.get_vocab_size()) if t not in ids)
  calls = []
  real = generative._decode_chunk
  monkeypatch.setattr(generative, "_decode_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
  req = [(context, {"max_gen_toks": 40, "until": []})]
  (whole,) = _lm(params, tok, plan, eot_token_id=unused).generate_until(req)
  assert whole == tok.decode(ids, skip_special_tokens=True) and len(calls) == 3
  for eos_ids in ([unused, eos], [eos, unused]):
    calls.clear()
    lm = _lm(params, tok, plan, eot_token_id=eos_ids)
    assert lm.eos_token_ids == tuple(eos_ids) and lm.eot_token_id == eos_ids[0]
    (cut,) = lm.generate_until(req)
    assert cut == tok.decode(ids[:k], skip_special_tokens=True) and len(cut) < len(whole)
    assert len(calls) == 1  # stopped after the first chunk of decode steps
  for bad, message in (("2", "eot_token_id must be"), ([2, 10**6], "outside the tokenizer")):
    with pytest.raises(ValueError, match=message):
      _lm(params, tok, plan, eot_token_id=bad)


def test_special_token_ids_keep_every_eos_id(tmp_path, offline):
  """generation_config's list of EOS ids overrides config.json's one; from_model keeps all."""
  from amber_jax.eval.lm_eval_adapter import special_token_ids

  llama3 = tmp_path / "llama3"
  llama3.mkdir()
  (llama3 / "config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128009}))
  (llama3 / "generation_config.json").write_text(
    json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
  )
  assert special_token_ids(llama3) == (128000, (128001, 128008, 128009))
  (llama3 / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
  with pytest.raises(ValueError, match="eos_token_id"):
    special_token_ids(llama3)
  model = tmp_path / "tiny"
  shutil.copytree(FIXTURE, model)
  (model / "generation_config.json").write_text(
    json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]})
  )
  assert special_token_ids(model) == (1, (2, 7))
  lm = AmberLM.from_model(str(model), cache_dir=tmp_path / "cache", log=lambda *a: None)
  assert lm.prefix_token_id == 1 and lm.eot_token_id == 2 and lm.eos_token_ids == (2, 7)


def test_explicit_greedy_with_temperature_is_greedy(params, tok):
  """lm-eval's rule: do_sample=False means greedy, whatever the temperature says."""
  lm = _lm(params, tok)
  a = lm.generate_until([("hello", {"do_sample": False, "temperature": 0.7, "max_gen_toks": 3})])
  assert a == lm.generate_until([("hello", {"max_gen_toks": 3, "top_p": 0.9})])


# --- lm-eval end to end on local tasks --------------------------------------------------------

MC_DOCS = [
  {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
  {"question": "Fish live in", "choices": ["water", "trees"], "label": 0},
  {"question": "Two plus two is", "choices": ["three", "four", "five"], "label": 1},
  {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
  {"question": "Snow is", "choices": ["white", "black", "red", "loud"], "label": 0},
  # Per character (lm-eval's acc_norm) the random tiny model prefers "Japan", per UTF-8 byte
  # (lm-eval's acc_bytes) the 5-character, 15-byte "こんにちは".
  {"question": "Tokyo is in", "choices": ["Japan", "こんにちは"], "label": 0},
]
GEN_DOCS = [{"prompt": "The quick brown fox"}, {"prompt": "Once upon a time"}]
ROLLING_DOCS = [{"text": TEXT}, {"text": "A short document of a few words."}]


def _write_tasks(root: Path, gen_answers: list[str]) -> None:
  data = {
    "mc": MC_DOCS,
    "gen": [{**d, "answer": a} for d, a in zip(GEN_DOCS, gen_answers, strict=True)],
    "rolling": ROLLING_DOCS,
  }
  common = {"test_split": "test", "dataset_path": "json", "metadata": {"version": 1.0}}
  tasks = {
    "mc": {
      "output_type": "multiple_choice",
      "doc_to_text": "{{question}}",
      "doc_to_choice": "{{choices}}",
      "doc_to_target": "{{label}}",
      "metric_list": [{"metric": m} for m in ("acc", "acc_norm", "acc_bytes")],
    },
    "gen": {
      "output_type": "generate_until",
      "doc_to_text": "{{prompt}}",
      "doc_to_target": "{{answer}}",
      "generation_kwargs": {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 6},
      "metric_list": [{"metric": "exact_match"}],
    },
    "rolling": {
      "output_type": "loglikelihood_rolling",
      "doc_to_text": "",
      "doc_to_target": "{{text}}",
      "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity")],
    },
  }
  for name, docs in data.items():
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    kwargs = {"data_files": {"test": str(path)}, "cache_dir": str(root / "hf_datasets")}
    task = {"task": f"amber_toy_{name}", **common, "dataset_kwargs": kwargs, **tasks[name]}
    # JSON is YAML: no YAML writer needed.
    (root / f"amber_toy_{name}.yaml").write_text(json.dumps(task, indent=1), encoding="utf-8")


@pytest.fixture
def offline(monkeypatch):
  """No network: the datasets library reads local JSON files only."""
  import datasets

  for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    monkeypatch.setenv(var, "1")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def _run(lm, tmp_path, tasks):
  return lm_eval.simple_evaluate(
    model=lm,
    tasks=tasks,
    task_manager=TaskManager(include_path=str(tmp_path)),
    log_samples=True,
    bootstrap_iters=0,
  )


def test_simple_evaluate_on_local_tasks(params, tok, plans, tmp_path, offline):
  plan = plans["sparse"]
  lm = _lm(params, tok, plan)
  prompts = [d["prompt"] for d in GEN_DOCS]
  gen_kwargs = {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 6}
  generated = lm.generate_until([(p, gen_kwargs) for p in prompts])
  # The first answer is what the model says (exact match), the second is not.
  _write_tasks(tmp_path, [generated[0], generated[1] + " (not this)"])
  out = _run(lm, tmp_path, ["amber_toy_mc", "amber_toy_gen", "amber_toy_rolling"])
  res = out["results"]

  task = MCTask(
    name="amber_toy_mc",
    examples=tuple(
      MCExample(context=d["question"], choices=tuple(d["choices"]), gold=(d["label"],))
      for d in MC_DOCS
    ),
  )
  ours = evaluate_task(params, task, config=CFG, tokenizer=tok, plan=plan, show_progress=False)
  mc = res["amber_toy_mc"]
  print(
    f"mc: lm-eval acc {mc['acc,none']:.3f} acc_norm {mc['acc_norm,none']:.3f}; "
    f"evaluate_task acc {ours['acc']:.3f} acc_norm {ours['acc_norm']:.3f}"
  )
  assert mc["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
  assert mc["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
  assert mc["acc_bytes,none"] == pytest.approx(ours["acc_bytes"], abs=1e-12)
  assert ours["correct_norm"][-1] == 1.0 and ours["correct_bytes"][-1] == 0.0  # they differ
  # The per-choice log-likelihoods lm-eval saw are score_requests' values.
  want = score_requests(
    params,
    [(d["question"], " " + c) for d in MC_DOCS for c in d["choices"]],
    config=CFG,
    tokenizer=tok,
    plan=plan,
    show_progress=False,
  )
  samples = sorted(out["samples"]["amber_toy_mc"], key=lambda s: s["doc_id"])
  seen = [r[0] for s in samples for r in s["filtered_resps"]]
  assert np.max(np.abs(np.array(seen, float) - [w[0] for w in want])) < 1e-6

  gen = sorted(out["samples"]["amber_toy_gen"], key=lambda s: s["doc_id"])
  assert [s["filtered_resps"][0] for s in gen] == generated
  assert res["amber_toy_gen"]["exact_match,none"] == pytest.approx(0.5)

  lls = lm.loglikelihood_rolling([(d["text"],) for d in ROLLING_DOCS])
  words = sum(len(d["text"].split()) for d in ROLLING_DOCS)
  nbytes = sum(len(d["text"].encode()) for d in ROLLING_DOCS)
  rolling = res["amber_toy_rolling"]
  assert rolling["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-9)
  assert rolling["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-9)


# --- construction from model_args -------------------------------------------------------------


def test_model_args_path_and_registry(tmp_path, offline):
  """``--model amber_jax --model_args model=<HF dir>,pattern=8:16``, as lm-eval builds it."""
  assert lm_eval.api.registry.get_model("amber_jax") is AmberLM
  lm = AmberLM.create_from_arg_string(
    f"model={FIXTURE},pattern=8:16,cache_dir={tmp_path / 'cache'},batch_size=2,max_gen_toks=5",
    {"batch_size": 1, "device": "cuda", "max_batch_size": None},
  )
  assert lm.batch_size == 2  # model_args win over lm-eval's own batch_size
  assert str(lm.plan.pattern) == "8:16" and bool(np.asarray(lm.plan.enabled["q"]).all())
  assert (lm.prefix_token_id, lm.eot_token_id) == (1, 2)  # the checkpoint's BOS and EOS
  assert lm.method == "naive"  # score naive, policy all: the registry's name for the plan
  named = AmberLM.create_from_arg_string(
    f"model={FIXTURE},pattern=8:16,method=naive,cache_dir={tmp_path / 'cache'}"
  )
  assert named.method == "naive"
  assert all(bool(np.asarray(named.plan.enabled[p]).all()) for p in named.plan.enabled)
  assert lm.max_length == 1024  # max_position_embeddings
  _write_tasks(tmp_path, ["x", "y"])
  out = lm_eval.simple_evaluate(
    model="amber_jax",
    model_args=f"model={FIXTURE},pattern=dense,cache_dir={tmp_path / 'cache'}",
    tasks=["amber_toy_mc"],
    task_manager=TaskManager(include_path=str(tmp_path)),
    bootstrap_iters=0,
  )
  assert 0.0 <= out["results"]["amber_toy_mc"]["acc,none"] <= 1.0


@pytest.mark.parametrize(
  "arg_string,message",
  [
    ("pattern=8:15", "8:15"),
    ("pattern=3:2", "3:2"),
    ("pattern=8:16,plan_dir=/nonexistent", "not both"),
    ("pattern=8:16,temperature=0.5", "unknown AmberLM arguments"),
    ("dtype=float16", "dtype must be one of"),
    ("batch_size=auto", "batch_size"),
    ("model=/nonexistent/model.gguf", "neither a known name"),
    ("pattern=8:16,method=magic", "unknown method 'magic'; valid: dense, naive"),
    ("pattern=8:16,method=amber,policy=all", "method='amber' conflicts with policy='all'"),
  ],
)
def test_model_args_bad_input(tmp_path, arg_string, message):
  args = f"model={FIXTURE},cache_dir={tmp_path},{arg_string}"
  with pytest.raises(ValueError, match=message):
    AmberLM.create_from_arg_string(args)


def test_amber_jax_does_not_need_lm_eval():
  code = (
    "import sys; sys.modules['lm_eval'] = None\n"
    "import amber_jax, amber_jax.eval, amber_jax.eval.multiple_choice\n"
    "try:\n"
    "  import amber_jax.eval.lm_eval_adapter\n"
    "except ImportError:\n"
    "  print('ok')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "ok"


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_through_lm_eval(cache_dir, tmp_path, offline):
  """SmolLM2-135M, 8:16 on every site, through model_args: lm-eval acc = evaluate_task acc."""
  lm = AmberLM.create_from_arg_string(
    f"model=smollm2-135m,pattern=8:16,cache_dir={cache_dir},batch_size=8,max_gen_toks=8"
  )
  _write_tasks(tmp_path, ["x", "y"])
  out = _run(lm, tmp_path, ["amber_toy_mc", "amber_toy_gen"])
  task = MCTask(
    name="amber_toy_mc",
    examples=tuple(
      MCExample(context=d["question"], choices=tuple(d["choices"]), gold=(d["label"],))
      for d in MC_DOCS
    ),
  )
  ours = evaluate_task(
    lm.params, task, config=lm.config, tokenizer=lm.tokenizer, plan=lm.plan, show_progress=False
  )
  mc = out["results"]["amber_toy_mc"]
  print(f"smollm2 8:16 mc: lm-eval acc {mc['acc,none']:.3f}, evaluate_task {ours['acc']:.3f}")
  assert mc["acc,none"] == pytest.approx(ours["acc"])
  assert mc["acc_norm,none"] == pytest.approx(ours["acc_norm"])
  assert mc["acc_bytes,none"] == pytest.approx(ours["acc_bytes"])
  gen = sorted(out["samples"]["amber_toy_gen"], key=lambda s: s["doc_id"])
  assert all(isinstance(s["filtered_resps"][0], str) for s in gen)


def test_from_model_builds_a_baseline_method(tmp_path):
  """method=wanda / teal: the adapter evaluates the baseline's own model (pruned weights or
  thresholds), calibrated on the text's windows; a target it does not take is an error."""
  text = tmp_path / "text.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(400)), encoding="utf-8")
  common = dict(text=str(text), seq_len=32, calib_windows=2, calib_offset_windows=1)
  quiet = dict(cache_dir=tmp_path / "cache", log=lambda *a: None, show_progress=False)
  dense = AmberLM.from_model(str(FIXTURE), **quiet)
  wanda = AmberLM.from_model(str(FIXTURE), method="wanda", pattern="2:4", **common, **quiet)
  teal = AmberLM.from_model(str(FIXTURE), method="teal_uniform", sparsity="0.5", **common, **quiet)
  assert wanda.method == "wanda" and teal.method == "teal_uniform"
  assert teal.plan is not None and teal.plan.threshold is not None
  w = np.asarray(wanda.params["layers"]["q"]["w"])
  assert (w == 0).mean() == pytest.approx(0.5)
  req = [("The sky is", " blue")]
  scores = {lm.method: lm.loglikelihood(req)[0][0] for lm in (dense, wanda, teal)}
  assert len(set(scores.values())) == 3, scores
  with pytest.raises(ValueError, match="takes a sparsity"):
    AmberLM.from_model(str(FIXTURE), method="teal", pattern="2:4", **common, **quiet)
  with pytest.raises(ValueError, match="sparsity applies to a baseline"):
    AmberLM.from_model(str(FIXTURE), sparsity=0.5, **quiet)
