"""Zero-shot runner on the tiny HF fixture: results file, resume, interruption, report."""

from __future__ import annotations

import json
import pathlib

import pytest

import amber_jax.runs.zero_shot as zs
from amber_jax.runs.zero_shot import ZeroShotConfig, report_markdown, run_zero_shot

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"

TASK = {
  "name": "tiny_task",
  "examples": [
    {"input": "Is the sky blue?", "target_scores": {"yes": 1, "no": 0}},
    {"input": "Is fire cold?", "target_scores": {"yes": 0, "no": 1}},
    {"input": "Pick a colour.", "target_scores": {"red": 1, "table": 0, "run": 0}},
    {"input": "Do fish swim?", "target_scores": {"no": 0, "yes": 1}},
  ],
}


def _quiet(*args):
  pass


@pytest.fixture
def make_cfg(tmp_path):
  (tmp_path / "a.json").write_text(json.dumps(TASK), encoding="utf-8")
  (tmp_path / "b.json").write_text(json.dumps({**TASK, "name": "other_task"}), encoding="utf-8")
  text = tmp_path / "text.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(400)), encoding="utf-8")

  def make(output="results.json", **kw):
    base = dict(
      model=str(FIXTURE),
      tasks=(str(tmp_path / "a.json"), str(tmp_path / "b.json")),
      patterns=("dense", "8:16"),
      methods=("naive", "amber"),
      limit=3,
      batch_size=4,
      text=str(text),
      seq_len=32,
      num_windows=2,
      calib_windows=2,
      output=str(tmp_path / output) if output else "",
      cache_dir=str(tmp_path / "cache"),
    )
    return ZeroShotConfig(**{**base, **kw})

  return make


def _metrics(result):
  return {k: {m: v for m, v in e.items() if m != "seconds"} for k, e in result["results"].items()}


def _count_calls(monkeypatch, fail_at=None):
  calls = []
  real = zs.evaluate_task

  def counted(*args, **kwargs):
    calls.append(args[1].name)
    if fail_at is not None and len(calls) == fail_at:
      raise KeyboardInterrupt("interrupted")
    return real(*args, **kwargs)

  monkeypatch.setattr(zs, "evaluate_task", counted)
  return calls


EXPECTED_IDS = {
  f"{row}/{task}"
  for row in ("dense/dense", "naive/8:16", "amber/8:16")
  for task in ("tiny_task", "other_task")
}


def test_full_run_then_resume_skips_everything(make_cfg, monkeypatch):
  cfg = make_cfg()
  calls = _count_calls(monkeypatch)
  lines = []
  first = run_zero_shot(cfg, log=lines.append, show_progress=False)
  assert len(calls) == 6
  on_disk = json.loads(pathlib.Path(cfg.output).read_text())
  assert set(on_disk["results"]) == EXPECTED_IDS
  e = on_disk["results"]["amber/8:16/tiny_task"]
  assert e["n"] == 3 and e["limit"] == 3 and e["num_fewshot"] == 0
  assert 0 <= e["acc"] <= 1 and 0 <= e["acc_norm"] <= 1
  assert [ln for ln in lines if ln.startswith("[6/6] ")], lines
  calls.clear()
  second = run_zero_shot(cfg, log=_quiet, show_progress=False)
  assert calls == []
  assert _metrics(second) == _metrics(first)


def test_interrupted_run_resumes_the_rest(make_cfg, monkeypatch, tmp_path):
  full = run_zero_shot(make_cfg("full.json"), log=_quiet, show_progress=False)
  cfg = make_cfg("part.json")
  calls = _count_calls(monkeypatch, fail_at=2)
  with pytest.raises(KeyboardInterrupt):
    run_zero_shot(cfg, log=_quiet, show_progress=False)
  saved = json.loads(pathlib.Path(cfg.output).read_text())
  assert list(saved["results"]) == ["dense/dense/tiny_task"]
  calls = _count_calls(monkeypatch)
  resumed = run_zero_shot(cfg, log=_quiet, show_progress=False)
  assert len(calls) == 5  # only the pairs not saved
  assert _metrics(resumed) == _metrics(full)
  assert len(resumed["results"]) == 6


def test_other_settings_are_an_error(make_cfg):
  run_zero_shot(make_cfg(patterns=("dense",)), log=_quiet, show_progress=False)
  with pytest.raises(ValueError, match=r"dense/dense/tiny_task.*limit: file has 3, this run has 2"):
    run_zero_shot(make_cfg(patterns=("dense",), limit=2), log=_quiet, show_progress=False)
  with pytest.raises(ValueError, match="num_fewshot"):
    run_zero_shot(make_cfg(patterns=("dense",), num_fewshot=1), log=_quiet, show_progress=False)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "other"}'])
def test_corrupt_results_file_is_a_clear_error(make_cfg, content, monkeypatch):
  cfg = make_cfg()
  pathlib.Path(cfg.output).write_text(content)
  calls = _count_calls(monkeypatch)
  with pytest.raises(ValueError, match="results file .* (is corrupt|is not a zero-shot)"):
    run_zero_shot(cfg, log=_quiet, show_progress=False)
  assert calls == []


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(tasks=("no_such_task",)), "neither a packaged"),
    (dict(patterns=("3:2",)), "pattern"),
    (dict(patterns=("dense", "dense")), "duplicates"),
    (dict(methods=("magic",)), "method must be one of"),
    (dict(limit=0), "limit must be >= 1"),
    (dict(num_fewshot=-1), "num_fewshot"),
    (dict(output=""), "output must be given"),
  ],
)
def test_bad_config(make_cfg, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_cfg(**kwargs)


def test_report_table():
  def entry(method, pattern, task, acc_norm):
    return {
      "method": method,
      "pattern": pattern,
      "task": task,
      "acc": acc_norm,
      "acc_norm": acc_norm,
      "n": 20,
      "num_fewshot": 0,
    }

  results = {"results": {}}
  for m, p, t, v in [
    ("naive", "8:16", "a", 0.40),
    ("dense", "dense", "a", 0.50),
    ("dense", "dense", "b", 0.70),
    ("naive", "8:16", "b", 0.60),
    ("amber", "8:16", "a", 0.45),
  ]:
    results["results"][f"{m}/{p}/{t}"] = entry(m, p, t, v)
  lines = report_markdown(results).splitlines()
  assert lines[0] == "| model | a | b | average | vs dense (points) |"
  assert lines[2] == "| dense | 50.0 | 70.0 | 60.0 | +0.0 |"
  assert lines[3] == "| 8:16 naive | 40.0 | 60.0 | 50.0 | -10.0 |"
  assert lines[4] == "| 8:16 amber | 45.0 | - | - | - |"
  assert "n=20 (0-shot)" in lines[-1]
