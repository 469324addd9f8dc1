"""Saving and restoring a calibrated plan (any pytree of arrays) through orbax.

A checkpoint is a directory::

  <path>/
    arrays/          orbax checkpoint of the leaves (a flat dict "l00000", "l00001", ...)
    plan_meta.json   format version, the caller's metadata, and for every leaf its key
                     path, dtype, shape and the SHA-256 of its bytes; written last

Dtypes are kept exactly (int8 stays int8 on disk and after restore). The directory is
written next to ``path`` under a temporary name and renamed into place once complete, so a
failed save leaves no partial directory and an existing checkpoint is replaced only by a
complete one. ``load_plan`` checks every leaf against the recorded dtype, shape and digest
and the caller's expectations (pattern, model, ...) against the recorded metadata; anything
wrong raises ``PlanCheckpointError`` naming the path and the problem, never a wrong plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from amber_jax.io.atomic import check_output_directory, replace_directory

# Bump when the layout of the directory or of plan_meta.json changes.
PLAN_FORMAT_VERSION = 1
META_NAME = "plan_meta.json"
ARRAYS_NAME = "arrays"


class PlanCheckpointError(ValueError):
  """A plan checkpoint is missing, unreadable, corrupt, or made for another setup.

  The message names the checkpoint's path and what is wrong.
  """


def _leaf_digest(arr: np.ndarray) -> str:
  arr = np.ascontiguousarray(arr)
  return hashlib.sha256(memoryview(arr.reshape(-1).view(np.uint8))).hexdigest()


def _path_entries(keypath) -> list[list]:
  """A JSON form of a jax key path: [["key", k] | ["idx", i] | ["attr", name], ...]."""
  out = []
  for entry in keypath:
    if isinstance(entry, jax.tree_util.DictKey):
      key = entry.key
      if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise TypeError(f"plan dict keys must be str or int, got {key!r}")
      out.append(["key", key])
    elif isinstance(entry, jax.tree_util.SequenceKey):
      out.append(["idx", entry.idx])
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      out.append(["attr", entry.name])
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      out.append(["idx", entry.key])
    else:
      raise TypeError(f"unsupported pytree key {entry!r}")
  return out


def _json_normal(value):
  """``value`` as it reads back from JSON (tuples become lists, ...)."""
  return json.loads(json.dumps(value))


def _fmt(value) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def save_plan(path: str | os.PathLike, tree, *, metadata: dict) -> None:
  """Writes ``tree`` (a pytree of arrays) and ``metadata`` to the directory ``path``.

  Args:
    path: the checkpoint directory; an existing checkpoint is replaced once the new one is
      complete. Any other existing path is refused (ValueError): it would be deleted.
    tree: a pytree (dicts, lists, tuples, dataclass pytrees, ...) of arrays; leaves are
      stored as numpy arrays with their dtype and shape unchanged.
    metadata: JSON-serializable dict (model name/fingerprint, config, pattern, quant
      settings, ...) returned by ``load_plan`` and checked against its ``expect``.

  Raises:
    TypeError: if ``metadata`` is not JSON-serializable or a key of the tree is not supported.
    ValueError: if the tree has no leaves, or ``path`` exists and is not a plan checkpoint.
  """
  import orbax.checkpoint as ocp

  path = Path(path)
  check_output_directory(path, arg="plan checkpoint path", marker=META_NAME)
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
  metadata = _json_normal(metadata)  # Fails here (TypeError) before anything is written.
  keyed, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not keyed:
    raise ValueError(f"plan checkpoint {path}: the tree has no leaves")
  leaves_meta, arrays = [], {}
  for i, (keypath, leaf) in enumerate(keyed):
    arr = np.asarray(leaf)
    name = f"l{i:05d}"
    leaves_meta.append(
      {
        "name": name,
        "path": jax.tree_util.keystr(keypath),
        "entries": _path_entries(keypath),
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "sha256": _leaf_digest(arr),
      }
    )
    if arr.size:  # orbax cannot store empty arrays; dtype and shape are all they hold.
      arrays[name] = arr
  meta = {
    "format_version": PLAN_FORMAT_VERSION,
    "metadata": metadata,
    "leaves": leaves_meta,
  }

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-tmp-"))
  try:
    if arrays:
      ocp.PyTreeCheckpointer().save((tmp / ARRAYS_NAME).resolve(), arrays)
    # plan_meta.json last: a directory without it is never loaded.
    with open(tmp / META_NAME, "w", encoding="utf-8") as f:
      f.write(json.dumps(meta, indent=1) + "\n")
      f.flush()
      os.fsync(f.fileno())
    replace_directory(tmp, path)  # the old plan is deleted only once this one is in
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_plan_metadata(path: str | os.PathLike) -> dict:
  """The caller's metadata recorded in the checkpoint at ``path`` (arrays not read)."""
  return _read_meta(Path(path))["metadata"]


