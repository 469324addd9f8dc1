"""Markdown result files: named sections replaced in place (atomically)."""

from __future__ import annotations

import os
from pathlib import Path

from amber_jax.io.atomic import write_text_atomic


def update_markdown_section(
  path: str | os.PathLike, name: str, body: str, title: str = "# Results"
) -> None:
  """Replaces the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appends the
  section when it is absent), leaving the rest of the file untouched."""
  path = Path(path)
  start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
  text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
  block = f"{start}\n{body.rstrip()}\n{end}"
  if start in text and end in text:
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    text = before + block + after
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  write_text_atomic(path, text)


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
