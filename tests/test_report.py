"""experiments/report.py's library side: result files -> RESULTS.md sections and PNG plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from amber_jax.runs.generation import RESULTS_FORMAT as GEN_FORMAT
from amber_jax.runs.report import accuracy_changes, write_report
from amber_jax.runs.zero_shot import RESULTS_FORMAT as ZS_FORMAT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mc_entry(method, pattern, task, correct):
  c = np.asarray(correct, float)
  se = float(c.std(ddof=1) / math.sqrt(len(c)))
  return {
    "method": method, "pattern": pattern, "task": task, "acc": float(c.mean()),
    "acc_stderr": se, "acc_norm": float(c.mean()), "acc_norm_stderr": se, "n": len(c),
    "num_fewshot": 0, "correct_norm": list(c), "subsample": None, "settings": {},
  }  # fmt: skip


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  dense = {t: rng.integers(0, 2, 40) for t in ("task_a", "task_b")}
  zs = {}
  for t, d in dense.items():
    zs[f"dense/dense/{t}"] = _mc_entry("dense", "dense", t, d)
    flip = rng.random(40) < 0.2
    zs[f"naive/2:4/{t}"] = _mc_entry("naive", "2:4", t, np.where(flip, 1 - d, d))
  (tmp_path / "zs.json").write_text(json.dumps({"format": ZS_FORMAT, "results": zs}))
  gen = {
    f"{m}/{p}/task_a": {
      "method": m, "pattern": p, "task": "task_a", "exact_match": 0.5,
      "exact_match_stderr": 0.1, "n": 10, "num_fewshot": 3, "answers": ["x"] * 10,
      "settings": {}, **({"agreement": 0.8} if m != "dense" else {}),
    }
    for m, p in (("dense", "dense"), ("naive", "8:16"))
  }  # fmt: skip
  (tmp_path / "gen.json").write_text(json.dumps({"format": GEN_FORMAT, "results": gen}))
  rows = [
    {"pattern": p, "score": s, "policy": pol, "perplexity": 40.0 + i, "coverage": 0.6,
     "skip_layers": [1] if pol == "auto" else []}
    for i, (p, s, pol) in enumerate(
      [(p, s, pol) for p in ("2:4", "8:16") for s in ("naive", "robust") for pol in ("all", "auto")]
    )
  ]  # fmt: skip
  cfg = {"model": "m", "patterns": ["2:4", "8:16"], "scores": ["naive", "robust"],
         "policies": ["all", "auto"], "num_windows": 8, "seq_len": 512, "text": "t",
         "calib_windows": 8, "coverage": 0.55}  # fmt: skip
  table = {"dense": {"perplexity": 33.3}, "rows": rows, "config": cfg,
           "device": {"backend": "cpu"}, "versions": {"jax": "x"}}  # fmt: skip
  (tmp_path / "table.json").write_text(json.dumps(table))
  sens = {"errors": rng.random((4, 7)).tolist(), "projections": list("qkvogud"),
          "skip_layers": [1], "config": {"pattern": "8:16", "score": "robust"}}  # fmt: skip
  (tmp_path / "sens.json").write_text(json.dumps(sens))
  front_rows = [
    {"pattern": "8:16", "method": m, "target": t, "coverage": t + 0.01, "calib_kl": 0.1,
     "calib_seconds": 3.0, "perplexity": {"t": 40.0 - 5 * (m == "search") + 10 * t, "u": 30.0}}
    for m in ("paper", "search") for t in (0.4, 0.55)
  ]  # fmt: skip
  front = {"dense": {"t": 33.3, "u": 23.4}, "rows": front_rows, "site_costs": {},
           "commands": ["python experiments/front.py"],
           "config": {"model": "m", "text": "t", "num_windows": 8, "seq_len": 512,
                      "calib_windows": 8, "search_windows": 2, "goal_coverage": 0.55}}  # fmt: skip
  (tmp_path / "front.json").write_text(json.dumps(front))
  return tmp_path, zs, dense


def test_write_report_renders_every_section_and_plot(files):
  tmp, zs, dense = files
  md = tmp / "RESULTS.md"
  md.write_text("# Results\n\nkept text\n")
  written = write_report(
    dense_full=tmp / "zs.json", zero_shot=tmp / "zs.json", generation=tmp / "gen.json",
    amber_table=tmp / "table.json", sensitivity=tmp / "sens.json", front=tmp / "front.json",
    results_md=md,
    plots_dir=tmp / "plots", log=lambda *a: None,
  )  # fmt: skip
  text = md.read_text()
  assert "kept text" in text
  for section in ("zero-shot-dense", "zero-shot", "generation", "amber-table", "front"):
    assert f"<!-- {section}:start -->" in text
  assert f"| task_a | 40 | {100 * dense['task_a'].mean():.1f} ± " in text  # the dense table
  assert "| 2:4 naive |" in text and "| dense |" in text  # the paper-style table
  pngs = sorted(p.name for p in written if p.suffix == ".png")
  assert pngs == [
    "accuracy_change.png",
    "coverage_front.png",
    "perplexity_vs_pattern.png",
    "sensitivity_heatmap.png",
  ]
  # The front's ablation: the search row closes part of the paper's gap on both texts.
  assert "| 8:16 | search | 0.560 | 40.50 (" in text
  for p in written:
    if p.suffix == ".png":
      assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
  assert not list((tmp / "plots").glob(".*"))  # no temporary files left behind


def test_accuracy_changes_are_paired(files):
  _, zs, dense = files
  changes = accuracy_changes(zs)
  change, se = changes["2:4 naive"]["task_a"]
  d = np.asarray(zs["naive/2:4/task_a"]["correct_norm"]) - dense["task_a"]
  assert change == pytest.approx(100 * d.mean())
  assert se == pytest.approx(100 * d.std(ddof=1) / math.sqrt(40))
  unpaired = 100 * math.hypot(
    zs["naive/2:4/task_a"]["acc_norm_stderr"], zs["dense/dense/task_a"]["acc_norm_stderr"]
  )
  assert se < unpaired  # the paired error is the smaller one when the models mostly agree


def test_bad_files_change_nothing(files):
  tmp, _, _ = files
  md = tmp / "RESULTS.md"
  md.write_text("# Results\n")
  (tmp / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    write_report(zero_shot=tmp / "zs.json", amber_table=tmp / "bad.json", results_md=md)
  assert md.read_text() == "# Results\n"
  with pytest.raises(ValueError, match="at least one"):
    write_report(results_md=md)
  with pytest.raises(ValueError, match="is not a amber_jax.zero_shot"):
    write_report(zero_shot=tmp / "gen.json", results_md=md)
