"""Evaluation texts: gensim's test data (fetched from the package registry) or any UTF-8 file."""

from __future__ import annotations

import os
from pathlib import Path

from amber_jax.data.wiki import wiki_articles_text
from amber_jax.io.registry import WheelFile, fetch_wheel_file

# gensim's wheels carry their test data; any platform's wheel has the same files,
# so one platform is pinned to make the download work from any OS.
_GENSIM_PIP_ARGS = (
  "--only-binary=:all:",
  "--platform",
  "manylinux_2_28_x86_64",
  "--python-version",
  "3.11",
  "--implementation",
  "cp",
)

KNOWN_TEXTS: dict[str, WheelFile] = {
  # 300 short news articles (Lee et al. corpus), 360 KB of prose.
  "lee_background": WheelFile(
    requirement="gensim==4.4.0",
    member="gensim/test/test_data/lee_background.cor",
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    pip_args=_GENSIM_PIP_ARGS,
  ),
  # 105 Wikipedia articles (a 2016 dump, shortened), wiki markup stripped on load.
  "enwiki": WheelFile(
    requirement="gensim==4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    pip_args=_GENSIM_PIP_ARGS,
  ),
}
# Known texts that are not plain text files: how to turn the fetched file into text.
_CONVERTERS = {"enwiki": wiki_articles_text}
DEFAULT_TEXT = "lee_background"


def read_text_file(path: str | os.PathLike, *, arg: str = "text_file") -> str:
  """Reads a UTF-8 text file; raises ValueError naming ``arg`` and the file when it cannot be
  read (missing, a directory, not UTF-8, no permission)."""
  name = os.fspath(path)
  path = Path(path)
  if not name.strip():
    raise ValueError(f"{arg} must be a known text ({', '.join(KNOWN_TEXTS)}) or a file path")
  if path.is_dir():
    raise ValueError(f"{arg} {name!r} is a directory; give a UTF-8 text file")
  if not path.is_file():
    raise ValueError(f"{arg} {name!r} does not exist (known texts: {', '.join(KNOWN_TEXTS)})")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{arg} {name!r} is not valid UTF-8: {e.reason}") from None
  except OSError as e:
    raise ValueError(f"{arg} {name!r} cannot be read: {e.strerror}") from None


def load_text(name_or_path: str, cache_dir: str | os.PathLike, *, log=print) -> str:
  """A known text name (fetched into ``cache_dir`` on first use) or a path to a UTF-8 file."""
  if name_or_path in KNOWN_TEXTS:
    path = fetch_wheel_file(KNOWN_TEXTS[name_or_path], cache_dir, log=log)
    return _CONVERTERS.get(name_or_path, read_text_file)(path)
  return read_text_file(name_or_path)
