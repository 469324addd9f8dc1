"""Atomic writes: a temporary file in the same directory, then os.replace."""

from __future__ import annotations

import json
import os
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
