"""The main job: perplexity and prefill throughput, dense vs an N:M pattern, side by side."""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.coverage import plan_coverage
from amber_jax.data.texts import DEFAULT_TEXT, load_text
from amber_jax.eval.perplexity import make_windows, perplexity
from amber_jax.io.loading import load_model, load_tokenizer
from amber_jax.io.sources import DEFAULT_MODEL, read_config, resolve_model
from amber_jax.patterns import parse_pattern_or_dense
from amber_jax.plan import make_plan

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillRunConfig:
  """Everything the main job needs; validated on construction (before any loading)."""

  model: str = DEFAULT_MODEL
  pattern: str = "8:16"
  seq_len: int = 512
  num_windows: int = 8
  batch_size: int = 4
  dtype: str = "float32"
  text: str = DEFAULT_TEXT  # a known text name or a path to a UTF-8 file
  cache_dir: str = ""

  def __post_init__(self):
    parse_pattern_or_dense(self.pattern)  # raises ValueError naming what is valid
    if self.seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
    if self.num_windows < 1:
      raise ValueError(f"num_windows must be >= 1, got {self.num_windows}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if not self.cache_dir:
      raise ValueError("cache_dir must be given (where the model and text are cached)")


def _versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
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
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def run_prefill(cfg: PrefillRunConfig, *, log=print, show_progress: bool = True) -> dict:
  """Evaluates the dense baseline and ``cfg.pattern`` on the same windows.

  Bad input (pattern, M not dividing a width, missing model, short text) fails
  before the weights are loaded. Returns a JSON-ready dict with "dense",
  "sparse" (absent when pattern is dense), "coverage", "config", "versions",
  "device".
  """
  pattern = parse_pattern_or_dense(cfg.pattern)
  source = resolve_model(cfg.model, cfg.cache_dir, log=log)
  model_config = read_config(source)
  sparse_plan = make_plan(model_config, pattern) if pattern is not None else None
  tokenizer = load_tokenizer(source)
  text = load_text(cfg.text, cfg.cache_dir, log=log)
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  windows = make_windows(ids, cfg.seq_len, cfg.num_windows)

  loaded = load_model(source, cfg.cache_dir, show_progress=show_progress, log=log)
  dtype = DTYPES[cfg.dtype]
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), loaded.params)
  common = dict(
    config=loaded.config, batch_size=cfg.batch_size, dtype=dtype, show_progress=show_progress
  )

  def as_dict(r, **extra):
    return {
      "perplexity": r.perplexity,
      "nll": r.nll,
      "tokens": r.tokens,
      "windows": r.windows,
      "seconds": r.seconds,
      "tokens_per_second": r.tokens_per_second,
      **extra,
    }

  dense = perplexity(params, windows, plan=None, desc="dense", **common)
  result = {"dense": as_dict(dense)}
  if sparse_plan is not None:
    sparse = perplexity(params, windows, plan=sparse_plan, desc=f"sparse {pattern}", **common)
    cov = plan_coverage(loaded.config, sparse_plan)
    result["sparse"] = as_dict(sparse, pattern=str(pattern), policy="all", score="naive")
    result["coverage"] = cov.covered
    result["removed"] = cov.removed
    result["time_ratio"] = sparse.seconds / dense.seconds
  else:
    result["coverage"] = 0.0
    result["removed"] = 0.0
  result["config"] = dataclasses.asdict(cfg)
  result["model_config"] = dataclasses.asdict(loaded.config)
  result["params_from_cache"] = loaded.from_cache
  result["versions"] = _versions()
  result["device"] = {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "machine": platform.machine(),
    "processor": platform.processor(),
  }
  return result


def format_table(result: dict) -> str:
  """The side-by-side table printed by experiments/prefill.py."""
  rows = [("dense", result["dense"], "0.0%")]
  if "sparse" in result:
    rows.append(
      (
        f"{result['sparse']['pattern']} (all, |x|)",
        result["sparse"],
        f"{100 * result['coverage']:.1f}%",
      )
    )
  header = (
    f"{'run':<22} {'perplexity':>10} {'tokens':>7} {'coverage':>9} {'tok/s':>8} {'time/dense':>10}"
  )
  lines = [header, "-" * len(header)]
  dense_s = result["dense"]["seconds"]
  for name, r, cov in rows:
    lines.append(
      f"{name:<22} {r['perplexity']:>10.3f} {r['tokens']:>7d} {cov:>9} "
      f"{r['tokens_per_second']:>8.1f} {r['seconds'] / dense_s:>10.3f}"
    )
  if "sparse" in result:
    lines.append(
      f"multiply-adds removed: {100 * result['removed']:.1f}% of linear MACs "
      f"(coverage x (1 - N/M)); LM head excluded"
    )
  return "\n".join(lines)
