"""Multiple-choice evaluation by log-likelihood, in the manner of lm-evaluation-harness.

Each request is a (context, continuation) pair; its score is the sum of the log-probabilities of
the continuation's tokens given the context. Tokenization follows lm-eval's ``_encode_pair``:
trailing whitespace of the context moves to the continuation, ``context + continuation`` is
encoded whole, and the continuation's tokens are the tail after the context's own encoding (so a
merge across the boundary is not double counted). Leading special tokens of the tokenizer's
template (e.g. a Llama BOS) are prepended to every request.

Requests are sorted by length (longest first), batched with right padding and ``valid_BxT`` (padded
keys are masked, so padding does not change a score), and each batch is padded to a bucketed
length so that only a few shapes compile. Per task: ``acc`` (the choice with the highest summed
log-likelihood is correct) and ``acc_norm`` (the same after dividing each log-likelihood by the
UTF-8 byte length of the choice text, without the delimiting space, as lm-eval's ``acc_norm``
divides by the choice's length), each with lm-eval's standard error (sample std / sqrt(n)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from amber_jax.data.bigbench import MCTask, few_shot_context
from amber_jax.eval.logits import map_logit_chunks
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import forward_hidden
from amber_jax.plan import SparsityPlan
from amber_jax.progress import progress_bar

Request = tuple[str, str]  # (context, continuation)
Score = tuple[float, int, bool]  # (summed log-likelihood, continuation tokens, is greedy)
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (tokens_BxT, valid_BxT) -> logits


def bucket_length(n: int) -> int:
  """Padded sequence length for a batch whose longest row has ``n`` tokens."""
  if n <= 256:
    return max(32, -(-n // 32) * 32)
  if n <= 1024:
    return -(-n // 128) * 128
  return -(-n // 512) * 512


def encode_request(
  tokenizer: tokenizers.Tokenizer,
  context: str,
  continuation: str,
  *,
  prefix_ids: Sequence[int] = (),
) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of one request, as lm-eval splits them.

  Raises:
    ValueError: the continuation has no tokens, or there is nothing to condition the first
      continuation token on (empty context and no prefix token).
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  prefix = list(prefix_ids)
  whole = prefix + tokenizer.encode(context + continuation, add_special_tokens=False).ids
  ctx = prefix + tokenizer.encode(context, add_special_tokens=False).ids
  cont = whole[len(ctx) :]
  if not cont:
    raise ValueError(f"continuation {continuation!r} has no tokens after context {context[-40:]!r}")
  if not ctx:
    raise ValueError(
      "empty context and the tokenizer adds no leading special token: pass prefix_token_id "
      "(e.g. the BOS or end-of-text id) to condition the first continuation token on"
    )
  return ctx, cont


def _template_prefix(tokenizer: tokenizers.Tokenizer, prefix_token_id: int | None) -> list[int]:
  if prefix_token_id is not None:
    return [int(prefix_token_id)]
  return list(tokenizer.encode("", add_special_tokens=True).ids)


def _target_logprob(logits_BxTxV, targets_BxT):
  """(log p(target), target is the argmax) per position, from float32 logits."""
  logits = logits_BxTxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1) == targets_BxT
  return logprob, greedy


def _reduce(logprob_BxT, greedy_BxT, cont_BxT):
  cont = cont_BxT.astype(bool)
  loglik = jnp.sum(jnp.where(cont, logprob_BxT, 0.0), axis=1)
  count = jnp.sum(cont, axis=1, dtype=jnp.int32)
  is_greedy = jnp.all(greedy_BxT | ~cont, axis=1)
  return loglik, count, is_greedy


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def continuation_loglik(
  params, tokens_BxT, targets_BxT, cont_BxT, valid_BxT, plan, *, config: LlamaConfig, dtype
):
  """Per row: (summed log p of the targets where ``cont_BxT``, their count, all greedy)."""
  h, _ = forward_hidden(
    params, tokens_BxT, config=config, plan=plan, valid_BxT=valid_BxT, dtype=dtype
  )
  logprob, greedy = map_logit_chunks(config, params, h, targets_BxT, _target_logprob)
  return _reduce(logprob, greedy, cont_BxT)


@jax.jit
def _loglik_from_logits(logits_BxTxV, targets_BxT, cont_BxT):
  return _reduce(*_target_logprob(logits_BxTxV, targets_BxT), cont_BxT)


def score_requests(
  params,
  requests: Sequence[Request],
  *,
  config: LlamaConfig | None,
  tokenizer: tokenizers.Tokenizer,
  plan: SparsityPlan | None = None,
  batch_size: int = 8,
  dtype=jnp.float32,
  show_progress: bool = True,
  max_length: int | None = None,
  prefix_token_id: int | None = None,
  logits_fn: LogitsFn | None = None,
  desc: str = "loglikelihood",
) -> list[Score]:
  """(log-likelihood, continuation tokens, is greedy) of each (context, continuation), in order.

  ``max_length`` (default ``config.max_seq_len``) truncates long requests from the left, keeping
  the continuation, as lm-eval does. ``prefix_token_id`` replaces the tokenizer template's leading
  special tokens. ``logits_fn(tokens_BxT, valid_BxT) -> logits_BxTxV`` replaces the model (for
  tests); then ``params``, ``config`` and ``plan`` are unused.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_length is None:
    max_length = config.max_seq_len if config is not None else None
  prefix = _template_prefix(tokenizer, prefix_token_id)
  rows = []  # (input ids, number of continuation tokens)
  for context, continuation in requests:
    ctx, cont = encode_request(tokenizer, context, continuation, prefix_ids=prefix)
    full = ctx + cont
    if max_length is not None:
      if len(cont) > max_length:
        raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")
      full = full[-(max_length + 1) :]
    rows.append((np.asarray(full, np.int32), len(cont)))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  results: list[Score | None] = [None] * len(rows)
  with progress_bar(
    total=len(rows), desc=desc, unit="req", disable=not show_progress or not rows
  ) as bar:
    for start in range(0, len(order), batch_size):
      idx = order[start : start + batch_size]
      t = bucket_length(max(len(rows[i][0]) for i in idx) - 1)
      tokens = np.zeros((batch_size, t), np.int32)
      targets = np.zeros((batch_size, t), np.int32)
      cont_mask = np.zeros((batch_size, t), bool)
      valid = np.zeros((batch_size, t), bool)
      valid[:, 0] = True  # padding rows: one valid key, so no row attends to nothing
      for r, i in enumerate(idx):
        full, n_cont = rows[i]
        n = len(full) - 1
        tokens[r, :n] = full[:-1]
        targets[r, :n] = full[1:]
        valid[r, :n] = True
        cont_mask[r, n - n_cont : n] = True
      if logits_fn is None:
        out = continuation_loglik(
          params, tokens, targets, cont_mask, valid, plan, config=config, dtype=dtype
        )
      else:
        out = _loglik_from_logits(
          logits_fn(jnp.asarray(tokens), jnp.asarray(valid)), targets, cont_mask
        )
      loglik, count, greedy = (np.asarray(a) for a in out)
      for r, i in enumerate(idx):
        results[i] = (float(loglik[r]), int(count[r]), bool(greedy[r]))
      bar.update(len(idx))
  return results  # type: ignore[return-value]


