"""Zero-shot runner on the tiny HF fixture: results file, resume, interruption, report."""

from __future__ import annotations

import json
import pathlib

import numpy as np
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
  # The same task name with other content (an edited file) is not reused either.
  cfg = make_cfg(patterns=("dense",))
  task_file = pathlib.Path(cfg.tasks[0])
  edited = json.loads(task_file.read_text(encoding="utf-8"))
  edited["examples"][0]["input"] = "Is the sea blue?"
  task_file.write_text(json.dumps(edited), encoding="utf-8")
  with pytest.raises(ValueError, match="made on other content of task 'tiny_task'"):
    run_zero_shot(cfg, log=_quiet, show_progress=False)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "other"}'])
def test_corrupt_results_file_is_a_clear_error(make_cfg, content, monkeypatch):
  cfg = make_cfg()
  pathlib.Path(cfg.output).write_text(content)
  calls = _count_calls(monkeypatch)
  with pytest.raises(ValueError, match="results file .* (is corrupt|is not a amber_jax.zero_shot)"):
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
  assert lines[5].startswith("| (dense stderr) | - | - |")
  assert "examples per task: 20 (0-shot)" in lines[-1]


def test_report_change_vs_dense_is_paired():
  """With per-example results the change vs dense gets the paired standard error."""
  dense = [1, 0, 1, 1, 0, 1, 0, 1]
  sparse = [1, 0, 0, 1, 0, 1, 0, 0]  # two examples lost, none gained
  results = {"results": {}}
  for m, p, v in [("dense", "dense", dense), ("naive", "2:4", sparse)]:
    results["results"][f"{m}/{p}/t"] = {
      "method": m, "pattern": p, "task": "t", "acc": 0.0, "acc_norm": sum(v) / len(v),
      "acc_norm_stderr": 0.1, "n": len(v), "num_fewshot": 0, "correct_norm": v,
      "subsample": 8,
    }  # fmt: skip
  lines = report_markdown(results).splitlines()
  d = np.asarray(sparse, float) - np.asarray(dense, float)
  se = d.std(ddof=1) / np.sqrt(len(d))
  assert lines[3] == f"| 2:4 naive | 37.5 | 37.5 | -25.0 ± {100 * se:.1f} |"
  assert lines[4] == "| (dense stderr) | ± 10.0 | ± 10.0 |  |"
  assert "seeded random subset of 8 per task" in lines[-1]


def test_subsample_is_seeded_sorted_and_independent_of_the_model():
  a = zs.subsample_indices("navigate", 1000, 300, seed=1234)
  assert a == zs.subsample_indices("navigate", 1000, 300, seed=1234) and a == sorted(a)
  assert len(set(a)) == 300 and a != list(range(300))
  assert a != zs.subsample_indices("winowhy", 1000, 300, seed=1234)
  assert zs.subsample_indices("t", 50, 300, seed=0) == list(range(50))
  assert zs.subsample_indices("t", 50, None, seed=0) is None


def test_subsample_run_and_conflicting_limit(make_cfg):
  out = run_zero_shot(
    make_cfg(patterns=("dense",), limit=None, subsample=2), log=_quiet, show_progress=False
  )
  e = out["results"]["dense/dense/tiny_task"]
  assert e["n"] == 2 and len(e["correct_norm"]) == 2 and e["subsample"] == 2
  assert e["acc_norm"] == pytest.approx(np.mean(e["correct_norm"]))
  with pytest.raises(ValueError, match="limit .* or subsample"):
    make_cfg(limit=2, subsample=2)


