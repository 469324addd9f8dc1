"""Helpers shared by the experiment scripts (the environment is read here, not in the library).

The options every runner shares (model, text, windows, seq_len, batch size, dtype, impl, cache,
output, method) are defined once here (``OPTIONS``); a script asks for the ones it takes::

    OPTS = define_options("model", "seq_len", "cache_dir", batch_size=8)
    ...
    cfg = SomeConfig(**OPTS.fields(SomeConfig), other=...)

They are listed by the script's own ``--help`` (this module disclaims the flags it defines for
its callers). Scripts run as ``python experiments/X.py`` from any directory: Python puts this
directory on ``sys.path``, and the package is installed, so no script edits ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import sys
from pathlib import Path

from absl import flags

# Flags defined by the helpers below belong to the script that calls them (its --help lists
# them as its own), not to this module.
flags.disclaim_key_flags()

# The --cache_dir flags' help: where default_cache_dir looks.
CACHE_DIR_DEFAULT = "$AMBER_JAX_CACHE, else $XDG_CACHE_HOME/amber_jax or ~/.cache/amber_jax"

# ``define_options(..., text_file=TRANSFER_TEXT)``: the --text_file of the runners that also
# evaluate a second text, never calibrated on (their config's ``transfer_text`` field).
TRANSFER_TEXT = (
  "enwiki",
  "Transfer text (known name or UTF-8 file), evaluation only ('' to skip).",
)


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


def _impls() -> list[str]:
  from amber_jax.core.backends import IMPLS

  return list(IMPLS)


def _dtypes() -> list[str]:
  from amber_jax.runs.common import DTYPES

  return sorted(DTYPES)


def _method_help() -> str:
  from amber_jax.calibrate.methods import BEST, method_names

  return (
    f"A named method of amber_jax.calibrate.methods: {', '.join(method_names())} (best = {BEST}); "
    "search and search_mixed take +<correction>, +learned[N], +learnedscale[N]. Sets score, "
    "policy, o_order, granularity (and correction, learned factors); giving one of those "
    "flags with another value as well is an error."
  )


@dataclasses.dataclass(frozen=True)
class Option:
  """A shared flag: its kind ("string", "integer", "float", "enum"), default and help; for an
  enum, a function returning its values (imported lazily)."""

  kind: str
  default: object
  help: str
  values: object = None


OPTIONS = {
  "model": Option(
    "string", "smollm2-135m", "Known model name (smollm2-135m), a .gguf file or an HF directory."
  ),
  "text": Option(
    "string", "lee_background", "Main text (known name or UTF-8 file): evaluation, calibration."
  ),
  "text_file": Option(
    "string", None, "UTF-8 text to evaluate (default: gensim's lee_background.cor)."
  ),
  "num_windows": Option("integer", 8, "Number of non-overlapping evaluation windows."),
  "calib_windows": Option(
    "integer", 8, "Calibration windows (after the evaluation windows, never overlapping them)."
  ),
  "seq_len": Option("integer", 512, "Predicted tokens per window."),
  "batch_size": Option("integer", 4, "Windows per forward pass."),
  "dtype": Option("enum", "float32", "Compute and parameter dtype.", _dtypes),
  "impl": Option(
    "enum",
    None,
    "Sparse matmul: xla (jnp mask + XLA dot), pallas (fused kernel) or pallas_mask (Pallas "
    "mask pass + XLA dot); the Pallas ones run in interpret mode on CPU. Default: xla "
    "(faster than the measured kernels on an H200; see BENCHMARKS.md). Results do not "
    "depend on it.",
    _impls,
  ),
  "cache_dir": Option(
    "string",
    None,
    f"Cache for the model, text and converted params (default: {CACHE_DIR_DEFAULT}).",
  ),
  "output": Option("string", None, "Write the results as JSON here (atomically)."),
  "method": Option("string", None, "", None),  # help: _method_help() (imports the registry)
}


class Options:
  """The shared flags one script defined (``define_options``); read after flag parsing.

  ``opts.NAME`` is the flag's value, except ``cache_dir`` (``default_cache_dir()`` when not
  given); ``opts.flag(NAME)`` its absl FlagHolder; ``fields(cls)`` maps them onto a run
  config's fields."""

  def __init__(self, holders: dict):
    self._holders = holders

  def __getattr__(self, name: str):
    holders = self.__dict__.get("_holders", {})
    if name not in holders:
      raise AttributeError(f"this script defines no shared option {name!r}")
    value = holders[name].value
    if name == "cache_dir":
      return value or default_cache_dir()
    return value

  def present(self, name: str) -> bool:
    """Whether the flag was given on the command line."""
    return flags.FLAGS[name].present

  def flag(self, name: str):
    """The absl FlagHolder of the shared option ``name`` (``.value``, ``.present``, ``.name``)."""
    if name not in self._holders:
      raise AttributeError(f"this script defines no shared option {name!r}")
    return self._holders[name]

  def fields(self, cls, **as_field: str) -> dict:
    """The shared options as keyword arguments of the dataclass ``cls``: only its fields;
    ``as_field``: ``option="field"`` for an option that fills a field of another name (e.g.
    ``text_file="transfer_text"``); otherwise ``text_file`` fills the ``text`` field when the
    script has no ``--text`` (unset: the field's default); unset ``output`` and ``method``
    become ""."""
    unknown = sorted(set(as_field) - set(self._holders))
    if unknown:
      raise ValueError(f"fields: options {unknown} are not defined by this script")
    names = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name in self._holders:
      value = getattr(self, name)
      field = as_field.get(name, name)
      if name == "text_file" and "text" not in self._holders and name not in as_field:
        field = "text"
        if value is None:
          continue
      if field not in names:
        continue
      if name in ("output", "method") and value is None:
        value = ""
      out[field] = value
    return out


