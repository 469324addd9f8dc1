"""Coverage-quality front runner on the tiny HF fixture: rows, resume, report, plot."""

from __future__ import annotations

import json
import pathlib

import pytest

from amber_jax import runs
from amber_jax.runs.front import (
  FrontConfig,
  front_markdown,
  learning_curves,
  parse_method,
  run_front,
  save_front_plots,
)
from amber_jax.runs.plots import save_learning_curves

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"
METHODS = (
  "naive_rules",
  "amber",
  "search",
  "search+median",
  "search+learned1",
  "search+learnedscale1",
)


def _quiet(*args):
  pass


@pytest.fixture
def make_cfg(tmp_path):
  main = tmp_path / "main.txt"
  main.write_text(" ".join(f"word{i} and more text" for i in range(400)), encoding="utf-8")
  other = tmp_path / "other.txt"
  other.write_text(" ".join(f"other {i} words here" for i in range(300)), encoding="utf-8")

  def make(**kw):
    base = dict(
      model=str(FIXTURE),
      patterns=("2:4",),
      methods=METHODS,
      coverages=(0.3, 0.55, 0.9),
      seq_len=32,
      num_windows=2,
      calib_windows=2,
      search_windows=1,
      batch_size=2,
      text=str(main),
      transfer_text=str(other),
      output=str(tmp_path / "front.json"),
      cache_dir=str(tmp_path / "cache"),
    )
    return FrontConfig(**{**base, **kw})

  return make


def test_front_rows_resume_report_and_plot(make_cfg, tmp_path, monkeypatch):
  cfg = make_cfg()
  result = run_front(cfg, log=_quiet, show_progress=False)
  rows = {(r["method"], r["target"]): r for r in result["rows"]}
  # The paper's rules cannot reach 0.9 on this model (q, gate, down = 0.556 of the MACs);
  # learned factors are trained at the goal coverage only.
  expected = {(m, t) for m in METHODS[:4] for t in (0.3, 0.55, 0.9)}
  expected -= {("naive_rules", 0.9), ("amber", 0.9)}
  expected |= {("search+learned1", 0.55), ("search+learnedscale1", 0.55)}
  assert set(rows) == expected
  for (_, target), r in rows.items():
    assert r["coverage"] >= target - 1e-9
    assert r["calib_kl"] >= -1e-6 and r["perplexity"][cfg.text] > 1
    # The transfer text only at the goal coverage.
    assert (cfg.transfer_text in r["perplexity"]) == (target == 0.55)
  assert len(rows[("search+learned1", 0.55)]["learned"]["losses"]) == 1
  assert result["site_costs"]["2:4"]["tokens"] == 32
  assert json.loads(pathlib.Path(cfg.output).read_text())["rows"] == result["rows"]

  # A rerun with the same setup does nothing but reload.
  def fail(*a, **k):
    raise AssertionError("a finished row was computed again")

  monkeypatch.setattr(runs.front, "build_method_plan", fail)
  again = run_front(cfg, log=_quiet, show_progress=False)
  assert again["rows"] == result["rows"]

  markdown = front_markdown(result)
  assert "| search+median |" in markdown and "Ablation at coverage target 0.55" in markdown
  assert "`python experiments/front.py`" in markdown  # no commands recorded: the default one
  written = save_front_plots(result, tmp_path / "front.png")
  assert [p.name for p in written] == ["front.png", "learning_curves.png"]
  assert all(p.stat().st_size > 1000 for p in written)
  curves = learning_curves(result)
  learned = rows[("search+learned1", 0.55)]["learned"]
  assert curves["2:4 search+learned1"] == [*learned["losses"], learned["final_kl"]]
  assert set(curves) == {"2:4 search+learned1", "2:4 search+learnedscale1"}
  with pytest.raises(ValueError, match="non-empty list of KL values"):
    save_learning_curves({"a": []}, tmp_path / "empty.png")


