"""Atomic writes (a temporary file or directory in the same directory, then os.replace), and
the checks that an output path can be written, made before the work that produces it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path


def _new_file_mode(path: Path) -> int:
  """The mode a plain ``open(path, "w")`` would leave: the existing file's, else 0o666 minus
  the umask (mkstemp creates 0o600, which would make results unreadable to others)."""
  if path.exists():
    return stat.S_IMODE(path.stat().st_mode)
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` so that readers see the old file or the whole new one."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, _new_file_mode(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
  """Renames the complete directory ``new`` (a sibling of ``path``) to ``path``, replacing
  what is there. A directory cannot be os.replace'd onto a non-empty one, so the old one is
  moved aside first, put back if the rename fails, and deleted only once the new one is in
  place: a crash leaves the old or the new directory (perhaps plus a hidden leftover), never
  none, and a reader never finds a half-written one."""
  new, path = Path(new), Path(path)
  if not (path.exists() or path.is_symlink()):
    os.replace(new, path)
    return
  aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
  try:
    os.replace(path, aside / "previous")
    try:
      os.replace(new, path)
    except BaseException:
      os.replace(aside / "previous", path)
      raise
  finally:
    shutil.rmtree(aside, ignore_errors=True)


def _first_existing_ancestor(path: Path) -> Path:
  for parent in path.parents:
    if parent.exists():
      return parent
  return Path(".")


def _check_parent(path: Path, arg: str) -> None:
  """The nearest existing ancestor of ``path`` is a directory we may write into (the missing
  ones between are created on write)."""
  ancestor = _first_existing_ancestor(path)
  if not ancestor.is_dir():
    raise ValueError(f"{arg}: cannot write {os.fspath(path)!r}: {os.fspath(ancestor)!r} is a file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise ValueError(
      f"{arg}: cannot write {os.fspath(path)!r}: no write permission in {os.fspath(ancestor)!r}"
    )


def check_output_file(path: str | os.PathLike, *, arg: str) -> None:
  """Refuses (ValueError naming ``arg``) a file path that cannot be written: a directory, a
  path below a file, a directory without write permission, an existing read-only file. Called
  before the work whose result goes there; missing parent directories are fine (created)."""
  path = Path(path)
  if not os.fspath(path).strip():
    raise ValueError(f"{arg} must be a file path, got an empty string")
  if path.is_dir():
    raise ValueError(f"{arg}: {os.fspath(path)!r} is a directory; give a file path")
  _check_parent(path, arg)
  if path.exists() and not os.access(path, os.W_OK):
    raise ValueError(f"{arg}: {os.fspath(path)!r} is not writable")


def check_output_directory(path: str | os.PathLike, *, arg: str, marker: str) -> None:
  """Refuses (ValueError naming ``arg``) a directory path that cannot be written, and an
  existing path that is not a directory this project wrote (one holding the file ``marker``):
  writing replaces the whole directory, so anything else there would be deleted."""
  path = Path(path)
  if not os.fspath(path).strip():
    raise ValueError(f"{arg} must be a directory path, got an empty string")
  if path.exists() or path.is_symlink():
    if not (path / marker).is_file():
      what = "a file" if path.is_file() else "a directory that is not one this project wrote"
      raise ValueError(
        f"{arg}: {os.fspath(path)!r} exists and is {what} (no {marker}); writing replaces it "
        "whole, so give a new path or one written before"
      )
  _check_parent(path, arg)
