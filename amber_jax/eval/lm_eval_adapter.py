"""lm-evaluation-harness adapter: our model (dense, N:M sparse prefill, W8A8) as an ``lm_eval`` LM.

``AmberLM`` subclasses ``lm_eval.api.model.LM`` and answers the harness's three request types
with lm-eval's semantics:

* ``loglikelihood``: :func:`amber_jax.eval.multiple_choice.score_requests` (lm-eval's
  ``_encode_pair`` split, left truncation to ``max_length``). As in HFLM, a non-empty context is
  encoded with the tokenizer's own leading special tokens, an empty one is replaced by
  ``prefix_token_id``.
* ``loglikelihood_rolling``: the whole string's token log-likelihood in lm-eval's disjoint
  windows of ``max_length`` tokens (``lm_eval.utils.get_rolling_token_windows`` with
  ``context_len=1``, then ``make_disjoint_window``); the first token is conditioned on
  ``prefix_token_id``. The string is encoded without special tokens.
* ``generate_until``: greedy decoding only (sparse prefill per plan, dense decode against the KV
  cache, as :func:`amber_jax.model.generate_greedy`), stopped at any of the end-of-text ids
  (a model may have several, e.g. Llama-3-Instruct's ``[128001, 128008, 128009]``; the text is
  cut at the first), at any ``until`` string, or after ``max_gen_toks`` tokens; sampling
  requests raise ValueError.

Two ways in::

  lm = AmberLM(params, config, tokenizer, plan)                     # already loaded
  lm = AmberLM.from_model("smollm2-135m", pattern="8:16", cache_dir=...)  # load and plan
  lm = AmberLM.from_model("smollm2-135m", pattern="8:16", method="amber")  # a named method

and, once this module is imported (it registers the name ``amber_jax``)::

  lm_eval.simple_evaluate(model="amber_jax", model_args="model=smollm2-135m,pattern=8:16", ...)
  lm_eval.simple_evaluate(model="amber_jax", model_args="pattern=8:16,method=best", ...)
  python -m amber_jax.eval.lm_eval_adapter --model amber_jax --model_args ... --tasks ...

Nothing else in ``amber_jax`` imports this module, so the package does not need lm-eval.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from amber_jax.eval.generative_tasks import (
  cut_at_eos,
  eos_id_tuple,
  greedy_generate,
  special_token_ids,
)
from amber_jax.eval.logits import map_logit_chunks
from amber_jax.eval.multiple_choice import bucket_length, score_requests
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import forward_hidden
from amber_jax.plan.schema import SparsityPlan
from amber_jax.util.progress import progress_bar

DEFAULT_CACHE_DIR = "~/.cache/amber_jax"

_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# Accepted and without effect: greedy decoding ignores them (as HF generate does).
_GREEDY_NEUTRAL_KEYS = ("top_p", "top_k", "min_p")
_GEN_KEYS = ("until", "do_sample", "temperature", "num_beams", *_MAX_TOKEN_KEYS)
# AmberLM's own settings that from_model passes through.
_LM_KWARGS = ("batch_size", "max_length", "max_gen_toks", "prefix_token_id", "eot_token_id")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Window = tuple[Sequence[int], Sequence[int]]  # (context ids, ids to score)


def _logprob_and_greedy(logits_BxCxV, targets_BxC):
  logits = logits_BxCxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BxC[..., None], axis=-1)[..., 0]
  logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
  return logprob, jnp.argmax(logits, axis=-1) == targets_BxC


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _window_loglik(params, tokens_BxT, targets_BxT, scored_BxT, valid_BxT, plan, *, config, dtype):
  """Per row: (sum of log p(target) where ``scored_BxT``, all scored targets are the argmax)."""
  h, _ = forward_hidden(
    params, tokens_BxT, config=config, plan=plan, valid_BxT=valid_BxT, dtype=dtype
  )
  # Chunked LM head: [B, T, V] float32 logits of a long window would not fit comfortably.
  logprob, greedy = map_logit_chunks(config, params, h, targets_BxT, _logprob_and_greedy)
  scored = scored_BxT.astype(bool)
  return jnp.sum(jnp.where(scored, logprob, 0.0), axis=1), jnp.all(greedy | ~scored, axis=1)


def rolling_windows(token_ids: Sequence[int], prefix_token_id: int, max_length: int) -> list:
  """lm-eval's disjoint rolling windows of a token list: [(context ids, ids to score)].

  Every token is scored exactly once; the first window starts from ``prefix_token_id``; every
  model input has at most ``max_length`` tokens.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  windows = lm_utils.get_rolling_token_windows(
    token_list=list(token_ids),
    prefix_token=int(prefix_token_id),
    max_seq_len=max_length,
    context_len=1,
  )
  return [lm_utils.make_disjoint_window(w) for w in windows]


