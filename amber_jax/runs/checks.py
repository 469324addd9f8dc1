"""Checks of an experiment's input made before any work starts (ValueError naming the argument).

The experiment scripts (``experiments/*.py``) call these on their flags before a model loads,
so that a path that cannot be written, a text that cannot be read or a malformed list is one
line ``error: ...`` at once, not a traceback after minutes of evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from amber_jax.data.texts import KNOWN_TEXTS, read_text_file
from amber_jax.io.atomic import check_output_file


def check_markdown_file(path: str | os.PathLike, *, arg: str) -> None:
  """A markdown file one section of which is replaced (``update_markdown_section``): a path
  that can be written (``check_output_file``) and, when the file exists, readable UTF-8 text
  (the rest of it is kept, so it is read first)."""
  check_output_file(path, arg=arg)
  p = Path(path)
  if p.exists():
    try:
      p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{arg}: {os.fspath(p)!r} is not valid UTF-8 text ({e.reason})") from None
    except OSError as e:
      raise ValueError(f"{arg}: {os.fspath(p)!r} cannot be read: {e.strerror}") from None


def check_text_source(text: str, *, arg: str) -> None:
  """A known text name (fetched later) or a readable UTF-8 file; ValueError naming ``arg``."""
  if text not in KNOWN_TEXTS:
    read_text_file(text, arg=arg)


def read_json_file(path: str | os.PathLike, *, arg: str) -> dict:
  """A JSON object read from ``path``; ValueError naming ``arg`` when the file is missing,
  unreadable, not JSON or not an object."""
  p = Path(path)
  if p.is_dir():
    raise ValueError(f"{arg}: {os.fspath(p)!r} is a directory; give a JSON file")
  if not p.is_file():
    raise ValueError(f"{arg}: {os.fspath(p)!r} does not exist")
  try:
    data = json.loads(p.read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{arg}: {os.fspath(p)!r} is not valid UTF-8 ({e.reason})") from None
  except OSError as e:
    raise ValueError(f"{arg}: {os.fspath(p)!r} cannot be read: {e.strerror}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{arg}: {os.fspath(p)!r} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{arg}: {os.fspath(p)!r} holds JSON but not an object")
  return data


def require_keys(data: dict, keys: Iterable[str], *, arg: str, what: str) -> None:
  """ValueError naming ``arg`` if ``data`` lacks one of ``keys``."""
  missing = [k for k in keys if k not in data]
  if missing:
    raise ValueError(f"{arg} is not a {what} results file: it lacks {', '.join(missing)}")


def check_nonempty(values, *, arg: str, what: str) -> None:
  """ValueError naming ``arg`` if the list ``values`` is empty (or only empty strings)."""
  if not [v for v in values if str(v).strip()]:
    raise ValueError(f"{arg} must name at least one {what}")


def parse_ints(values, *, arg: str, minimum: int | None = None) -> tuple[int, ...]:
  """A comma list flag's entries as ints, each >= ``minimum``; ValueError naming ``arg``."""
  out = []
  for v in values:
    try:
      i = int(str(v).strip())
    except ValueError:
      raise ValueError(f"{arg} must be a comma list of integers, got {v!r}") from None
    if minimum is not None and i < minimum:
      raise ValueError(f"{arg} entries must be >= {minimum}, got {i}")
    out.append(i)
  return tuple(out)


def parse_floats(values, *, arg: str) -> tuple[float, ...]:
  """A comma list flag's entries as finite floats; ValueError naming ``arg``."""
  out = []
  for v in values:
    try:
      f = float(str(v).strip())
    except ValueError:
      raise ValueError(f"{arg} must be a comma list of numbers, got {v!r}") from None
    if not math.isfinite(f):
      raise ValueError(f"{arg} entries must be finite numbers, got {v!r}")
    out.append(f)
  return tuple(out)


def check_at_least(value: int, minimum: int, *, arg: str) -> None:
  """ValueError naming ``arg`` if ``value < minimum``."""
  if value < minimum:
    raise ValueError(f"{arg} must be >= {minimum}, got {value}")