def mean_stderr(values: Sequence[float]) -> float:
  """Standard error of the mean, sample std (ddof=1) / sqrt(n), as lm-eval's ``mean_stderr``."""
  n = len(values)
  if n < 2:
    return float("nan")
  return float(np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(n))


def evaluate_task(
  params,
  task: MCTask,
  *,
  config: LlamaConfig | None,
  tokenizer: tokenizers.Tokenizer,
  plan: SparsityPlan | None = None,
  num_fewshot: int = 0,
  limit: int | None = None,
  batch_size: int = 8,
  dtype=jnp.float32,
  seed: int = 1234,
  show_progress: bool = True,
  max_length: int | None = None,
  prefix_token_id: int | None = None,
  logits_fn: LogitsFn | None = None,
) -> dict:
  """acc, acc_norm and their standard errors over the first ``limit`` examples of ``task``.

  Few-shot prompts come from :func:`few_shot_context` (shots drawn, with ``seed``, from the
  whole task). Returns ``dict(acc, acc_stderr, acc_norm, acc_norm_stderr, n)``.
  """
  n = len(task.examples) if limit is None else min(limit, len(task.examples))
  if n < 1:
    raise ValueError(f"nothing to evaluate: limit={limit}, task has {len(task.examples)} examples")
  requests, spans = [], []
  for i in range(n):
    ex = task.examples[i]
    context = few_shot_context(task, i, num_fewshot, seed) if num_fewshot else ex.context
    spans.append((len(requests), len(ex.choices)))
    requests.extend((context, c) for c in ex.continuations)
  scores = score_requests(
    params,
    requests,
    config=config,
    tokenizer=tokenizer,
    plan=plan,
    batch_size=batch_size,
    dtype=dtype,
    show_progress=show_progress,
    max_length=max_length,
    prefix_token_id=prefix_token_id,
    logits_fn=logits_fn,
    desc=task.name,
  )
  acc, acc_norm = [], []
  for i, (first, count) in enumerate(spans):
    ex = task.examples[i]
    ll = np.array([s[0] for s in scores[first : first + count]])
    nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in ex.choices], np.float64)
    acc.append(float(int(np.argmax(ll)) in ex.gold))
    acc_norm.append(float(int(np.argmax(ll / nbytes)) in ex.gold))
  return {
    "acc": float(np.mean(acc)),
    "acc_stderr": mean_stderr(acc),
    "acc_norm": float(np.mean(acc_norm)),
    "acc_norm_stderr": mean_stderr(acc_norm),
    "n": n,
  }
