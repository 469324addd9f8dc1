"""Helpers shared by the experiment scripts (the environment is read here, not in the library)."""

from __future__ import annotations

import logging as std_logging
import os
import sys
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


class _PlainFormatter(std_logging.Formatter):
  """'warning: message': a warning that matters to the user is one plain line."""

  def format(self, record):
    return f"{record.levelname.lower()}: {record.getMessage()}"


def quiet_logging() -> None:
  """Library logs (absl, orbax, JAX's backend probe) at WARNING and above only, each as one
  plain line, unless ``--verbosity``/``-v`` was given (then absl's full format and level)."""
  from absl import flags
  from absl import logging as absl_logging

  if flags.FLAGS["verbosity"].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.get_absl_handler().setFormatter(_PlainFormatter())


def run(main) -> None:
  """``app.run(main)`` with the experiments' conventions: quiet logs (``quiet_logging``), and
  bad input (a ValueError, an OSError such as an unreadable file, a failed registry fetch)
  reported as one line ``error: ...`` with exit status 1 instead of a traceback."""
  from absl import app

  from amber_jax.io.registry import RegistryFetchError

  def main_with_conventions(argv):
    quiet_logging()
    try:
      return main(argv)
    except (ValueError, OSError, RegistryFetchError) as e:
      sys.exit(f"error: {_one_line(e)}")

  app.run(main_with_conventions)


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    text = f"{error.strerror}: {error.filename!r}"
  return " ".join(text.split())
