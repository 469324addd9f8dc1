"""Helpers shared by the experiment scripts (they read flags and environment; the library never does)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> str:
  """$AMBER_JAX_CACHE, else $XDG_CACHE_HOME/amber_jax, else ~/.cache/amber_jax."""
  if os.environ.get("AMBER_JAX_CACHE"):
    return os.environ["AMBER_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return str(Path(base) / "amber_jax")
