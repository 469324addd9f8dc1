"""Every experiment script parses its flags and shows its help (a cheap guard against typos)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPL_SCRIPTS = ("prefill.py", "zero_shot.py", "generation.py")  # take --impl (_common)
SCRIPTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  proc = subprocess.run(
    [sys.executable, str(ROOT / "experiments" / script), "--helpshort"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  # absl prints the help and exits with status 1; a broken script fails before that.
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"experiments/{script}:" in proc.stdout and "  --" in proc.stdout  # its own flags
  if script in IMPL_SCRIPTS:  # the shared --impl flag is listed as the script's own
    assert "  --impl: <xla|pallas|pallas_mask>" in proc.stdout


def test_bad_flag_value_is_a_clear_error(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "experiments" / "prefill.py"),
      "--pattern=3:2",
      f"--cache_dir={tmp_path}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert proc.returncode != 0
  assert "error: pattern N must satisfy 1 <= N < M, got 3:2" in proc.stderr
