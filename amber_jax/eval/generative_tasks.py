"""Generative evaluation: greedy answers (sparse prefill, dense decode) scored by exact match.

A generative example is a prompt and its accepted answers. BIG-bench JSON files give them two
ways: generative tasks (``"target"``: a string or a list of strings) and multiple-choice tasks,
whose correct choices are the accepted answers (the same questions asked without the choices:
the model must produce the answer text itself). Few-shot prompts show solved examples in the
same format, which is what teaches a small model the answer format.

The answer is the greedy continuation cut at the first end-of-text id (any of the model's, see
:func:`special_token_ids`), then at the first stop string (a newline by default), and stripped
of surrounding whitespace; it matches when it equals an accepted answer after the same
stripping (BIG-bench's ``exact_str_match``). Prompts of different lengths share a batch through
left padding (:func:`greedy_generate`: each row generates exactly what it would alone; the N:M
masks act per token, so sparse prefill is unaffected too), decoding in chunks of steps with a
stop check between them (so a batch stops once every row has stopped).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from amber_jax.data.bigbench import (
  BigBenchTaskError,
  MCTask,
  few_shot_context,
  load_bigbench_task,
)
from amber_jax.eval.logits import map_logit_chunks
from amber_jax.eval.multiple_choice import bucket_length, mean_stderr
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import decode_step, prefill_hidden
from amber_jax.plan.schema import SparsityPlan
from amber_jax.util.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class GenExample:
  """One prompt and the answers that count as correct."""

  prompt: str
  answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GenTask:
  name: str
  examples: tuple[GenExample, ...]


def generative_task(task: MCTask, *, num_fewshot: int = 0, seed: int = 1234) -> GenTask:
  """A multiple-choice task asked generatively: its correct choices are the accepted answers.

  Prompts are :func:`few_shot_context` (each shot answered with its first correct choice).
  """
  examples = []
  for i, ex in enumerate(task.examples):
    prompt = few_shot_context(task, i, num_fewshot, seed) if num_fewshot else ex.context
    examples.append(GenExample(prompt, tuple(ex.choices[g] for g in ex.gold)))
  return GenTask(task.name, tuple(examples))


def load_generative_task(
  path: str | os.PathLike, *, num_fewshot: int = 0, seed: int = 1234
) -> GenTask:
  """A BIG-bench JSON file as a generative task (``target`` examples, or multiple choice).

  Raises:
    BigBenchTaskError: unreadable file, no examples, an example without input, or a ``target``
      that is not a non-empty string or list of non-empty strings (naming file and example).
  """
  path = Path(path)
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BigBenchTaskError(f"{path}: not a readable JSON task file ({e})") from e
  examples = data.get("examples") if isinstance(data, dict) else None
  if not isinstance(examples, list) or not examples:
    raise BigBenchTaskError(f"{path}: 'examples' must be a non-empty list")
  if all(isinstance(e, dict) and "target_scores" in e for e in examples):
    return generative_task(load_bigbench_task(path), num_fewshot=num_fewshot, seed=seed)
  name = data.get("name") if isinstance(data.get("name"), str) else path.stem
  prefix = data.get("task_prefix", "") if isinstance(data.get("task_prefix"), str) else ""
  in_prefix = data.get("example_input_prefix", "\nQ: ")
  out_prefix = data.get("example_output_prefix", "\nA: ")
  parsed = []
  for i, e in enumerate(examples):
    where = f"{path}: example {i}"
    if not isinstance(e, dict) or not isinstance(e.get("input"), str) or not e["input"]:
      raise BigBenchTaskError(f"{where}: needs a non-empty string 'input'")
    target = e.get("target")
    answers = [target] if isinstance(target, str) else target
    if not isinstance(answers, list) or not answers:
      raise BigBenchTaskError(f"{where}: 'target' must be a string or a non-empty list")
    if not all(isinstance(a, str) and a.strip() for a in answers):
      raise BigBenchTaskError(f"{where}: every target must be a non-empty string")
    parsed.append((in_prefix + e["input"] + out_prefix.rstrip(), tuple(answers)))
  if num_fewshot > len(parsed) - 1:
    raise BigBenchTaskError(f"{path}: num_fewshot={num_fewshot} needs more examples")
  out = []
  for i, (query, answers) in enumerate(parsed):
    shots = ""
    if num_fewshot:
      rng = np.random.default_rng([seed, i])
      picked = rng.choice([j for j in range(len(parsed)) if j != i], num_fewshot, replace=False)
      shots = "".join(parsed[int(j)][0] + " " + parsed[int(j)][1][0] for j in picked)
    out.append(GenExample(prefix + shots + query, answers))
  return GenTask(name, tuple(out))


def cut_answer(text: str, stop: Sequence[str]) -> str:
  """The generated text up to the first stop string, stripped."""
  end = len(text)
  for s in stop:
    i = text.find(s)
    if i >= 0:
      end = min(end, i)
  return text[:end].strip()


def eos_id_tuple(value, name: str = "eos_token_ids") -> tuple[int, ...]:
  """End-of-text ids as a tuple: None -> (), an int -> (id,), a list -> its ids in order (each
  once). Raises ValueError, naming ``name``, for anything that is not an int or a list of ints."""
  if value is None:
    return ()
  items = value if isinstance(value, (list, tuple)) else [value]
  ids: list[int] = []
  for v in items:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be a token id (int) or a list of token ids, got {value!r}")
    if int(v) not in ids:
      ids.append(int(v))
  return tuple(ids)


def special_token_ids(model_path: str | os.PathLike) -> tuple[int | None, tuple[int, ...]]:
  """(BOS id, EOS ids) from a GGUF file's metadata or an HF directory's config files.

  A model may have several end-of-text ids (Llama-3-Instruct's generation_config lists
  ``[128001, 128008, 128009]``): all are kept, in order, the first being the EOS proper. In an
  HF directory ``generation_config.json`` overrides ``config.json`` (as in transformers); in a
  GGUF file the EOS is followed by the end-of-turn and end-of-message ids when present (what
  llama.cpp stops at).
  """
  path = Path(model_path)
  if path.is_dir():
    bos = eos = None
    for name in ("config.json", "generation_config.json"):
      if (path / name).is_file():
        cfg = json.loads((path / name).read_text(encoding="utf-8"))
        bos = cfg.get("bos_token_id", bos)
        eos = cfg.get("eos_token_id", eos)
    return bos, eos_id_tuple(eos, f"eos_token_id in {path}")
  import gguf

  reader = gguf.GGUFReader(path)

  def field(key):
    f = reader.fields.get(key)
    return None if f is None else int(f.contents())

  eos = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
  return field("tokenizer.ggml.bos_token_id"), eos_id_tuple([e for e in eos if e is not None])


def cut_at_eos(ids: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
  """``ids`` up to (without) the first of ``eos_token_ids``."""
  eos = set(eos_token_ids)
  return next((list(ids[:k]) for k, t in enumerate(ids) if t in eos), list(ids))


DECODE_CHUNK = 16  # decode steps per compiled call: stop checks happen between calls


@functools.partial(jax.jit, static_argnames=("config", "max_len", "dtype"))
def _prefill_first_token(params, tokens_BxT, start_B, plan, *, config, max_len, dtype):
  """Sparse (per plan) prefill of left-padded prompts (row b's prompt starts at ``start_B[b]``).

  Returns the greedy next token [B] and a cache of ``max_len`` positions filled up to the
  padded length, keeping the offsets (see :func:`amber_jax.model.llama.prefill`): no real
  token attends to padding, and the N:M mask and W8A8 scales act per token, so padding changes
  no real activation. Only the last position goes through the LM head.
  """
  h, cache = prefill_hidden(
    params,
    tokens_BxT,
    config=config,
    plan=plan,
    max_len=max_len,
    dtype=dtype,
    start_B=start_B,
  )
  h_last = h[:, -1:]  # [B, 1, D]
  dummy = jnp.zeros(h_last.shape[:2], jnp.int32)
  first = map_logit_chunks(
    config, params, h_last, dummy, lambda logits, _: jnp.argmax(logits, axis=-1)
  )
  return first[:, 0].astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("config", "steps", "dtype"))
def _decode_chunk(params, token_B, cache, plan, *, config, steps, dtype):
  """``steps`` dense greedy decode steps: (new tokens [B, steps], the cache after them)."""

  def step(carry, _):
    token, cache = carry
    logits, cache = decode_step(
      params, token[:, None], cache, config=config, plan=plan, dtype=dtype
    )
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, cache), nxt

  (_, cache), new_SxB = jax.lax.scan(step, (token_B, cache), None, length=steps)
  return new_SxB.T, cache


def greedy_generate(
  params,
  prompts: Sequence[Sequence[int]],
  *,
  config: LlamaConfig,
  max_new_tokens: int,
  plan: SparsityPlan | None = None,
  dtype=jnp.float32,
  should_stop: Callable[[int, list[int]], bool] | None = None,
  chunk: int = DECODE_CHUNK,
) -> list[list[int]]:
  """Greedy continuations (at most ``max_new_tokens`` ids each) of prompts of any lengths.

  The same computation as :func:`amber_jax.model.generate_greedy` for each prompt alone (sparse
  prefill, dense decode, argmax), but the prompts are left-padded to a bucketed length so that
  few shapes compile, and decoding runs ``chunk`` steps per call and stops once
  ``should_stop(row, ids so far)`` holds for every row (ids past a row's stop are left to the
  caller to trim).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token lists")
  b = len(prompts)
  steps = min(chunk, max_new_tokens - 1)
  n_calls = 0 if steps == 0 else -(-(max_new_tokens - 1) // steps)
  # The padded prompt stays within the positions the model runs exactly (the padding is masked,
  # the real tokens keep their own positions).
  t_pad = bucket_length(max(len(p) for p in prompts), cap=config.seq_len_limit)
  # Each decode step writes its input token at the fill level: t_pad + steps * n_calls slots.
  max_len = t_pad + steps * n_calls
  tokens = np.zeros((b, t_pad), np.int32)
  start = np.zeros(b, np.int32)
  for r, p in enumerate(prompts):
    tokens[r, t_pad - len(p) :] = p
    start[r] = t_pad - len(p)
  token, cache = _prefill_first_token(
    params, tokens, jnp.asarray(start), plan, config=config, max_len=max_len, dtype=dtype
  )
  out = [[int(x)] for x in np.asarray(token)]
  for _ in range(n_calls):
    if should_stop is not None and all(should_stop(r, out[r]) for r in range(b)):
      break
    new, cache = _decode_chunk(params, token, cache, plan, config=config, steps=steps, dtype=dtype)
    token = new[:, -1]
    for r, row in enumerate(np.asarray(new)):
      out[r].extend(int(x) for x in row)
  return [row[:max_new_tokens] for row in out]


def greedy_continuations(
  params,
  prompts: Sequence[Sequence[int]],
  *,
  config: LlamaConfig,
  max_new_tokens: int,
  plan: SparsityPlan | None = None,
  batch_size: int = 8,
  dtype=jnp.float32,
  show_progress: bool = True,
  desc: str = "generate",
) -> list[list[int]]:
  """Greedy continuations (``max_new_tokens`` ids each) of prompts of any lengths, in batches
  of ``batch_size`` sorted by length (see :func:`greedy_generate`)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  out: list[list[int] | None] = [None] * len(prompts)
  with progress_bar(
    total=len(prompts), desc=desc, unit="prompt", disable=not show_progress or not prompts
  ) as bar:
    for begin in range(0, len(order), batch_size):
      idx = order[begin : begin + batch_size]
      rows = [prompts[i] for i in idx] + [prompts[idx[-1]]] * (batch_size - len(idx))
      gen = greedy_generate(
        params, rows, config=config, max_new_tokens=max_new_tokens, plan=plan, dtype=dtype
      )
      for r, i in enumerate(idx):
        out[i] = gen[r]
      bar.update(len(idx))
  return out  # type: ignore[return-value]


def evaluate_generation(
  params,
  task: GenTask,
  *,
  config: LlamaConfig,
  tokenizer: tokenizers.Tokenizer,
  plan: SparsityPlan | None = None,
  limit: int | None = None,
  max_new_tokens: int = 16,
  stop: Sequence[str] = ("\n",),
  batch_size: int = 8,
  dtype=jnp.float32,
  reference: Sequence[str] | None = None,
  show_progress: bool = True,
  eos_token_ids: int | Sequence[int] | None = None,
) -> dict:
  """Exact match of greedy answers on the first ``limit`` examples of ``task``.

  Returns ``dict(exact_match, exact_match_stderr, n, answers)``, plus ``agreement`` (share of
  answers equal to ``reference``, e.g. the dense model's answers) and its stderr when a
  reference is given. The prompt is encoded with the tokenizer's template (e.g. a BOS).

  ``eos_token_ids``: the model's end-of-text id or ids (e.g. from :func:`special_token_ids`);
  each continuation is cut before the first of them, so that nothing generated after the end
  of text joins the answer. None: continuations are not cut at any id (only at ``stop``).
  """
  n = len(task.examples) if limit is None else min(limit, len(task.examples))
  if n < 1:
    raise ValueError(f"nothing to evaluate: limit={limit}, task has {len(task.examples)} examples")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if reference is not None and len(reference) < n:
    raise ValueError(f"reference has {len(reference)} answers, {n} are needed")
  eos = eos_id_tuple(eos_token_ids)
  bad = [e for e in eos if not 0 <= e < config.vocab_size]
  if bad:
    raise ValueError(
      f"eos_token_ids {bad} outside the model's vocabulary (0..{config.vocab_size - 1})"
    )
  examples = task.examples[:n]
  prompts = [tokenizer.encode(ex.prompt).ids for ex in examples]
  longest = max(len(p) for p in prompts) + max_new_tokens
  if longest > config.seq_len_limit:
    raise ValueError(
      f"a prompt of {max(len(p) for p in prompts)} tokens + max_new_tokens={max_new_tokens} "
      f"exceeds the {config.seq_len_limit} positions the model runs exactly (max_seq_len, or "
      "its sliding window)"
    )
  ids = greedy_continuations(
    params,
    prompts,
    config=config,
    max_new_tokens=max_new_tokens,
    plan=plan,
    batch_size=batch_size,
    dtype=dtype,
    show_progress=show_progress,
    desc=task.name,
  )
  answers = [cut_answer(tokenizer.decode(cut_at_eos(g, eos)), stop) for g in ids]
  correct = [
    float(a in {t.strip() for t in ex.answers}) for a, ex in zip(answers, examples, strict=True)
  ]
  out = {
    "exact_match": float(np.mean(correct)),
    "exact_match_stderr": mean_stderr(correct),
    "n": n,
    "answers": answers,
  }
  if reference is not None:
    same = [float(a == r) for a, r in zip(answers, reference[:n], strict=True)]
    out["agreement"] = float(np.mean(same))
    out["agreement_stderr"] = mean_stderr(same) if n > 1 else math.nan
  return out
