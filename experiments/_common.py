"""Helpers shared by the experiment scripts (the environment is read here, not in the library)."""

from __future__ import annotations

import os
from pathlib import Path

# The --cache_dir flags' help: where default_cache_dir looks.
CACHE_DIR_DEFAULT = "$AMBER_JAX_CACHE, else $XDG_CACHE_HOME/amber_jax or ~/.cache/amber_jax"


def default_cache_dir() -> str:
  """$AMBER_JAX_CACHE, else $XDG_CACHE_HOME/amber_jax, else ~/.cache/amber_jax."""
  if os.environ.get("AMBER_JAX_CACHE"):
    return os.environ["AMBER_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return str(Path(base) / "amber_jax")


def cpu_model_name() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else ""."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform

  return platform.processor()


def usable_cpus() -> int:
  """CPUs this process may run on (its affinity mask, as under taskset): what XLA:CPU uses."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def define_impl_flag():
  """The ``--impl`` flag of the experiments that run sparse prefills (one definition)."""
  from absl import flags

  from amber_jax.impl import IMPLS

  return flags.DEFINE_enum(
    "impl",
    None,
    list(IMPLS),
    "Sparse matmul: xla (jnp mask + XLA dot), pallas (fused kernel) or pallas_mask (Pallas "
    "mask pass + XLA dot); the Pallas ones run in interpret mode on CPU. Default: xla "
    "(faster than the measured kernels on an H200; see BENCHMARKS.md). Results do not "
    "depend on it.",
  )
