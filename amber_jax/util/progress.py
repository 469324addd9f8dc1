"""Progress display for long jobs (tqdm on stderr; disabled on request)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(*, total: int | None, desc: str, unit: str = "it", disable: bool = False):
  """A tqdm bar on stderr; use as a context manager and call ``update(n)``."""
  return tqdm(
    total=total,
    desc=desc,
    unit=unit,
    disable=disable,
    file=sys.stderr,
    dynamic_ncols=True,
    leave=False,
  )
