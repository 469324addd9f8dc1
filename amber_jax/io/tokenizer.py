"""Tokenizers of model sources: HF `tokenizer.json` files."""

from __future__ import annotations

import os
import pathlib

import tokenizers

from amber_jax.io.errors import ModelFileError


def load_hf_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` of an HF `tokenizer.json`, or of a directory that holds one.

  Raises `ModelFileError` naming the file when it is missing or cannot be parsed. Only the fast
  tokenizer file is read (no `tokenizer_config.json`: chat templates and special-token roles are
  the caller's business).
  """
  path = pathlib.Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.is_file():
    raise ModelFileError(f"tokenizer file not found: {os.fspath(file)!r}")
  try:
    return tokenizers.Tokenizer.from_file(os.fspath(file))
  except Exception as e:  # tokenizers raises a plain Exception on malformed JSON.
    raise ModelFileError(f"cannot parse tokenizer file {os.fspath(file)!r}: {e}") from e