def score_token_windows(
  params,
  windows: Sequence[Window],
  *,
  config: LlamaConfig,
  plan: SparsityPlan | None = None,
  batch_size: int = 8,
  dtype=jnp.float32,
  show_progress: bool = True,
  desc: str = "loglikelihood_rolling",
) -> list[tuple[float, bool]]:
  """(summed log-likelihood, is greedy) of the scored ids of each (context, scored) window.

  The model reads ``context + scored`` minus its last token and predicts the ``scored`` tail.
  Rows are batched by length with right padding (padded keys masked) to bucketed lengths, as
  ``score_requests`` does for text pairs.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  rows = []
  for ctx, scored in windows:
    if not scored or not ctx:
      raise ValueError("each window needs at least one context id and one id to score")
    rows.append((np.asarray([*ctx, *scored], np.int32), len(scored)))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  results: list = [None] * len(rows)
  with progress_bar(
    total=len(rows), desc=desc, unit="window", disable=not show_progress or not rows
  ) as bar:
    for start in range(0, len(order), batch_size):
      idx = order[start : start + batch_size]
      t = bucket_length(max(len(rows[i][0]) for i in idx) - 1, cap=config.seq_len_limit)
      tokens = np.zeros((batch_size, t), np.int32)
      targets = np.zeros((batch_size, t), np.int32)
      scored = np.zeros((batch_size, t), bool)
      valid = np.zeros((batch_size, t), bool)
      valid[:, 0] = True  # padding rows: one valid key, so no row attends to nothing
      for r, i in enumerate(idx):
        full, n_scored = rows[i]
        n = len(full) - 1
        tokens[r, :n], targets[r, :n] = full[:-1], full[1:]
        valid[r, :n] = True
        scored[r, n - n_scored : n] = True
      loglik, greedy = (
        np.asarray(a)
        for a in _window_loglik(
          params, tokens, targets, scored, valid, plan, config=config, dtype=dtype
        )
      )
      for r, i in enumerate(idx):
        results[i] = (float(loglik[r]), bool(greedy[r]))
      bar.update(len(idx))
  return results


def _args(request) -> tuple:
  """An lm-eval ``Instance``'s arguments, or the tuple itself (for direct calls)."""
  args = getattr(request, "args", request)
  return args if isinstance(args, tuple) else tuple(args)


def _parse_gen_kwargs(gen_kwargs, default_max_gen_toks: int) -> tuple[list[str], int]:
  """(stop strings, max new tokens) of a generate_until request; ValueError for sampling."""
  if not isinstance(gen_kwargs, dict):
    raise ValueError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
  unknown = sorted(set(gen_kwargs) - set(_GEN_KEYS) - set(_GREEDY_NEUTRAL_KEYS))
  if unknown:
    raise ValueError(
      f"generate_until: unsupported gen_kwargs {unknown}; supported: "
      f"{', '.join(_GEN_KEYS + _GREEDY_NEUTRAL_KEYS)} (greedy decoding only)"
    )
  do_sample = gen_kwargs.get("do_sample")
  temperature = float(gen_kwargs.get("temperature") or 0.0)
  # lm-eval's rule (models.utils.normalize_gen_kwargs): do_sample=False means greedy whatever the
  # temperature; unspecified do_sample with temperature > 0 means sampling.
  if do_sample or (do_sample is None and temperature > 0):
    raise ValueError(
      f"generate_until: sampling was requested (do_sample={do_sample}, temperature={temperature})"
      ", but AmberLM decodes greedily only: use do_sample=False / temperature=0"
    )
  num_beams = int(gen_kwargs.get("num_beams") or 1)
  if num_beams != 1:
    raise ValueError(f"generate_until: num_beams={num_beams} is not supported (greedy only)")
  until = gen_kwargs.get("until")
  if until is None:
    until = []
  elif isinstance(until, str):
    until = [until]
  if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
    raise ValueError(f"generate_until: until must be a string or a list of strings, got {until!r}")
  max_gen = next((gen_kwargs[k] for k in _MAX_TOKEN_KEYS if gen_kwargs.get(k) is not None), None)
  max_gen = default_max_gen_toks if max_gen is None else int(max_gen)
  if max_gen < 1:
    raise ValueError(f"generate_until: max_gen_toks must be >= 1, got {max_gen}")
  return list(until), max_gen


