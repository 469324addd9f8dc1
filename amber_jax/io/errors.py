"""Errors raised when reading model sources (HF directories, GGUF files, caches)."""

from __future__ import annotations


class ModelFileError(ValueError):
  """A model file or directory is missing, truncated, corrupt or inconsistent with its config.

  The message names the offending file (and tensor, where there is one).
  """


class UnsupportedArchitectureError(ValueError):
  """The checkpoint is of an architecture or variant this library does not implement.

  The message names what was found and the supported values.
  """
