"""One entry point: model source -> config, params (cached) and tokenizer."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tokenizers

from amber_jax.io.param_cache import load_cached
from amber_jax.io.sources import ModelSource
from amber_jax.model.config import LlamaConfig
from amber_jax.util.memory import release_free_memory
from amber_jax.util.progress import progress_bar

# The dtypes weights are loaded in: numpy's (bf16 from ml_dtypes) for the host arrays.
LOAD_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def check_load_dtype(dtype: str) -> str:
  if dtype not in LOAD_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(LOAD_DTYPES)}, got {dtype!r}")
  return dtype


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  config: LlamaConfig
  params: dict  # numpy arrays of the load dtype, our layout
  source: ModelSource
  from_cache: bool


def _convert(source: ModelSource, dtype: str, show_progress: bool) -> tuple[LlamaConfig, dict]:
  np_dtype = LOAD_DTYPES[dtype]
  if source.kind == "gguf":
    from amber_jax.io.gguf_loader import load_gguf

    with progress_bar(
      total=None, desc="dequantizing GGUF", unit="tensor", disable=not show_progress
    ) as bar:

      def on_tensor(done, total):
        bar.total = total
        bar.update(1)

      return load_gguf(source.path, dtype=np_dtype, progress=on_tensor)
  from amber_jax.io.hf import load_hf_checkpoint

  with progress_bar(
    total=None, desc="reading safetensors", unit="array", disable=not show_progress
  ) as bar:

    def on_array(done, total):
      bar.total = total
      bar.update(1)

    return load_hf_checkpoint(source.path, dtype=np_dtype, progress=on_array)


def load_model(
  source: ModelSource,
  cache_dir: str | os.PathLike | None,
  *,
  dtype: str = "float32",
  show_progress: bool = True,
  log=print,
) -> LoadedModel:
  """Loads ``source``'s weights as numpy arrays of ``dtype`` ("float32" or "bfloat16": a bf16
  checkpoint stays bf16, an fp32 one is rounded tensor by tensor), converting and caching them
  in ``cache_dir`` (None: no cache; each dtype has its own entry).

  Streamed: the peak host memory is the params plus about one stacked array (BENCHMARKS.md,
  "Host memory of loading"); ``to_device`` keeps it so on the way to the device.
  """
  check_load_dtype(dtype)
  if cache_dir is None:
    config, params = _convert(source, dtype, show_progress)
    from_cache = False
  else:
    cached = load_cached(
      source.path, cache_dir, lambda: _convert(source, dtype, show_progress), dtype=dtype, log=log
    )
    config, params, from_cache = cached.config, cached.params, cached.from_cache
  return LoadedModel(config=config, params=params, source=source, from_cache=from_cache)


def to_device(params: dict, dtype, sharding=None) -> dict:
  """The params as jax arrays of ``dtype`` (a jnp dtype or its name), placed leaf by leaf.

  Consumes ``params``: each numpy leaf is removed from its dict once its device copy exists, so
  that host memory holds the params plus one leaf (not two copies of the model, as a
  ``jax.tree.map(jnp.asarray, params)`` does while the caller still holds the numpy tree; on a
  CPU backend the device copy is host memory too). ``sharding``, when given, is a pytree of
  ``jax.sharding.Sharding`` matching ``params`` (e.g. ``NamedSharding(mesh, spec)`` over
  ``amber_jax.plan.sharding.param_specs``): each leaf goes straight to its shards.
  """
  dtype = jnp.dtype(dtype)

  def place(node: dict, shard) -> dict:
    out = {}
    for key in list(node):
      value = node.pop(key)
      sub = None if shard is None else shard[key]
      if isinstance(value, dict):
        out[key] = place(value, sub)
        continue
      arr = np.asarray(value)
      if arr.dtype != dtype:
        arr = arr.astype(dtype)
      # Blocking: device_put copies asynchronously and keeps the host array alive until done,
      # so without it every leaf's host copy would still be live at the end (2x the model).
      out[key] = jax.device_put(arr, sub).block_until_ready()
      del value, arr  # the host copy goes now, before the next leaf is placed
      release_free_memory()
    return out

  return place(params, sharding)


def load_tokenizer(source: ModelSource) -> tokenizers.Tokenizer:
  """The source's tokenizer: rebuilt from GGUF metadata, or the HF directory's tokenizer.json."""
  if source.kind == "gguf":
    from amber_jax.io.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(source.path)
  from amber_jax.io.tokenizer import load_hf_tokenizer

  return load_hf_tokenizer(source.path)