def _check_batch_size(value) -> int:
  if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
    raise ValueError(f"batch_size must be a positive integer, got {value!r} ('auto' is not one)")
  return int(value)


def _parse_skip_layers(value) -> tuple[int, ...]:
  if value is None or value == "":
    return ()
  if isinstance(value, int):
    return (value,)
  try:
    if isinstance(value, str):  # "1;3;4" (commas separate lm-eval model_args)
      return tuple(int(v) for v in value.replace("/", ";").split(";") if v.strip())
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(
      f"skip_layers must be layer numbers separated by ';' (e.g. 1;3;4), got {value!r}"
    ) from None


def _number(name: str, value, kind=float):
  """``kind(value)`` (a model_args string, say), or a ValueError naming the argument."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}")
  try:
    return kind(value)
  except (TypeError, ValueError):
    what = "an integer" if kind is int else "a number"
    raise ValueError(f"{name} must be {what}, got {value!r}") from None


def _check_lm_options(
  config: LlamaConfig,
  tokenizer: tokenizers.Tokenizer,
  *,
  max_length,
  max_gen_toks,
  prefix_token_id,
  eot_token_id,
) -> tuple[int, int, int | None, tuple[int, ...]]:
  """(max_length, max_gen_toks, prefix_token_id, EOS ids), checked against the model's context
  and the tokenizer's vocabulary (ValueError naming the argument); the defaults filled in."""
  limit = config.seq_len_limit
  max_length = limit if max_length is None else _number("max_length", max_length, int)
  if not 2 <= max_length <= limit:
    raise ValueError(f"max_length must be in 2..{limit} (the model's context), got {max_length}")
  max_gen_toks = _number("max_gen_toks", max_gen_toks, int)
  if max_gen_toks < 1:
    raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
  if prefix_token_id is None:
    template = tokenizer.encode("", add_special_tokens=True).ids
    prefix_token_id = template[-1] if template else None
  elif not isinstance(prefix_token_id, int):
    prefix_token_id = _number("prefix_token_id", prefix_token_id, int)
  eos_ids = eos_id_tuple(eot_token_id, "eot_token_id")
  n_vocab = tokenizer.get_vocab_size()
  checks = [("prefix_token_id", prefix_token_id)] + [("eot_token_id", e) for e in eos_ids]
  for name, value in checks:
    if value is not None and not 0 <= int(value) < n_vocab:
      raise ValueError(f"{name}={value} is outside the tokenizer's vocabulary (0..{n_vocab - 1})")
  return max_length, max_gen_toks, prefix_token_id, eos_ids