def _read_meta(path: Path) -> dict:
  if not path.is_dir():
    raise PlanCheckpointError(f"plan checkpoint {path} does not exist (or is not a directory)")
  meta_path = path / META_NAME
  if not meta_path.is_file():
    raise PlanCheckpointError(
      f"plan checkpoint {path} has no {META_NAME} (incomplete or not a plan checkpoint)"
    )
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PlanCheckpointError(
      f"plan checkpoint {path}: {META_NAME} is unreadable or truncated ({e})"
    ) from e
  if not isinstance(meta, dict) or not isinstance(meta.get("leaves"), list):
    raise PlanCheckpointError(f"plan checkpoint {path}: {META_NAME} is malformed")
  version = meta.get("format_version")
  if version != PLAN_FORMAT_VERSION:
    raise PlanCheckpointError(
      f"plan checkpoint {path} has format version {version!r}; this code reads "
      f"version {PLAN_FORMAT_VERSION} (re-run the calibration to rebuild it)"
    )
  if not isinstance(meta.get("metadata"), dict):
    raise PlanCheckpointError(f"plan checkpoint {path}: {META_NAME} has no metadata dict")
  for leaf in meta["leaves"]:
    if not isinstance(leaf, dict) or not {"name", "path", "entries", "dtype", "shape"} <= set(leaf):
      raise PlanCheckpointError(f"plan checkpoint {path}: {META_NAME} has a malformed leaf entry")
  return meta


def _check_expect(path: Path, stored: dict, expect: dict) -> None:
  problems = []
  for key, expected in expect.items():
    expected = _json_normal(expected)
    if key not in stored:
      problems.append(f"checkpoint records no {key!r}, this run expects {key} {_fmt(expected)}")
    elif stored[key] != expected:
      problems.append(
        f"checkpoint was made for {key} {_fmt(stored[key])}, this run uses {_fmt(expected)}"
      )
  if problems:
    raise PlanCheckpointError(f"plan checkpoint {path} does not match: " + "; ".join(problems))


def _rebuild(entries_list: list[list], leaves: list) -> Any:
  """Nested dicts and lists from JSON key paths (dataclass attributes become dict keys)."""
  if len(entries_list) == 1 and not entries_list[0]:
    return leaves[0]  # The tree is a single leaf.
  root: dict = {}
  seq_nodes = set()  # Prefixes of nodes that were sequences (lists or tuples).
  for entries, leaf in zip(entries_list, leaves, strict=True):
    node = root
    for j, (kind, key) in enumerate(entries):
      if kind == "idx":
        seq_nodes.add(tuple(k for _, k in entries[:j]))
      if j == len(entries) - 1:
        node[key] = leaf
      else:
        node = node.setdefault(key, {})

  def finish(node, prefix):
    if not isinstance(node, dict):
      return node
    children = {k: finish(v, (*prefix, k)) for k, v in node.items()}
    if prefix in seq_nodes:
      return [children[i] for i in sorted(children)]
    return children

  return finish(root, ())


def _dtype(name: str) -> np.dtype:
  try:
    return np.dtype(name)
  except TypeError:  # bfloat16, float8_*: numpy knows them only through ml_dtypes.
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