def define_options(*names: str, **overrides) -> Options:
  """Defines the shared flags ``names`` (keys of ``OPTIONS``) for the calling script, so its
  --help lists them. ``overrides``: ``name=default`` or ``name=(default, help)`` for a script
  whose default or wording differs (the flag's name and meaning do not)."""
  unknown = sorted(set(names) - set(OPTIONS) | set(overrides) - set(names))
  if unknown:
    raise ValueError(f"define_options: unknown or unlisted options {unknown}")
  holders = {}
  for name in names:
    opt = OPTIONS[name]
    default, help_ = opt.default, opt.help
    if name in overrides:
      value = overrides[name]
      default, help_ = value if isinstance(value, tuple) else (value, help_)
    if name == "method":
      help_ = help_ or _method_help()
    if opt.kind == "enum":
      holders[name] = flags.DEFINE_enum(name, default, opt.values(), help_)
    else:
      holders[name] = getattr(flags, f"DEFINE_{opt.kind}")(name, default, help_)
  return Options(holders)


def method_or_flags(opts: Options, names=("score", "policy", "o_order", "granularity")) -> None:
  """With ``--method``, ValueError if one of the old recipe flags ``names`` was given with a
  value other than the method's (``amber_jax.calibrate.methods.check_method_conflicts``: it names
  both); an unknown method is a ValueError listing the valid names."""
  if not opts.method:
    return
  from amber_jax.calibrate.methods import check_method_conflicts

  check_method_conflicts(opts.method, {n: flags.FLAGS[n].value for n in names if opts.present(n)})


def define_impl_flag():
  """The ``--impl`` flag of the experiments that run sparse prefills (one definition)."""
  return define_options("impl").flag("impl")


class _PlainFormatter(std_logging.Formatter):
  """'warning: message': a warning that matters to the user is one plain line."""

  def format(self, record):
    return f"{record.levelname.lower()}: {record.getMessage()}"


def quiet_logging() -> None:
  """Library logs (absl, orbax, JAX's backend probe) at WARNING and above only, each as one
  plain line, unless ``--verbosity``/``-v`` was given (then absl's full format and level)."""
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


def command_line(skip: tuple[str, ...] = ("--cache_dir", "--output")) -> str:
  """How this script was run, for a results file: ``python experiments/NAME.py`` and its
  arguments but those starting with one of ``skip`` (paths of one machine or the output)."""
  script = Path(sys.argv[0]).name
  return f"python experiments/{script}" + "".join(
    f" {a}" for a in sys.argv[1:] if not a.startswith(skip)
  )


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    text = f"{error.strerror}: {error.filename!r}"
  return " ".join(text.split())
