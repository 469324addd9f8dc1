"""Generative evaluation: greedy answers (sparse prefill, dense decode) scored by exact match.

A generative example is a prompt and its accepted answers. BIG-bench JSON files give them two
ways: generative tasks (``"target"``: a string or a list of strings) and multiple-choice tasks,
whose correct choices are the accepted answers (the same questions asked without the choices:
the model must produce the answer text itself). Few-shot prompts show solved examples in the
same format, which is what teaches a small model the answer format.

The answer is the greedy continuation cut at the first stop string (a newline by default) and
stripped of surrounding whitespace; it matches when it equals an accepted answer after the same
stripping (BIG-bench's ``exact_str_match``). Prompts of different lengths share a batch through
left padding (``start_B`` of :func:`amber_jax.model.generate_greedy`: each row generates exactly
what it would alone; the N:M masks act per token, so sparse prefill is unaffected too).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tokenizers

from amber_jax.data.bigbench import (
  BigBenchTaskError,
  MCTask,
  few_shot_context,
  load_bigbench_task,
)
from amber_jax.eval.multiple_choice import bucket_length, mean_stderr
from amber_jax.model.config import LlamaConfig
from amber_jax.model.generate import generate_greedy
from amber_jax.plan import SparsityPlan
from amber_jax.progress import progress_bar


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
  """Greedy continuations (``max_new_tokens`` ids each) of prompts of any lengths.

  Prompts are sorted by length, left-padded to a bucketed length in batches of ``batch_size``
  (so few shapes compile), and each row generates what it would alone.
  """
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
      t = bucket_length(max(len(prompts[i]) for i in idx))
      tokens = np.zeros((batch_size, t), np.int32)
      start = np.full(batch_size, t - 1, np.int32)  # padding rows: one token
      for r, i in enumerate(idx):
        n = len(prompts[i])
        tokens[r, t - n :] = prompts[i]
        start[r] = t - n
      gen = generate_greedy(
        params,
        tokens,
        config=config,
        max_new_tokens=max_new_tokens,
        plan=plan,
        dtype=dtype,
        start_B=start,
      )
      gen = np.asarray(gen)
      for r, i in enumerate(idx):
        out[i] = gen[r].tolist()
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
) -> dict:
  """Exact match of greedy answers on the first ``limit`` examples of ``task``.

  Returns ``dict(exact_match, exact_match_stderr, n, answers)``, plus ``agreement`` (share of
  answers equal to ``reference``, e.g. the dense model's answers) and its stderr when a
  reference is given. The prompt is encoded with the tokenizer's template (e.g. a BOS).
  """
  n = len(task.examples) if limit is None else min(limit, len(task.examples))
  if n < 1:
    raise ValueError(f"nothing to evaluate: limit={limit}, task has {len(task.examples)} examples")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if reference is not None and len(reference) < n:
    raise ValueError(f"reference has {len(reference)} answers, {n} are needed")
  examples = task.examples[:n]
  prompts = [tokenizer.encode(ex.prompt).ids for ex in examples]
  if max(len(p) for p in prompts) + max_new_tokens > config.max_seq_len:
    raise ValueError(
      f"a prompt of {max(len(p) for p in prompts)} tokens + max_new_tokens={max_new_tokens} "
      f"exceeds the model's max_seq_len={config.max_seq_len}"
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
  answers = [cut_answer(tokenizer.decode(g), stop) for g in ids]
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
