"""Multiple-choice evaluation by log-likelihood, in the manner of lm-evaluation-harness.

Each request is a (context, continuation) pair; its score is the sum of the log-probabilities of
the continuation's tokens given the context. Tokenization follows lm-eval's ``_encode_pair``:
trailing whitespace of the context moves to the continuation, ``context + continuation`` is
encoded whole, and the continuation's tokens are the tail after the context's own encoding (so a
merge across the boundary is not double counted). Leading special tokens of the tokenizer's
template (e.g. a Llama BOS) are prepended to every request.

Requests that share a context (the choices of one question) are packed into one row: the
context once, then each continuation at the positions it would have alone, attending only to the
context and to itself, so the scores equal one row per request while the context is computed once
(a question with one-token choices costs one row and one LM-head position per choice). Rows are
sorted by length, batched with padding, and padded to bucketed lengths so that only a few shapes
compile. Per task, as lm-eval's multiple-choice metrics: ``acc`` (the choice with the highest
summed log-likelihood is correct), ``acc_norm`` (the same after dividing each log-likelihood by
the number of characters of the choice text, without the delimiting space, as lm-eval's
``acc_norm`` divides by ``len(choice)``) and ``acc_bytes`` (the same with the UTF-8 byte length
instead, lm-eval's ``acc_bytes``; equal to ``acc_norm`` on ASCII choices), each with lm-eval's
standard error (sample std / sqrt(n)).
"""

from __future__ import annotations

import dataclasses
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
from amber_jax.plan.schema import SparsityPlan
from amber_jax.util.progress import progress_bar

