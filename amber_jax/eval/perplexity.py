"""Perplexity by the standard protocol, on non-overlapping windows.

The whole text is tokenized once and cut into consecutive, non-overlapping
windows of ``seq_len + 1`` tokens; in each window the model reads the first
``seq_len`` tokens and predicts the last ``seq_len`` (every token after the
window's first is predicted exactly once). Perplexity is exp of the mean
negative log-likelihood over all predicted tokens. On the default model and
text (8 windows, seq_len 512) this gives 33.31, matching HF transformers on the
same windows (33.3064).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.eval.logits import map_logit_chunks
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import forward_hidden
from amber_jax.plan.schema import SparsityPlan
from amber_jax.util.progress import progress_bar


def make_windows(tokens: np.ndarray, seq_len: int, num_windows: int | None) -> np.ndarray:
  """[W, seq_len + 1] int32 windows from the start of ``tokens``.

  Raises:
    ValueError: seq_len/num_windows invalid, or the text is too short for the
      windows asked for (the message gives both token counts).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if num_windows is not None and num_windows < 1:
    raise ValueError(f"num_windows must be >= 1 (or None for all), got {num_windows}")
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  available = len(tokens) // (seq_len + 1)
  if available == 0:
    raise ValueError(
      f"text too short: {len(tokens)} tokens, but one window of seq_len={seq_len} needs "
      f"{seq_len + 1}"
    )
  if num_windows is None:
    num_windows = available
  if num_windows > available:
    raise ValueError(
      f"text too short for num_windows={num_windows} windows of seq_len={seq_len}: "
      f"{len(tokens)} tokens give {available}"
    )
  return tokens[: num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)


def _token_nll(logits_BxCxV, targets_BxC):
  target_logit = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BxCxV, axis=-1) - target_logit


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def window_nll(params, windows_BxS, row_weight_B, plan, *, config: LlamaConfig, dtype):
  """(sum of NLL, number of predicted tokens) over weighted rows (0 = padding row)."""
  inputs, targets = windows_BxS[:, :-1], windows_BxS[:, 1:]
  h, _ = forward_hidden(params, inputs, config=config, plan=plan, dtype=dtype)
  nll_BxT = map_logit_chunks(config, params, h, targets, _token_nll)
  weight = row_weight_B.astype(jnp.float32)
  return jnp.sum(nll_BxT.sum(axis=1) * weight), jnp.sum(weight) * inputs.shape[1]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  perplexity: float
  nll: float  # mean negative log-likelihood per predicted token (nats)
  tokens: int  # predicted tokens
  windows: int
  seconds: float  # evaluation time after compilation
  tokens_per_second: float  # forward (prefill) throughput, input tokens / second


def perplexity(
  params,
  windows: np.ndarray,
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  desc: str = "perplexity",
) -> PerplexityResult:
  """Perplexity of ``windows`` ([W, seq_len + 1], from make_windows), batched.

  The last batch is padded with repeated rows of weight 0, so one compiled
  function serves every batch. The first batch is run once before timing, so
  ``seconds`` excludes compilation.

  Raises:
    ValueError: ``batch_size`` < 1, or ``windows`` not a [W, seq_len + 1] array with at least
      one window of at least two tokens.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
    raise ValueError(
      "windows must be a [num_windows >= 1, seq_len + 1 >= 2] array of token ids (see "
      f"make_windows), got shape {windows.shape}"
    )
  n = windows.shape[0]
  batches = []
  for start in range(0, n, batch_size):
    rows = windows[start : start + batch_size]
    weight = np.ones((batch_size,), np.float32)
    if len(rows) < batch_size:
      weight[len(rows) :] = 0
      rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])
    batches.append((jnp.asarray(rows), jnp.asarray(weight)))
  jax.block_until_ready(
    window_nll(params, *batches[0], plan, config=config, dtype=dtype)
  )  # compile
  total_nll, total_tokens = 0.0, 0.0
  start = time.perf_counter()
  with progress_bar(total=n, desc=desc, unit="window", disable=not show_progress) as bar:
    for rows, weight in batches:
      nll, count = window_nll(params, rows, weight, plan, config=config, dtype=dtype)
      total_nll += float(nll)
      total_tokens += float(count)
      bar.update(int(weight.sum()))
  seconds = time.perf_counter() - start
  mean_nll = total_nll / total_tokens
  input_tokens = n * (windows.shape[1] - 1)
  return PerplexityResult(
    perplexity=math.exp(mean_nll),
    nll=mean_nll,
    tokens=int(total_tokens),
    windows=n,
    seconds=seconds,
    tokens_per_second=input_tokens / seconds,
  )
