"""A cache of converted parameters (orbax), so a second run skips dequantization.

Each entry is a directory ``<cache_dir>/params/<key>/`` holding an orbax
checkpoint of the float32 params and a ``meta.json`` with the model config, the
source fingerprint and a SHA-256 of every array. An entry is used only when the
fingerprint matches (path, sizes, mtimes and format version; otherwise it is
stale) and the restored arrays hash to the recorded digest (otherwise it is
corrupt); either way it is rebuilt, never silently used. Entries are written to a
temporary directory and renamed into place; an existing entry is first renamed aside and
deleted only once the new one is in place, so a crash leaves the old or the new entry (plus
perhaps a hidden leftover directory), never none. Filesystem errors (``OSError``) while
writing are logged and the run goes on without the cache; any other error propagates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from amber_jax.io.atomic import replace_directory
from amber_jax.model.config import LlamaConfig, MixtureOfExperts, RopeScaling

# Bump when the conversion changes (layout, permutation, dtype, config fields): old entries
# become stale. 2: LlamaConfig.sliding_window (a version-1 entry of a Mistral v0.1 checkpoint
# would restore a config without its window).
CACHE_FORMAT_VERSION = 2


def source_fingerprint(path: str | os.PathLike) -> dict:
  """Identity of a model file or directory: resolved path, sizes and mtimes of its files."""
  path = Path(path).resolve()
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  return {
    "path": str(path),
    "format_version": CACHE_FORMAT_VERSION,
    "files": [
      [str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ],
  }


def params_digest(params) -> str:
  """SHA-256 over every array's path, dtype, shape and bytes, in a fixed order."""
  digest = hashlib.sha256()
  for keypath, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
  ):
    arr = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(keypath)}|{arr.dtype}|{arr.shape}|".encode())
    digest.update(memoryview(arr).cast("B"))
  return digest.hexdigest()


def config_to_dict(config: LlamaConfig) -> dict:
  return dataclasses.asdict(config)


def config_from_dict(d: dict) -> LlamaConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  if d.get("moe") is not None:
    d["moe"] = MixtureOfExperts(**d["moe"])
  if d.get("rope_freq_factors") is not None:  # JSON gives a list; the config must stay hashable.
    d["rope_freq_factors"] = tuple(float(f) for f in d["rope_freq_factors"])
  return LlamaConfig(**d)


@dataclasses.dataclass(frozen=True)
class CachedModel:
  config: LlamaConfig
  params: dict
  from_cache: bool


def _entry_dir(cache_dir: Path, fingerprint: dict) -> Path:
  key = hashlib.sha256(fingerprint["path"].encode()).hexdigest()[:20]
  return cache_dir / "params" / key


def _try_restore(entry: Path, fingerprint: dict, log) -> CachedModel | None:
  import orbax.checkpoint as ocp

  meta_path = entry / "meta.json"
  if not meta_path.is_file():
    return None
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError):
    log(f"[amber_jax] param cache {entry} has unreadable metadata; rebuilding")
    return None
  if not isinstance(meta, dict):
    log(f"[amber_jax] param cache {entry} has unreadable metadata; rebuilding")
    return None
  if meta.get("fingerprint") != fingerprint:
    log(f"[amber_jax] param cache {entry} is stale (source changed); rebuilding")
    return None
  try:
    config = config_from_dict(meta["config"])
  except (KeyError, TypeError, ValueError) as e:  # Missing, unknown or invalid fields.
    log(f"[amber_jax] param cache {entry} has an unreadable config ({e!r}); rebuilding")
    return None
  try:
    params = ocp.PyTreeCheckpointer().restore((entry / "params").resolve())
    params = jax.tree.map(np.asarray, params)
  except Exception as e:  # orbax raises many types on damaged checkpoints.
    log(f"[amber_jax] param cache {entry} cannot be restored ({type(e).__name__}); rebuilding")
    return None
  if params_digest(params) != meta.get("digest"):
    log(f"[amber_jax] param cache {entry} is corrupt (checksum mismatch); rebuilding")
    return None
  return CachedModel(config=config, params=params, from_cache=True)


def _write_entry(entry: Path, fingerprint, config, params) -> None:
  import orbax.checkpoint as ocp

  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-tmp-"))
  try:
    ocp.PyTreeCheckpointer().save((tmp / "params").resolve(), params)
    meta = {
      "fingerprint": fingerprint,
      "config": config_to_dict(config),
      "digest": params_digest(params),
    }
    # meta.json last: an entry without it is never used.
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    replace_directory(tmp, entry)  # the old entry is deleted only once this one is in
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_cached(
  source_path: str | os.PathLike,
  cache_dir: str | os.PathLike,
  convert: Callable[[], tuple[LlamaConfig, dict]],
  *,
  log=print,
) -> CachedModel:
  """Restores converted params for ``source_path`` or runs ``convert()`` and caches the result.

  ``convert`` returns (config, float32 numpy params).
  """
  fingerprint = source_fingerprint(source_path)
  entry = _entry_dir(Path(cache_dir), fingerprint)
  cached = _try_restore(entry, fingerprint, log)
  if cached is not None:
    return cached
  config, params = convert()
  try:
    _write_entry(entry, fingerprint, config, params)
  except OSError as e:  # A full or read-only cache must not stop the run.
    log(f"[amber_jax] could not write the param cache {entry}: {e}")
  return CachedModel(config=config, params=params, from_cache=False)