def load_plan(
  path: str | os.PathLike, *, expect: dict | None = None, like=None
) -> tuple[Any, dict]:
  """Restores a tree saved by ``save_plan``; returns (tree, metadata).

  Args:
    path: the checkpoint directory.
    expect: metadata the caller requires: every key must be in the stored metadata with an
      equal value (compared as JSON, so tuples equal lists).
    like: optional pytree with the structure of the saved tree (e.g. a ``SparsityPlan`` with
      its static fields); the restored leaves are put into its structure. Without it the
      tree is rebuilt as nested dicts (dataclass fields become keys) and lists.

  Leaves come back as numpy arrays, bit-identical to what was saved.

  Raises:
    PlanCheckpointError: naming the path, if the directory or its metadata is missing or
      unreadable, the arrays cannot be restored, a leaf's dtype, shape or digest differs from
      the recorded one, ``like`` has another structure, or ``expect`` does not match.
  """
  import orbax.checkpoint as ocp

  path = Path(path)
  meta = _read_meta(path)
  stored = meta["metadata"]
  if expect:
    _check_expect(path, stored, expect)

  leaves_meta = meta["leaves"]
  if not leaves_meta:
    raise PlanCheckpointError(f"plan checkpoint {path}: {META_NAME} lists no arrays")
  restored: dict = {}
  if any(int(np.prod(leaf["shape"])) for leaf in leaves_meta):
    arrays_dir = path / ARRAYS_NAME
    if not arrays_dir.is_dir():
      raise PlanCheckpointError(f"plan checkpoint {path}: the array directory is missing")
    try:
      restored = ocp.PyTreeCheckpointer().restore(arrays_dir.resolve())
    except Exception as e:  # orbax raises many types on damaged checkpoints.
      raise PlanCheckpointError(
        f"plan checkpoint {path}: the arrays cannot be restored, the checkpoint is damaged "
        f"({type(e).__name__}: {e})"
      ) from e
    if not isinstance(restored, dict):
      raise PlanCheckpointError(f"plan checkpoint {path}: the arrays have an unexpected layout")

  leaves = []
  for leaf in leaves_meta:
    shape = tuple(leaf["shape"])
    if int(np.prod(shape)) == 0:
      arr = np.zeros(shape, dtype=_dtype(leaf["dtype"]))
    elif leaf["name"] not in restored:
      raise PlanCheckpointError(f"plan checkpoint {path}: array {leaf['path']} is missing")
    else:
      arr = np.asarray(restored[leaf["name"]])
    if str(arr.dtype) != leaf["dtype"] or arr.shape != shape:
      raise PlanCheckpointError(
        f"plan checkpoint {path} is corrupt: {leaf['path']} restored as {arr.dtype}"
        f"{list(arr.shape)}, recorded as {leaf['dtype']}{list(shape)}"
      )
    if _leaf_digest(arr) != leaf.get("sha256"):
      raise PlanCheckpointError(
        f"plan checkpoint {path} is corrupt: {leaf['path']} does not match its recorded "
        "SHA-256 (the data files were modified or damaged)"
      )
    leaves.append(arr)

  if like is not None:
    keyed, treedef = jax.tree_util.tree_flatten_with_path(like)
    want = [jax.tree_util.keystr(kp) for kp, _ in keyed]
    have = [leaf["path"] for leaf in leaves_meta]
    if want != have:
      missing = sorted(set(want) - set(have))[:5]
      extra = sorted(set(have) - set(want))[:5]
      raise PlanCheckpointError(
        f"plan checkpoint {path} has another structure than expected: "
        f"missing {missing}, unexpected {extra}"
        if missing or extra
        else f"plan checkpoint {path} has its leaves in another order than expected"
      )
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
  else:
    tree = _rebuild([leaf["entries"] for leaf in leaves_meta], leaves)
  return tree, stored


def checkpoint_bytes(path: str | os.PathLike) -> int:
  """Total size in bytes of the files under the checkpoint directory ``path``."""
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def leaf_nbytes(path: str | os.PathLike) -> dict[str, int]:
  """Uncompressed bytes of every leaf, by key path, as recorded in the checkpoint's metadata."""
  meta = _read_meta(Path(path))
  return {
    leaf["path"]: int(np.prod(leaf["shape"])) * _dtype(leaf["dtype"]).itemsize
    for leaf in meta["leaves"]
  }