Request = tuple[str, str]  # (context, continuation)
Score = tuple[float, int, bool]  # (summed log-likelihood, continuation tokens, is greedy)
# (tokens_BxT, positions_BxT, mask_BxTxT) -> logits_BxTxV
LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def bucket_length(n: int, cap: int | None = None) -> int:
  """Padded sequence length for a batch whose longest row has ``n`` tokens (few distinct
  lengths, so few compiles), never beyond ``cap`` (e.g. the model's context) unless ``n`` is."""
  if n <= 256:
    b = max(32, -(-n // 32) * 32)
  elif n <= 1024:
    b = -(-n // 128) * 128
  else:
    b = -(-n // 512) * 512
  return b if cap is None or b <= cap else max(n, cap)


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


def bucket_slots(n: int) -> int:
  """Padded number of scored positions per row (a power of two >= 8)."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def _target_logprob(logits_BxSxV, targets_BxS):
  """(log p(target), target is the argmax) per slot, from float32 logits."""
  logits = logits_BxSxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
  logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1) == targets_BxS
  return logprob, greedy


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def slot_logprobs(
  params, tokens_BxT, positions_BxT, mask_BxTxT, source_BxS, targets_BxS, plan, *, config, dtype
):
  """(log p(target), target is the argmax) of each slot: the model's next-token distribution at
  row position ``source_BxS`` scored against ``targets_BxS``. Only the slots' hidden states go
  through the LM head (a row's context positions are never scored)."""
  h, _ = forward_hidden(
    params,
    tokens_BxT,
    config=config,
    plan=plan,
    dtype=dtype,
    positions_BxT=positions_BxT,
    attn_mask_BxTxT=mask_BxTxT,
  )
  h_BxSxD = jnp.take_along_axis(h, source_BxS[..., None], axis=1)
  return map_logit_chunks(config, params, h_BxSxD, targets_BxS, _target_logprob)


@jax.jit
def _slots_from_logits(logits_BxTxV, source_BxS, targets_BxS):
  logits = jnp.take_along_axis(logits_BxTxV, source_BxS[..., None], axis=1)
  return _target_logprob(logits, targets_BxS)


@dataclasses.dataclass
class _Row:
  """One model row: a context followed by continuation branches that share it."""

  context: list[int]
  branches: list[tuple[int, list[int]]]  # (request index, continuation ids)

  def length(self) -> int:
    return len(self.context) + sum(len(c) - 1 for _, c in self.branches)

  def slots(self) -> int:
    return sum(len(c) for _, c in self.branches)


def _pack_rows(encoded, max_length: int | None, pack: bool) -> list[_Row]:
  """Groups requests with identical context ids into rows of at most ``max_length`` tokens.

  A request too long alone is truncated from the left (keeping the continuation), as lm-eval.
  """
  rows: list[_Row] = []
  open_rows: dict[tuple[int, ...], _Row] = {}
  for i, (ctx, cont) in enumerate(encoded):
    if max_length is not None and len(ctx) + len(cont) - 1 > max_length:
      full = (ctx + cont)[-(max_length + 1) :]
      rows.append(_Row(full[: len(full) - len(cont)], [(i, cont)]))
      continue
    key = tuple(ctx)
    row = open_rows.get(key) if pack else None
    if row is not None and (max_length is None or row.length() + len(cont) - 1 <= max_length):
      row.branches.append((i, cont))
      continue
    row = _Row(list(ctx), [(i, cont)])
    rows.append(row)
    if pack:
      open_rows[key] = row
  return rows


def _layout(rows: Sequence[_Row], batch_size: int, max_length: int | None = None):
  """Arrays of one batch of packed rows (``batch_size`` rows; missing rows are padding).

  Row layout: the context at positions 0..c-1, then each continuation's tokens but its last, at
  positions c, c+1, ... (the positions they have alone). Attention: a context token sees the
  context before it; a continuation token sees the whole context and its own branch before it.
  Slot ``(source, target)``: the first continuation token is predicted at the context's last
  position, token j > 0 at the branch's token j - 1.
  """
  t = bucket_length(max(r.length() for r in rows), cap=max_length)
  s = bucket_slots(max(r.slots() for r in rows))
  tokens = np.zeros((batch_size, t), np.int32)
  positions = np.zeros((batch_size, t), np.int32)
  branch = np.full((batch_size, t), -1, np.int32)  # 0: context, k >= 1: branch k, -1: padding
  source = np.zeros((batch_size, s), np.int32)
  targets = np.zeros((batch_size, s), np.int32)
  owner = np.full((batch_size, s), -1, np.int64)  # request index of each slot; -1: padding
  for r, row in enumerate(rows):
    c = len(row.context)
    tokens[r, :c] = row.context
    positions[r, :c] = np.arange(c)
    branch[r, :c] = 0
    at, slot = c, 0
    for k, (req, cont) in enumerate(row.branches, start=1):
      n = len(cont) - 1
      tokens[r, at : at + n] = cont[:-1]
      positions[r, at : at + n] = np.arange(c, c + n)
      branch[r, at : at + n] = k
      source[r, slot : slot + n + 1] = [c - 1, *range(at, at + n)]
      targets[r, slot : slot + n + 1] = cont
      owner[r, slot : slot + n + 1] = req
      at, slot = at + n, slot + n + 1
  idx = np.arange(t)
  causal = idx[None, :, None] >= idx[None, None, :]
  same = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
  mask = causal & same & (branch[:, None, :] >= 0)
  mask[:, :, 0] = True  # padding queries see one key, so no softmax row is empty
  return tokens, positions, mask, source, targets, owner


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
  pack: bool = True,
  desc: str = "loglikelihood",
) -> list[Score]:
  """(log-likelihood, continuation tokens, is greedy) of each (context, continuation), in order.

  ``pack`` (default) puts the requests that share a context (the choices of one question) into
  one row, the context computed once and each continuation attending only to it and to itself:
  the same scores as one row per request (tested), for about half the tokens on BIG-bench and a
  single LM-head row per one-token choice. Rows are sorted by length and batched with padding.

  ``max_length`` (default ``config.seq_len_limit``: the context, or a shorter sliding window)
  truncates long requests from the left, keeping the continuation, as lm-eval does.
  ``prefix_token_id`` replaces the tokenizer template's leading special tokens.
  ``logits_fn(tokens_BxT, positions_BxT, mask_BxTxT) -> logits_BxTxV`` replaces the model (for
  tests); then ``params``, ``config`` and ``plan`` are unused.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_length is None:
    max_length = config.seq_len_limit if config is not None else None
  prefix = _template_prefix(tokenizer, prefix_token_id)
  encoded = []
  for context, continuation in requests:
    ctx, cont = encode_request(tokenizer, context, continuation, prefix_ids=prefix)
    if max_length is not None and len(cont) > max_length:
      raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")
    encoded.append((ctx, cont))
  rows = sorted(_pack_rows(encoded, max_length, pack), key=lambda r: -r.length())
  loglik = np.zeros(len(encoded), np.float64)
  greedy = np.ones(len(encoded), bool)
  with progress_bar(
    total=len(encoded), desc=desc, unit="req", disable=not show_progress or not encoded
  ) as bar:
    for start in range(0, len(rows), batch_size):
      batch = rows[start : start + batch_size]
      tokens, positions, mask, source, targets, owner = _layout(batch, batch_size, max_length)
      if logits_fn is None:
        out = slot_logprobs(
          params, tokens, positions, mask, source, targets, plan, config=config, dtype=dtype
        )
      else:
        logits = logits_fn(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
        out = _slots_from_logits(logits, source, targets)
      logprob, is_argmax = (np.asarray(a) for a in out)
      real = owner >= 0
      np.add.at(loglik, owner[real], logprob[real].astype(np.float64))
      np.logical_and.at(greedy, owner[real], is_argmax[real])
      bar.update(sum(len(r.branches) for r in batch))
  return [(float(loglik[i]), len(cont), bool(greedy[i])) for i, (_, cont) in enumerate(encoded)]


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
  pack: bool = True,
  indices: Sequence[int] | None = None,
) -> dict:
  """acc, acc_norm, acc_bytes and their standard errors over the first ``limit`` examples of
  ``task`` (or the examples at ``indices``, e.g. a seeded random subset; then ``limit`` must be
  None).

  ``acc_norm`` normalizes each choice's log-likelihood by its length in characters and
  ``acc_bytes`` by its length in UTF-8 bytes, as lm-eval's metrics of those names (an empty
  choice counts as length 1). Few-shot prompts come from :func:`few_shot_context` (shots drawn,
  with ``seed``, from the whole task). Returns ``dict(acc, acc_stderr, acc_norm,
  acc_norm_stderr, acc_bytes, acc_bytes_stderr, n, correct, correct_norm, correct_bytes)``; the
  last three are per-example 0/1 lists (in evaluation order), so that two models scored on the
  same examples can be compared pairwise.
  """
  if indices is not None:
    if limit is not None:
      raise ValueError("pass limit or indices, not both")
    bad = [i for i in indices if not 0 <= i < len(task.examples)]
    if bad:
      raise ValueError(f"indices {bad[:5]} out of range for task {task.name!r}")
    order = list(indices)
  else:
    order = list(range(len(task.examples) if limit is None else min(limit, len(task.examples))))
  n = len(order)
  if n < 1:
    raise ValueError(f"nothing to evaluate: limit={limit}, task has {len(task.examples)} examples")
  requests, spans = [], []
  for i in order:
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
    pack=pack,
    desc=task.name,
  )
  acc, acc_norm, acc_bytes = [], [], []
  for i, (first, count) in zip(order, spans, strict=True):
    ex = task.examples[i]
    ll = np.array([s[0] for s in scores[first : first + count]])
    nchars = np.array([max(len(c), 1) for c in ex.choices], np.float64)
    nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in ex.choices], np.float64)
    acc.append(float(int(np.argmax(ll)) in ex.gold))
    acc_norm.append(float(int(np.argmax(ll / nchars)) in ex.gold))
    acc_bytes.append(float(int(np.argmax(ll / nbytes)) in ex.gold))
  return {
    "acc": float(np.mean(acc)),
    "acc_stderr": mean_stderr(acc),
    "acc_norm": float(np.mean(acc_norm)),
    "acc_norm_stderr": mean_stderr(acc_norm),
    "acc_bytes": float(np.mean(acc_bytes)),
    "acc_bytes_stderr": mean_stderr(acc_bytes),
    "n": n,
    "correct": acc,
    "correct_norm": acc_norm,
    "correct_bytes": acc_bytes,
  }
