"""One entry point: model source -> config, params (cached) and tokenizer."""

from __future__ import annotations

import dataclasses
import os

import tokenizers

from amber_jax.io.param_cache import load_cached
from amber_jax.io.sources import ModelSource
from amber_jax.model.config import LlamaConfig
from amber_jax.util.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  config: LlamaConfig
  params: dict  # float32 numpy arrays, our layout
  source: ModelSource
  from_cache: bool


def _convert(source: ModelSource, show_progress: bool) -> tuple[LlamaConfig, dict]:
  if source.kind == "gguf":
    from amber_jax.io.gguf_loader import load_gguf

    with progress_bar(
      total=None, desc="dequantizing GGUF", unit="tensor", disable=not show_progress
    ) as bar:

      def on_tensor(done, total):
        bar.total = total
        bar.update(1)

      return load_gguf(source.path, progress=on_tensor)
  from amber_jax.io.hf import load_hf_checkpoint

  return load_hf_checkpoint(source.path)


def load_model(
  source: ModelSource,
  cache_dir: str | os.PathLike | None,
  *,
  show_progress: bool = True,
  log=print,
) -> LoadedModel:
  """Loads ``source``'s weights, converting and caching them in ``cache_dir`` (None: no cache)."""
  if cache_dir is None:
    config, params = _convert(source, show_progress)
    from_cache = False
  else:
    cached = load_cached(source.path, cache_dir, lambda: _convert(source, show_progress), log=log)
    config, params, from_cache = cached.config, cached.params, cached.from_cache
  return LoadedModel(config=config, params=params, source=source, from_cache=from_cache)


def load_tokenizer(source: ModelSource) -> tokenizers.Tokenizer:
  """The source's tokenizer: rebuilt from GGUF metadata, or the HF directory's tokenizer.json."""
  if source.kind == "gguf":
    from amber_jax.io.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(source.path)
  from amber_jax.io.tokenizer import load_hf_tokenizer

  return load_hf_tokenizer(source.path)
