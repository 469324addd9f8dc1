"""Shared setup of evaluation jobs: model, tokenizer, text windows, params on device."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.data.texts import DEFAULT_TEXT, load_text
from amber_jax.eval.perplexity import make_windows
from amber_jax.io.loading import load_model, load_tokenizer, to_device
from amber_jax.io.sources import DEFAULT_MODEL, read_config, resolve_model
from amber_jax.model.config import LlamaConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  return dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalRunOptions:
  """The fields the table and front runners share (one definition): the model, the text whose
  first ``num_windows`` windows of ``seq_len`` predicted tokens are evaluated and whose next
  ``calib_windows`` calibrate, windows per forward pass, compute dtype, and the cache."""

  model: str = DEFAULT_MODEL
  seq_len: int = 512
  num_windows: int = 8
  calib_windows: int = 8
  batch_size: int = 4
  dtype: str = "float32"
  text: str = DEFAULT_TEXT
  cache_dir: str = ""


def recorded_config(cfg) -> dict:
  """A run config as results files record it: every field but ``cache_dir`` (where the model
  is cached changes nothing that was measured, and it is a path of one machine)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}


def check_model_options(dtype: str, cache_dir: str) -> None:
  """The checks every run config shares: a known compute dtype and a cache directory."""
  check_dtype(dtype)
  if not cache_dir:
    raise ValueError("cache_dir must be given (where the model and text are cached)")
  check_cache_dir(cache_dir)


def check_cache_dir(cache_dir: str) -> None:
  """ValueError naming ``cache_dir`` if it (or its nearest existing ancestor) is not a
  directory this process can write into; a missing one is created on first use."""
  path = pathlib.Path(cache_dir)
  existing = path if path.exists() else next((p for p in path.parents if p.exists()), None)
  if existing is not None and not existing.is_dir():
    raise ValueError(f"cache_dir {cache_dir!r} is not a directory ({str(existing)!r} is a file)")
  if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(
      f"cache_dir {cache_dir!r} is not writable (no permission in {str(existing)!r})"
    )


def check_seq_len_for(config: LlamaConfig, seq_len: int) -> None:
  """ValueError naming ``seq_len`` if a window of that many positions exceeds the model's
  context (max_seq_len, or a shorter sliding window)."""
  if not 1 <= seq_len <= config.seq_len_limit:
    raise ValueError(
      f"seq_len must be in 1..{config.seq_len_limit} (the model's context), got {seq_len}"
    )


@dataclasses.dataclass(frozen=True)
class EvalSetup:
  config: LlamaConfig
  params: dict  # jax arrays of the compute dtype
  eval_windows: np.ndarray  # [W, seq_len + 1]
  calib_windows: np.ndarray  # [C, seq_len + 1], after the evaluation windows
  rest_tokens: np.ndarray  # what follows (e.g. generation prompts)
  params_from_cache: bool


def prepare_eval(
  *,
  model: str,
  text: str,
  cache_dir: str,
  seq_len: int,
  num_windows: int,
  calib_windows: int,
  dtype: str,
  validate=None,
  show_progress: bool = True,
  log=print,
) -> EvalSetup:
  """Resolves the model, checks ``seq_len`` against its context and runs
  ``validate(config)`` (both before any weights are loaded), tokenizes the text into
  evaluation then calibration windows, and loads the params."""
  source = resolve_model(model, cache_dir, log=log)
  model_config = read_config(source)
  check_seq_len_for(model_config, seq_len)
  if validate is not None:
    validate(model_config)
  tokenizer = load_tokenizer(source)
  ids = np.asarray(tokenizer.encode(load_text(text, cache_dir, log=log)).ids, np.int32)
  windows = make_windows(ids, seq_len, num_windows + calib_windows)
  rest = ids[len(windows) * (seq_len + 1) :]
  # Loaded in the compute dtype (a bf16 run never holds fp32 weights) and placed leaf by leaf.
  loaded = load_model(source, cache_dir, dtype=dtype, show_progress=show_progress, log=log)
  params = to_device(loaded.params, DTYPES[dtype])
  return EvalSetup(
    config=loaded.config,
    params=params,
    eval_windows=windows[:num_windows],
    calib_windows=windows[num_windows:],
    rest_tokens=rest,
    params_from_cache=loaded.from_cache,
  )


def environment() -> dict:
  """Package versions and device, for result files."""
  versions = {"python": platform.python_version()}
  for pkg in (
    "amber_jax",
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "orbax-checkpoint",
    "gguf",
    "tokenizers",
  ):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = "not installed"
  device = {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "machine": platform.machine(),
    "processor": platform.processor(),
  }
  return {"versions": versions, "device": device}


def evaluation_texts(setup: EvalSetup, cfg, log=print) -> dict[str, np.ndarray]:
  """Evaluation windows per text: ``cfg.text``'s from ``setup``, and when ``cfg.transfer_text``
  is set, the first ``cfg.num_windows`` windows of that second text (known name or file; only
  evaluated, never calibrated on). ``cfg`` needs model, text, transfer_text, cache_dir, seq_len
  and num_windows."""
  texts = {cfg.text: setup.eval_windows}
  if cfg.transfer_text:
    tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.cache_dir, log=log))
    ids = tokenizer.encode(load_text(cfg.transfer_text, cfg.cache_dir, log=log)).ids
    texts[cfg.transfer_text] = make_windows(np.asarray(ids, np.int32), cfg.seq_len, cfg.num_windows)
  return texts
