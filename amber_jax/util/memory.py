"""Giving freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
  except OSError:
    return None
  return getattr(libc, "malloc_trim", None)  # glibc only


def release_free_memory() -> None:
  """Returns the heap's free pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

  Large buffers freed by worker threads (orbax's and tensorstore's) stay in glibc's per-thread
  arenas and count as resident memory: a load that saves or restores the model piece by piece
  would otherwise grow by every piece's buffers (measured: +230 MB resident after saving a
  220 MB model leaf by leaf, +20 MB with a trim after each leaf)."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)