def test_other_setup_is_an_error_and_keeps_the_file(make_cfg):
  cfg = make_cfg(methods=("search",), coverages=(0.5,))
  run_front(cfg, log=_quiet, show_progress=False)
  before = pathlib.Path(cfg.output).read_text()
  with pytest.raises(
    ValueError, match=r"holds a run of another setup \(differs in \['learning_rate'\]"
  ):
    run_front(
      make_cfg(methods=("search",), coverages=(0.5,), learning_rate=0.1),
      log=_quiet,
      show_progress=False,
    )
  assert pathlib.Path(cfg.output).read_text() == before  # the finished rows are kept
  pathlib.Path(cfg.output).write_text("{not json")
  with pytest.raises(ValueError, match="is not a readable front results file"):
    run_front(cfg, log=_quiet, show_progress=False)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(methods=("magic",)), "unknown method 'magic'; valid: dense, naive, naive_rules"),
    (dict(methods=("paper+median",)), "apply to searched plans"),
    (dict(methods=("naive",)), "has no coverage target"),
    (dict(methods=("paper", "amber")), "name one method twice"),
    (dict(methods=("search+nonsense",)), "correction"),
    (dict(coverages=(1.5,)), "coverage must be in"),
    (dict(search_windows=3), "search_windows must be in 1..2"),
    (dict(methods=("search+learned0",)), "learned steps must be a positive integer"),
    (dict(methods=("search+learnedx",)), "learned steps must be a positive integer"),
    (dict(methods=("search+learnedscale0",)), "learned steps must be a positive integer"),
    (dict(patterns=("3:2",)), "N"),
    (dict(cache_dir=""), "cache_dir"),
    (dict(rotations=("res_svd",)), "res_ takes"),
    (dict(rotations=("res_pca", "res_pca")), "name one rotation twice"),
    (dict(rotations=()), "rotations must name"),
  ],
)
def test_bad_config(make_cfg, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_cfg(**kwargs)


def test_parse_method():
  assert parse_method("search+median+bias") == ("search", "median+bias", 0, False)
  assert parse_method("search+learned") == ("search", "none", 4, False)
  assert parse_method("search+learned12") == ("search", "none", 12, False)
  assert parse_method("search+learnedscale2") == ("search", "none", 2, True)
  assert parse_method("naive") == ("naive", "none", 0, False)
  assert parse_method("paper") == ("amber", "none", 0, False)


def test_results_written_before_the_registry_resume_under_new_names(make_cfg, tmp_path):
  cfg = make_cfg(methods=("naive_rules", "amber"), coverages=(0.55,))
  result = run_front(cfg, log=_quiet, show_progress=False)
  assert result["method_names"] == "amber_jax.methods/1"
  old = json.loads(pathlib.Path(cfg.output).read_text())
  del old["method_names"]  # as written before the registry: "naive" and "paper"
  for r in old["rows"]:
    r["method"] = {"naive_rules": "naive", "amber": "paper"}[r["method"]]
  pathlib.Path(cfg.output).write_text(json.dumps(old))
  again = run_front(cfg, log=_quiet, show_progress=False)  # nothing recomputed
  assert [r["method"] for r in again["rows"]] == ["naive_rules", "amber"]
  assert "| amber |" in front_markdown(old) and "| 2:4 | amber |" in front_markdown(old)


def test_rotated_rows_next_to_the_plain_ones(make_cfg, tmp_path, monkeypatch):
  rotation = "res_pca+head_pca+down_balance"
  learned = "res_fold+learn1"
  cfg = make_cfg(methods=("search",), coverages=(0.3, 0.55), rotations=("none", rotation, learned))
  result = run_front(cfg, log=_quiet, show_progress=False)
  by = {r.get("rotation", "none"): r for r in result["rows"] if r["target"] == 0.55}
  assert set(by) == {"none", rotation, learned}
  # The learned rotation runs at the goal coverage only, learning through the searched plan.
  assert [r["target"] for r in result["rows"] if r.get("rotation") == learned] == [0.55]
  assert len(by[learned]["learned_rotation"]["losses"]) == 1
  assert by[learned]["dense_logit_gap_f64"] <= 1e-4
  rotated = by[rotation]
  assert rotated["dense_logit_gap"] <= 1e-4  # the dense model is unchanged (float32)
  assert rotated["inference_cost"] == "none" and rotated["rotation_seconds"] >= 0
  assert rotated["coverage"] >= 0.55 - 1e-9
  # Its own site costs, measured on the rotated model (not the plain model's).
  # (the learned rotation's sites come from its base's costs, res_fold)
  assert set(result["site_costs"]) == {"2:4", f"2:4 rotation={rotation}", "2:4 rotation=res_fold"}
  assert result["site_costs"]["2:4"]["kl"] != result["site_costs"][f"2:4 rotation={rotation}"]["kl"]
  markdown = front_markdown(result)
  assert f"| search [{rotation}] |" in markdown and "Rotations: calibration seconds" in markdown
  assert "single-site KL cost" in markdown
  monkeypatch.setattr(runs.front, "rotate_model", lambda *a, **k: 1 / 0)
  assert run_front(cfg, log=_quiet, show_progress=False)["rows"] == result["rows"]  # resumed
  with pytest.raises(ValueError, match="heads width 16 is not a multiple of the group size M=32"):
    run_front(  # refused before any weights load
      make_cfg(patterns=("1:32",), methods=("search",), coverages=(0.55,), rotations=("head_pca",)),
      log=_quiet,
      show_progress=False,
    )