@register_model("amber_jax")
class AmberLM(LM):
  """Our Llama-family model (optionally N:M-sparse prefill and W8A8, per ``plan``) for lm-eval.

  Args:
    params: the model's params (our layout; arrays of the compute dtype).
    config: its configuration.
    tokenizer: its ``tokenizers.Tokenizer``.
    plan: a SparsityPlan (N:M sites, W8A8 part) or None for the dense model.
    batch_size: rows per compiled forward pass.
    dtype: compute dtype (jnp dtype or "float32" / "bfloat16").
    max_length: longest model input in tokens (default ``config.seq_len_limit``: the
      context, or the sliding window if shorter).
    max_gen_toks: generate_until's default number of new tokens.
    prefix_token_id: the token an empty context and rolling windows start from (lm-eval uses
      the BOS, else the EOS id); default: the tokenizer's leading special token, if any.
    eot_token_id: generation stops at this id (the EOS), or at any of a list of ids (a model
      with several end-of-text ids; the first is the EOS proper); the text is cut at the first
      of them. None: generation stops only at ``until`` strings.
    show_progress: progress bars (lm-eval's ``disable_tqdm`` also turns them off).
  """

  def __init__(
    self,
    params,
    config: LlamaConfig,
    tokenizer: tokenizers.Tokenizer,
    plan: SparsityPlan | None = None,
    *,
    batch_size: int = 8,
    dtype=jnp.float32,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    prefix_token_id: int | None = None,
    eot_token_id: int | Sequence[int] | None = None,
    show_progress: bool = True,
  ):
    super().__init__()
    if isinstance(dtype, str):
      if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
      dtype = _DTYPES[dtype]
    batch_size = _check_batch_size(batch_size)
    max_length, max_gen_toks, prefix_token_id, eos_ids = _check_lm_options(
      config,
      tokenizer,
      max_length=max_length,
      max_gen_toks=max_gen_toks,
      prefix_token_id=prefix_token_id,
      eot_token_id=eot_token_id,
    )
    self.params = params
    self.config = config
    self.tokenizer = tokenizer
    self.plan = plan
    self.dtype = dtype
    self._batch_size = batch_size
    self._max_length = max_length
    self.max_gen_toks = int(max_gen_toks)
    self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
    self._eos_token_ids = eos_ids
    self.show_progress = show_progress
    # The plan's amber_jax.calibrate.methods name ("dense", "amber", ...) when from_model built it.
    self.method: str | None = None

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def eot_token_id(self) -> int | None:
    """The EOS id (the first end-of-text id), or None."""
    return self._eos_token_ids[0] if self._eos_token_ids else None

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """Every id that ends generation (empty: only ``until`` strings do)."""
    return self._eos_token_ids

  @property
  def prefix_token_id(self) -> int:
    if self._prefix_token_id is None:
      raise ValueError(
        "this request needs a prefix token (empty context or loglikelihood_rolling): pass "
        "prefix_token_id (lm-eval uses the BOS, else the end-of-text id)"
      )
    return self._prefix_token_id

  # ---- construction from a model name or path (lm-eval's --model_args) ----

  @classmethod
  def from_model(
    cls,
    model: str = "smollm2-135m",
    *,
    pattern: str = "dense",
    method: str | None = None,
    sparsity: float | None = None,
    score: str | None = None,
    policy: str | None = None,
    skip_layers=(),
    coverage: float = 0.55,
    granularity: str | None = None,
    impl: str | None = None,
    plan_dir: str | None = None,
    text: str = "lee_background",
    seq_len: int = 512,
    calib_windows: int = 8,
    calib_offset_windows: int = 8,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    dtype: str = "float32",
    show_progress: bool = True,
    log=print,
    **kwargs,
  ) -> AmberLM:
    """Loads ``model`` (a known name, a GGUF file or an HF directory) and builds its plan.

    The plan is ``pattern`` ("dense" or "N:M") with a named ``method`` of
    :mod:`amber_jax.calibrate.methods` (``amber``, ``naive``, ``search_mixed+learned``, ``best``,
    ...; its canonical name is ``lm.method``) or, without one, ``score`` (default "naive"),
    ``policy`` (default "all"), ``skip_layers`` ("1;3;4") and ``granularity`` (default "layer") as
    in ``experiments/prefill.py`` (:class:`amber_jax.calibrate.pruner.AmberConfig`); a method
    together with a score, policy or granularity of another value is a ValueError naming both.
    A baseline method of another paper (``wanda``, ``sparsegpt``: ``pattern`` or ``sparsity``;
    ``teal``, ``teal_uniform``, ``cats``: ``sparsity``) is built by
    ``amber_jax.calibrate.methods.build_method`` on the same calibration windows (weight
    pruning gives the evaluated model its pruned weights).
    ``coverage`` is the target of the methods and policies that have one. Calibrating plans (policy
    "auto") calibrate on ``calib_windows``
    windows of ``seq_len + 1`` tokens of ``text`` after its first ``calib_offset_windows``
    windows (the prefill experiment's calibration windows). Or ``plan_dir`` restores a plan
    saved by ``experiments/prefill.py --save_plan`` (the only way to a W8A8 plan here). The
    weights are cached in ``cache_dir`` (known names are also fetched there). ``kwargs`` go to
    :class:`AmberLM` (batch_size, max_length, max_gen_toks, prefix_token_id, eot_token_id);
    the prefix and end-of-text ids default to the model's BOS (else EOS) and EOS ids.

    Raises:
      ValueError: bad plan options, or a pattern that does not fit the model, before any
        weights are loaded.
    """
    from amber_jax.calibrate.methods import (
      build_method_plan,
      check_method_conflicts,
      identify_method,
    )
    from amber_jax.calibrate.pruner import AmberConfig
    from amber_jax.core.patterns import parse_pattern_or_dense
    from amber_jax.io.loading import load_model, load_tokenizer, to_device
    from amber_jax.io.sources import read_config, resolve_model

    if dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    unknown = sorted(set(kwargs) - set(_LM_KWARGS))
    if unknown:
      own = [p for p in inspect.signature(cls.from_model).parameters if p not in ("kwargs", "log")]
      raise ValueError(
        f"unknown AmberLM arguments {unknown}; known: {', '.join(own + list(_LM_KWARGS))}"
      )
    if "batch_size" in kwargs:  # checked before anything loads
      kwargs["batch_size"] = _check_batch_size(kwargs["batch_size"])
    old = {"score": score, "policy": policy, "granularity": granularity}
    resolved = None
    baseline = None  # (pattern, sparsity) of a baseline method
    if sparsity is not None and not method:
      raise ValueError("sparsity applies to a baseline method (method=wanda, teal, ...)")
    if method:
      resolved = check_method_conflicts(
        str(method), {k: v for k, v in old.items() if v is not None}
      )
    if resolved is not None and resolved.is_baseline:
      from amber_jax.calibrate.methods import check_method_target

      given = None if str(pattern) == "dense" else str(pattern)
      target = _number("sparsity", sparsity) if sparsity is not None else None
      _, b_pattern, b_sparsity = check_method_target(resolved, given, target)
      baseline = (b_pattern, b_sparsity)
      if plan_dir:
        raise ValueError(f"method={method!r} builds its own model; plan_dir does not apply")
      amber = AmberConfig(pattern=None, impl=impl)
    elif resolved is not None:
      amber = resolved.amber_config(
        parse_pattern_or_dense(str(pattern)),
        coverage=_number("coverage", coverage),
        impl=impl,
        skip_layers=_parse_skip_layers(skip_layers),
      )
    else:
      amber = AmberConfig(
        pattern=parse_pattern_or_dense(str(pattern)),
        score=score or "naive",
        policy=policy or "all",
        skip_layers=_parse_skip_layers(skip_layers),
        coverage=_number("coverage", coverage),
        granularity=granularity or "layer",
        impl=impl,
      )
    calibrates = amber.needs_calibration or (resolved is not None and resolved.needs_calibration)
    builds = amber.pattern is not None or baseline is not None
    if plan_dir and amber.pattern is not None:
      raise ValueError(f"give pattern={pattern!r} or plan_dir={plan_dir!r}, not both")
    if calibrates and builds:
      from amber_jax.runs.checks import check_text_source

      seq_len = _number("seq_len", seq_len, int)
      calib_windows = _number("calib_windows", calib_windows, int)
      calib_offset_windows = _number("calib_offset_windows", calib_offset_windows, int)
      if calib_windows < 1 or calib_offset_windows < 0:
        raise ValueError(
          f"{f'method={resolved.name!r}' if resolved else f'policy={amber.policy!r}'} "
          "calibrates: calib_windows must be >= 1 and "
          f"calib_offset_windows >= 0, got {calib_windows} and {calib_offset_windows}"
        )
      check_text_source(str(text), arg="text")
    from amber_jax.runs.common import check_cache_dir

    check_cache_dir(str(Path(cache_dir).expanduser()))
    cache_dir = Path(cache_dir).expanduser()
    source = resolve_model(str(model), cache_dir, log=log)
    config = read_config(source)
    amber.validate_for(config)
    # Everything checked before the weights load: the AmberLM options against the model's
    # context and the tokenizer, the calibration text's windows, a saved plan.
    tokenizer = load_tokenizer(source)
    bos, eos = special_token_ids(source.path)
    kwargs.setdefault("prefix_token_id", bos if bos is not None else (eos[0] if eos else None))
    kwargs.setdefault("eot_token_id", list(eos) or None)
    _check_lm_options(
      config,
      tokenizer,
      max_length=kwargs.get("max_length"),
      max_gen_toks=kwargs.get("max_gen_toks", 256),
      prefix_token_id=kwargs["prefix_token_id"],
      eot_token_id=kwargs["eot_token_id"],
    )
    calib = None
    if builds and calibrates:
      from amber_jax.data.texts import load_text
      from amber_jax.eval.perplexity import make_windows
      from amber_jax.runs.common import check_seq_len_for

      check_seq_len_for(config, seq_len)
      ids = tokenizer.encode(load_text(text, cache_dir, log=log)).ids
      windows = make_windows(ids, seq_len, calib_offset_windows + calib_windows)
      calib = windows[calib_offset_windows:]
    plan = None
    if plan_dir:
      from amber_jax.plan.io import load_sparsity_plan

      plan, _ = load_sparsity_plan(
        plan_dir, expect={"model_config": dataclasses.asdict(config)}, config=config
      )
    loaded = load_model(source, cache_dir, dtype=dtype, show_progress=show_progress, log=log)
    params = to_device(loaded.params, _DTYPES[dtype])
    if baseline is not None:
      from amber_jax.calibrate.methods import build_method

      built = build_method(
        params,
        loaded.config,
        resolved,
        pattern=baseline[0],
        sparsity=baseline[1],
        calib_windows=calib,
        dtype=_DTYPES[dtype],
        show_progress=show_progress,
      )
      params, plan = built.params, built.plan
    elif amber.pattern is not None:
      plan = build_method_plan(
        params,
        loaded.config,
        resolved,
        amber,
        calib_windows=calib,
        dtype=_DTYPES[dtype],
        show_progress=show_progress,
      ).plan
    lm = cls(
      params,
      loaded.config,
      tokenizer,
      plan,
      dtype=dtype,
      show_progress=show_progress,
      **kwargs,
    )
    if plan_dir:
      lm.method = "loaded"
    else:
      lm.method = resolved.name if resolved is not None else identify_method(amber)
    return lm

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> AmberLM:
    """lm-eval's constructor from ``model_args``: :meth:`from_model` with those arguments.

    Of lm-eval's extra settings, ``batch_size`` is used (``model_args`` wins), ``device`` and
    ``max_batch_size`` are ignored (JAX places arrays on its default device; batches are fixed).
    """
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    extra.pop("device", None)
    extra.pop("max_batch_size", None)
    return cls.from_model(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """``"model=smollm2-135m,pattern=8:16,batch_size=8"`` -> :meth:`from_model`."""
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  # ---- the three request types ----

  def _progress(self, disable_tqdm: bool) -> bool:
    return self.show_progress and not disable_tqdm

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), continuation is the greedy one) per (context,
    continuation) request, in order."""
    pairs = [_args(r)[:2] for r in requests]
    results: list = [None] * len(pairs)
    with_context = [i for i, (c, _) in enumerate(pairs) if c != ""]
    empty = [i for i, (c, _) in enumerate(pairs) if c == ""]
    # As HFLM: a non-empty context keeps the tokenizer's own leading special tokens (None: the
    # template); an empty one is replaced by the prefix token.
    for idx, needs_prefix in ((with_context, False), (empty, True)):
      if not idx:
        continue
      scores = score_requests(
        self.params,
        [pairs[i] for i in idx],
        config=self.config,
        tokenizer=self.tokenizer,
        plan=self.plan,
        batch_size=self.batch_size,
        dtype=self.dtype,
        show_progress=self._progress(disable_tqdm),
        max_length=self.max_length,
        # self.prefix_token_id raises a clear error when there is none.
        prefix_token_id=self.prefix_token_id if needs_prefix else None,
      )
      for i, (loglik, _, greedy) in zip(idx, scores, strict=True):
        results[i] = (loglik, greedy)
        self.cache_hook.add_partial("loglikelihood", pairs[i], results[i])
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole string (every token scored once, in disjoint windows of
    ``max_length`` tokens; the first conditioned on the prefix token)."""
    strings = [_args(r)[0] for r in requests]
    windows, owner = [], []
    for i, s in enumerate(strings):
      ids = self.tokenizer.encode(s, add_special_tokens=False).ids
      if ids:
        for w in rolling_windows(ids, self.prefix_token_id, self.max_length):
          windows.append(w)
          owner.append(i)
    scores = score_token_windows(
      self.params,
      windows,
      config=self.config,
      plan=self.plan,
      batch_size=self.batch_size,
      dtype=self.dtype,
      show_progress=self._progress(disable_tqdm),
    )
    totals = [0.0] * len(strings)
    for i, (loglik, _) in zip(owner, scores, strict=True):
      totals[i] += loglik
    for s, total in zip(strings, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", (s,), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuation of each (context, gen_kwargs) request, cut at the first ``until``
    string or the first of the end-of-text ids, at most ``max_gen_toks`` tokens.

    The context keeps its last ``max_length - max_gen_toks`` tokens. Raises ValueError (before
    any generation) for sampling, beams or unknown generation arguments.
    """
    jobs = []  # (prompt ids, stop strings, max new tokens)
    eos_texts = [self.tokenizer.decode([e], skip_special_tokens=False) for e in self.eos_token_ids]
    for req in requests:
      context, gen_kwargs = _args(req)[:2]
      until, max_gen = _parse_gen_kwargs(gen_kwargs, self.max_gen_toks)
      for eos_text in eos_texts:  # as HFLM: the EOS text is a stop string too
        if eos_text and eos_text not in until:
          until.append(eos_text)
      if max_gen >= self.max_length:
        raise ValueError(
          f"generate_until: max_gen_toks={max_gen} leaves no room for the context in "
          f"max_length={self.max_length}"
        )
      ids = self.tokenizer.encode(context, add_special_tokens=True).ids
      ids = ids[-(self.max_length - max_gen) :] if ids else [self.prefix_token_id]
      jobs.append((ids, until, max_gen))
    # Prompts of any lengths share a batch (left padding); a batch shares max_gen_toks.
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0])):
      groups.setdefault(jobs[i][2], []).append(i)
    results: list = [None] * len(jobs)
    with progress_bar(
      total=len(jobs), desc="generate_until", unit="req", disable=not self._progress(disable_tqdm)
    ) as bar:
      for max_gen, members in groups.items():
        for start in range(0, len(members), self.batch_size):
          idx = members[start : start + self.batch_size]
          # Pad the batch to a power of two with copies of its first row: few shapes compile.
          b = min(self.batch_size, 1 << (len(idx) - 1).bit_length())
          rows = idx + [idx[0]] * (b - len(idx))

          # Padding rows (None) never hold the batch back.
          stops = [jobs[i][1] for i in idx] + [None] * (b - len(idx))
          outs = greedy_generate(
            self.params,
            [jobs[i][0] for i in rows],
            config=self.config,
            max_new_tokens=max_gen,
            plan=self.plan,
            dtype=self.dtype,
            should_stop=lambda r, ids, stops=stops: (
              stops[r] is None or self._stopped(ids, stops[r])
            ),
          )
          for r, i in enumerate(idx):
            results[i] = self._finish(outs[r], jobs[i][1])
            self.cache_hook.add_partial("generate_until", _args(requests[i])[:2], results[i])
          bar.update(len(idx))
    return results

  def _stopped(self, ids: list[int], until: list[str]) -> bool:
    if any(t in self.eos_token_ids for t in ids):
      return True
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    return any(s and s in text for s in until)

  def _finish(self, ids: list[int], until: list[str]) -> str:
    text = self.tokenizer.decode(cut_at_eos(ids, self.eos_token_ids), skip_special_tokens=True)
    for s in until:  # as lm-eval's postprocess_generated_text: cut at each stop string
      if s:
        text = text.split(s)[0]
    return text


if __name__ == "__main__":
  # ``python -m amber_jax.eval.lm_eval_adapter --model amber_jax --model_args ...``: lm-eval's
  # own command line, with this module imported so that the name ``amber_jax`` is registered.
  from lm_eval.__main__ import cli_evaluate

  cli_evaluate()
