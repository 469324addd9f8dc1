"""Shared test setup: strict rank promotion (nanodo convention) and the real-model cache dir."""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

# Implicit rank promotion hides shape bugs (a [B] array meeting a [B, T] one); make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def cache_dir() -> pathlib.Path:
  """Where the real model and texts are fetched to: $AMBER_JAX_CACHE, else ~/.cache/amber_jax.

  Tests may read the environment; the library never does (it is given this path).
  """
  path = os.environ.get("AMBER_JAX_CACHE")
  path = pathlib.Path(path) if path else pathlib.Path.home() / ".cache" / "amber_jax"
  path.mkdir(parents=True, exist_ok=True)
  return path
