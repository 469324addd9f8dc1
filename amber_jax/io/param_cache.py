"""A cache of converted parameters (orbax), so a second run skips dequantization.

Each entry is a directory ``<cache_dir>/params/<key>/`` (one per source and dtype) holding one
orbax checkpoint per piece of each params leaf (``params/<leaf path>/<k>/``, e.g.
``params/layers.q.w/0``: row blocks of at most ``PIECE_BYTES``) and a
``meta.json`` with the model config, the source fingerprint, the leaves' dtypes and shapes and a
SHA-256 of every array. Pieces because orbax holds further copies of what it saves or
restores in one call: piece by piece, the peak host memory is the params plus a few pieces
(BENCHMARKS.md, "Host memory of loading"). An entry is used only when the fingerprint matches
(path, sizes, mtimes, dtype and format version; otherwise it is stale) and the restored arrays
hash to the recorded digest (otherwise it is corrupt); either way it is rebuilt, never silently
used. Entries are written to a temporary directory and renamed into place; an existing entry is
first renamed aside and deleted only once the new one is in place, so a crash leaves the old or
the new entry (plus perhaps a hidden leftover directory), never none. Filesystem errors
(``OSError``) while writing are logged and the run goes on without the cache; any other error
propagates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from amber_jax.io.atomic import replace_directory
from amber_jax.model.config import LlamaConfig, MixtureOfExperts, RopeScaling
from amber_jax.util.memory import release_free_memory

# Bump when the conversion changes (layout, permutation, dtype, config fields): old entries
# become stale. 2: LlamaConfig.sliding_window (a version-1 entry of a Mistral v0.1 checkpoint
# would restore a config without its window). 3: one orbax checkpoint per leaf, entries per dtype.
CACHE_FORMAT_VERSION = 3


def source_fingerprint(path: str | os.PathLike, dtype: str = "float32") -> dict:
  """Identity of a model file or directory converted to ``dtype``: resolved path, sizes and
  mtimes of its files."""
  path = Path(path).resolve()
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  return {
    "path": str(path),
    "dtype": dtype,
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
    digest.update(arr.reshape(-1).view(np.uint8))  # a view: no copy (bf16 included)
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
  identity = f"{fingerprint['path']}|{fingerprint['dtype']}"
  key = hashlib.sha256(identity.encode()).hexdigest()[:20]
  return cache_dir / "params" / key


def _leaves(params: dict) -> list[tuple[str, np.ndarray]]:
  """(dotted path, array) of every leaf, in a fixed order (keys are identifiers: no dots)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sorted((".".join(str(k.key) for k in path), leaf) for path, leaf in flat)


# Each leaf is saved in pieces of at most this many bytes along its first axis (whole layers of a
# stacked leaf): orbax holds about two more copies of what one call saves or restores, so the
# peak host memory is the params plus about three pieces, whatever the size of the model.
PIECE_BYTES = 256 * 2**20


def _piece_rows(shape: tuple[int, ...], itemsize: int) -> int:
  if not shape:
    return 1
  row_bytes = math.prod(shape[1:]) * itemsize
  return max(1, min(shape[0], PIECE_BYTES // max(row_bytes, 1)))


def _save_leaf(directory: Path, leaf: np.ndarray) -> int:
  """Saves ``leaf`` as orbax checkpoints ``directory/<k>`` of consecutive row blocks; returns
  how many."""
  import orbax.checkpoint as ocp

  directory.mkdir(parents=True)
  rows = _piece_rows(leaf.shape, leaf.itemsize)
  starts = range(0, leaf.shape[0], rows) if leaf.ndim else [None]
  for k, start in enumerate(starts):
    piece = leaf if start is None else leaf[start : start + rows]
    ocp.PyTreeCheckpointer().save((directory / str(k)).resolve(), {"value": piece})
    release_free_memory()
  return len(starts)


def _restore_piece(directory: Path) -> np.ndarray:
  import orbax.checkpoint as ocp

  restored = ocp.PyTreeCheckpointer().restore(
    directory.resolve(),
    args=ocp.args.PyTreeRestore(restore_args={"value": ocp.RestoreArgs(restore_type=np.ndarray)}),
  )
  return np.asarray(restored["value"])


def _restore_leaf(directory: Path, dtype: str, shape: list[int], pieces: int) -> np.ndarray:
  """The leaf saved by ``_save_leaf``, assembled into one array allocated up front; raises
  ValueError when a piece's dtype or shape disagrees with what was recorded."""

  shape = tuple(shape)
  if pieces == 1:  # the piece is the leaf: no second buffer
    piece = _restore_piece(directory / "0")
    if str(piece.dtype) != dtype or piece.shape != shape:
      raise ValueError(f"{directory.name} is {piece.dtype}{piece.shape}, not {dtype}{shape}")
    return piece
  out = np.empty(shape, np.dtype(dtype))
  rows = _piece_rows(shape, out.itemsize)
  done = 0
  for k in range(pieces):
    piece = _restore_piece(directory / str(k))
    want = shape if not shape else (min(rows, shape[0] - done),) + shape[1:]
    if str(piece.dtype) != dtype or piece.shape != want:
      raise ValueError(f"piece {k} of {directory.name} is {piece.dtype}{piece.shape}, not {want}")
    if shape:
      out[done : done + want[0]] = piece
      done += want[0]
    else:
      out[...] = piece
    del piece
    release_free_memory()
  if shape and done != shape[0]:
    raise ValueError(f"{directory.name}: {done} of {shape[0]} rows in its pieces")
  return out


def _try_restore(entry: Path, fingerprint: dict, log) -> CachedModel | None:
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
  params: dict = {}
  try:
    for name, dtype, shape, pieces in meta["leaves"]:
      arr = _restore_leaf(entry / "params" / name, dtype, shape, pieces)
      *parents, last = name.split(".")
      node = params
      for k in parents:
        node = node.setdefault(k, {})
      node[last] = arr
  except Exception as e:  # orbax raises many types on damaged checkpoints.
    log(f"[amber_jax] param cache {entry} cannot be restored ({type(e).__name__}); rebuilding")
    return None
  if params_digest(params) != meta.get("digest"):
    log(f"[amber_jax] param cache {entry} is corrupt (checksum mismatch); rebuilding")
    return None
  return CachedModel(config=config, params=params, from_cache=True)


def _write_entry(entry: Path, fingerprint, config, params) -> None:
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-tmp-"))
  try:
    leaves = []
    for name, leaf in _leaves(params):  # piece by piece: orbax copies what one call saves
      pieces = _save_leaf(tmp / "params" / name, np.asarray(leaf))
      leaves.append([name, str(leaf.dtype), list(leaf.shape), pieces])
    meta = {
      "fingerprint": fingerprint,
      "config": config_to_dict(config),
      "leaves": leaves,
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
  dtype: str = "float32",
  log=print,
) -> CachedModel:
  """Restores converted params for ``source_path`` or runs ``convert()`` and caches the result.

  ``convert`` returns (config, numpy params of ``dtype``, "float32" or "bfloat16"); each dtype
  has its own entry.
  """
  fingerprint = source_fingerprint(source_path, dtype)
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
