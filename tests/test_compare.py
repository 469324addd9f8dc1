"""The comparison runner (experiments/compare.py) on the tiny HF fixture: every kind of method,
matched columns, resume, the table and the plot; bad config."""

from __future__ import annotations

import json
import pathlib

import pytest

from amber_jax import runs
from amber_jax.runs.compare import (
  CompareConfig,
  compare_markdown,
  run_compare,
  save_compare_plot,
)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"


def _quiet(*args):
  pass


@pytest.fixture
def make_cfg(tmp_path):
  main = tmp_path / "main.txt"
  main.write_text(" ".join(f"word{i} and more text" for i in range(600)), encoding="utf-8")
  other = tmp_path / "other.txt"
  other.write_text(" ".join(f"other {i} words here" for i in range(300)), encoding="utf-8")

  def make(**kw):
    base = dict(
      model=str(FIXTURE),
      methods=("dense", "naive", "amber", "wanda", "sparsegpt", "teal", "cats"),
      patterns=("2:4",),
      seq_len=32,
      num_windows=2,
      calib_windows=5,  # SparseGPT: at least d_ff=128 tokens for the down Hessian
      batch_size=2,
      text=str(main),
      transfer_text=str(other),
      tasks=("navigate",),
      subsample=4,
      gen_prompts=2,
      gen_prompt_len=8,
      gen_tokens=4,
      teal_greedy_step=0.25,
      output=str(tmp_path / "compare.json"),
      cache_dir=str(tmp_path / "cache"),
    )
    return CompareConfig(**{**base, **kw})

  return make


def test_compare_entries_resume_table_and_plot(make_cfg, tmp_path, monkeypatch):
  cfg = make_cfg(match_pattern="2:4")
  result = run_compare(cfg, log=_quiet, show_progress=False)
  entries = result["entries"]
  want = {
    "dense/dense",
    "naive/2:4",
    "amber/2:4",
    *(f"{m}/{c}" for m in ("wanda", "sparsegpt") for c in ("2:4", "same_sites", "same_removed")),
    *(f"{m}/{c}" for m in ("teal", "cats") for c in ("same_sites", "same_removed")),
  }
  assert set(entries) == want
  amber = entries["amber/2:4"]
  for key, e in entries.items():
    if "skipped" in e:
      continue
    assert set(e["perplexity"]) == {cfg.text, cfg.transfer_text}
    assert all(p > 1 for p in e["perplexity"].values())
    assert len(e["bigbench"]["navigate"]["correct_norm"]) == 4
    if key != "dense/dense":
      assert 0 <= e["generation"]["agreement"] <= 1 and e["calib_seconds"] >= 0
  # weight N:M removes half of every linear; the matched columns follow amber's plan
  assert entries["sparsegpt/2:4"]["removed"] == pytest.approx(0.5, abs=1e-3)
  assert entries["wanda/same_removed"]["removed"] == pytest.approx(amber["removed"], abs=0.02)
  assert entries["teal/same_removed"]["removed"] == pytest.approx(amber["removed"], abs=0.03)
  assert entries["wanda/same_sites"]["coverage"] == pytest.approx(amber["coverage"])
  assert json.loads(pathlib.Path(cfg.output).read_text())["entries"] == entries

  def fail(*a, **k):
    raise AssertionError("a finished entry was computed again")

  monkeypatch.setattr(runs.compare, "build_method", fail)
  again = run_compare(cfg, log=_quiet, show_progress=False)
  assert again["entries"] == entries

  markdown = compare_markdown(result)
  lines = markdown.splitlines()
  assert lines[2].startswith("| dense | dense |")
  assert any(line.startswith("| sparsegpt | 2:4 | 50.0% |") for line in lines)
  assert "paired stderr" in markdown
  path = save_compare_plot(result, tmp_path / "compare.png")
  assert path.stat().st_size > 1000


def test_other_settings_are_an_error(make_cfg):
  cfg = make_cfg(methods=("dense",))
  run_compare(cfg, log=_quiet, show_progress=False)
  with pytest.raises(ValueError, match="other settings.*subsample"):
    run_compare(make_cfg(methods=("dense",), subsample=3), log=_quiet, show_progress=False)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(methods=("obs",)), "unknown method"),
    (dict(matched=("same_flops",)), "matched has unknown"),
    (dict(patterns=("3:2",)), "N:M|pattern"),
    (dict(output=""), "output must be given"),
    (dict(subsample=0), "subsample must be >= 1"),
  ],
)
def test_bad_config(make_cfg, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_cfg(**kwargs)