def test_generation_runner_resumes_and_reports_agreement(make_cfg, monkeypatch):
  from amber_jax.runs import generation as gen

  base = make_cfg()
  kw = {f: getattr(base, f) for f in ("model", "tasks", "text", "seq_len", "cache_dir")}
  # Dense listed last on purpose: it still runs first, so that the sparse rows get agreement.
  cfg = gen.GenerationConfig(
    **kw, patterns=("8:16", "dense"), methods=("naive",), num_fewshot=1, limit=3,
    num_windows=2, calib_windows=2, batch_size=2, output=base.output.replace(".json", "_gen.json"),
  )  # fmt: skip
  first = gen.run_generation(cfg, log=_quiet, show_progress=False)
  e = first["results"]["naive/8:16/tiny_task"]
  assert e["n"] == 3 and len(e["answers"]) == 3 and 0 <= e["agreement"] <= 1
  assert "agreement" not in first["results"]["dense/dense/tiny_task"]
  calls = []
  monkeypatch.setattr(gen, "evaluate_generation", lambda *a, **k: calls.append(1))
  again = gen.run_generation(cfg, log=_quiet, show_progress=False)
  assert calls == [] and again["results"] == json.loads(json.dumps(first["results"]))
  table = gen.generation_markdown(again).splitlines()
  assert table[0].startswith("| model | tiny_task EM | other_task EM | tiny_task = dense")
  assert table[2].startswith("| dense |") and table[3].startswith("| 8:16 naive |")
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.GenerationConfig(**kw, max_new_tokens=0, output="x.json")
  kw = dict(kw, output="x.json")
  for bad, match in [
    (dict(methods=()), "methods must name at least one method"),
    (dict(kw, seq_len=0), "seq_len must be >= 1"),
    (dict(num_windows=0), "num_windows must be >= 1"),
    (dict(calib_windows=0), "method amber needs calib_windows >= 1"),
  ]:
    with pytest.raises(ValueError, match=match):
      gen.GenerationConfig(**dict(kw, **bad))
  assert [key for key, _ in zs.plan_rows(("2:4", "dense"), ("naive",), 0.55)] == [
    ("dense", "dense"),
    ("naive", "2:4"),
  ]


def test_impl_reaches_every_sparse_row_and_is_validated(make_cfg):
  """--impl picks the sparse matmul of every sparse row (scores do not depend on it, so it
  is not part of an entry's settings); an unknown impl fails on construction."""
  from amber_jax.runs import generation as gen

  cfg = make_cfg(impl="pallas_mask")
  impls = {key: amber.impl for key, amber in cfg.runs()}
  assert impls[("naive", "8:16")] == impls[("amber", "8:16")] == "pallas_mask"
  assert "impl" not in cfg.settings("amber")
  assert {amber.impl for _, amber in make_cfg().runs()} == {None}
  with pytest.raises(ValueError, match="impl must be one of xla, pallas, pallas_mask"):
    make_cfg(impl="cuda")
  base = make_cfg()
  kw = {f: getattr(base, f) for f in ("model", "tasks", "text", "seq_len", "cache_dir")}
  runs = gen.GenerationConfig(**kw, impl="pallas", output="x.json").runs()
  assert {a.impl for _, a in runs if a.pattern is not None} == {"pallas"}
  with pytest.raises(ValueError, match="impl must be one of"):
    gen.GenerationConfig(**kw, impl="triton", output="x.json")


def test_baselines_are_rows_of_their_targets(make_cfg):
  """N:M and unstructured targets in one grid: each method gets the targets it takes."""
  rows = [key for key, _ in zs.plan_rows(("dense", "2:4", "50%"), ("amber", "wanda", "teal"), 0.55)]
  assert rows == [
    ("dense", "dense"),
    ("amber", "2:4"),
    ("wanda", "2:4"),
    ("wanda", "50%"),
    ("teal", "50%"),
  ]
  cfg = make_cfg(patterns=("dense", "40%"), methods=("wanda", "cats"), calib_windows=5)
  result = zs.run_zero_shot(cfg, log=_quiet, show_progress=False)
  for method in ("wanda", "cats"):
    e = result["results"][f"{method}/40%/tiny_task"]
    assert e["n"] == 3 and 0 < e["removed"] < 1 and e["settings"]["calibration"]
  with pytest.raises(ValueError, match="target"):
    make_cfg(patterns=("half",))
