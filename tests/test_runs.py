"""The main job's bad inputs fail before any weights are loaded (tiny HF fixture model)."""

from __future__ import annotations

import pathlib

import pytest

import amber_jax.runs.common as common
from amber_jax.runs.prefill import PrefillRunConfig, format_table, run_prefill

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "tiny-llama"


@pytest.fixture
def no_weight_loading(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("weights were loaded before the bad input was reported")

  monkeypatch.setattr(common, "load_model", refuse)


@pytest.mark.parametrize("pattern", ["3:2", "0:4", "4:4", "8", "a:b"])
def test_bad_pattern_fails_at_config(pattern, tmp_path):
  with pytest.raises(ValueError, match="pattern"):
    PrefillRunConfig(pattern=pattern, cache_dir=str(tmp_path))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(seq_len=0), "seq_len must be >= 1"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(score="abs"), "score must be one of"),
    (dict(policy="half"), "policy must be one of"),
    (dict(coverage=0.0), "coverage must be in"),
    (dict(policy="auto", calib_windows=0), "calib_windows"),
    (dict(policy="search", calib_windows=0), "policy=search needs calib_windows"),
  ],
)
def test_bad_flags_fail_at_config(kwargs, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    PrefillRunConfig(cache_dir=str(tmp_path), **kwargs)


def test_m_not_dividing_a_width_fails_before_loading(tmp_path, no_weight_loading):
  # tiny-llama: d_model 64, so M = 128 cannot divide the q/k/v/gate/up input width.
  cfg = PrefillRunConfig(model=str(FIXTURE), pattern="64:128", cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="M=128 must divide"):
    run_prefill(cfg, show_progress=False)


def test_skip_layer_out_of_range_fails_before_loading(tmp_path, no_weight_loading):
  cfg = PrefillRunConfig(
    model=str(FIXTURE), pattern="8:16", policy="paper", skip_layers=(7,), cache_dir=str(tmp_path)
  )
  with pytest.raises(ValueError, match="skip layer 7 is out of range"):
    run_prefill(cfg, show_progress=False)


def test_short_text_fails_before_loading(tmp_path, no_weight_loading):
  text = tmp_path / "short.txt"
  text.write_text("Only a few words here.", encoding="utf-8")
  cfg = PrefillRunConfig(
    model=str(FIXTURE),
    pattern="8:16",
    text=str(text),
    seq_len=64,
    num_windows=1,
    calib_windows=1,
    cache_dir=str(tmp_path),
  )
  with pytest.raises(ValueError, match="text too short"):
    run_prefill(cfg, show_progress=False)


def test_missing_model_and_text_files(tmp_path, no_weight_loading):
  with pytest.raises(ValueError, match="neither a known name"):
    run_prefill(
      PrefillRunConfig(model=str(tmp_path / "nope.gguf"), cache_dir=str(tmp_path)),
      show_progress=False,
    )
  cfg = PrefillRunConfig(
    model=str(FIXTURE), text=str(tmp_path / "missing.txt"), cache_dir=str(tmp_path)
  )
  with pytest.raises(ValueError, match="does not exist"):
    run_prefill(cfg, show_progress=False)


@pytest.mark.parametrize("policy", ["auto", "search"])
def test_tiny_model_end_to_end(tmp_path, policy):
  """The whole job on the tiny HF fixture: a dense and a sparse row, JSON-ready output."""
  text = tmp_path / "text.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(400)), encoding="utf-8")
  cfg = PrefillRunConfig(
    model=str(FIXTURE),
    pattern="8:16",
    score="weight",
    policy=policy,
    text=str(text),
    seq_len=32,
    num_windows=2,
    calib_windows=2,
    gen_prompts=2,
    gen_prompt_len=8,
    gen_tokens=4,
    batch_size=2,
    cache_dir=str(tmp_path / "cache"),
  )
  result = run_prefill(cfg, show_progress=False, log=lambda *a: None)
  assert result["dense"]["tokens"] == result["sparse"]["tokens"] == 64
  assert result["sparse"]["pattern"] == "8:16"
  assert 0.55 <= result["coverage"] <= 1  # the default coverage target
  assert 0 <= result["generation"]["agreement"] <= 1
  assert result["versions"]["jax"]


def _tiny_job(tmp_path, **kwargs) -> PrefillRunConfig:
  text = tmp_path / "text.txt"
  text.write_text(" ".join(f"word{i} and more text" for i in range(400)), encoding="utf-8")
  settings = dict(
    model=str(FIXTURE),
    text=str(text),
    seq_len=32,
    num_windows=2,
    calib_windows=2,
    gen_prompts=0,
    batch_size=2,
    cache_dir=str(tmp_path / "cache"),
  )
  return PrefillRunConfig(**{**settings, **kwargs})


def test_default_job_is_amber_next_to_the_naive_baseline(tmp_path):
  """The main command's defaults: dense, the naive baseline (|x|, every site) and Amber Pruner
  (robust score, auto skip layers at coverage >= 0.55), on the same windows."""
  cfg = _tiny_job(tmp_path)
  assert (cfg.score, cfg.policy, cfg.coverage, cfg.naive_baseline) == ("robust", "auto", 0.55, True)
  result = run_prefill(cfg, show_progress=False, log=lambda *a: None)
  naive, amber = result["naive"], result["sparse"]
  assert (naive["policy"], naive["score"], naive["coverage"]) == ("all", "naive", 1.0)
  assert naive["removed"] == 0.5
  assert (amber["policy"], amber["score"]) == ("auto", "robust")
  assert 0.55 <= result["coverage"] < 1.0 and result["removed"] == result["coverage"] / 2
  assert naive["tokens"] == amber["tokens"] == result["dense"]["tokens"] == 64
  assert naive["perplexity"] != amber["perplexity"]  # two different plans were evaluated
  table = format_table(result)
  print(table)
  lines = table.splitlines()
  assert lines[2].startswith("dense ")
  assert lines[3].startswith("8:16 all/naive (naive top-k) ") and "100.0%" in lines[3]
  assert lines[4].startswith("8:16 auto/robust (Amber Pruner) ")
  assert f"{100 * result['coverage']:.1f}%" in lines[4]
  assert any(line.startswith("plan built in ") for line in lines)


def test_named_method_is_the_same_plan_and_is_recorded(tmp_path):
  """--method=amber is the default plan; a learned method learns; the JSON names the method."""
  quiet = dict(show_progress=False, log=lambda *a: None)
  default = run_prefill(_tiny_job(tmp_path, gen_prompts=0), **quiet)
  named = run_prefill(_tiny_job(tmp_path, method="paper", gen_prompts=0), **quiet)
  assert named["sparse"]["perplexity"] == default["sparse"]["perplexity"]
  assert named["skip_layers"] == default["skip_layers"]
  assert default["method"] == named["method"] == named["sparse"]["method"] == "amber"
  assert named["naive"]["method"] == "naive" and named["config"]["method"] == "paper"
  learned = run_prefill(
    _tiny_job(tmp_path, method="search_mixed+learnedscale1", gen_prompts=0), **quiet
  )
  assert learned["method"] == "search_mixed+learnedscale1"
  assert (learned["sparse"]["policy"], learned["sparse"]["o_order"]) == ("search", "mixed")
  assert learned["learned"]["steps"] == 1 and learned["learned"]["scales"] is True
  assert "(search_mixed+learnedscale1)" in format_table(learned)


def test_naive_baseline_is_not_repeated_or_can_be_left_out(tmp_path):
  naive_plan = run_prefill(
    _tiny_job(tmp_path, score="naive", policy="all"), show_progress=False, log=lambda *a: None
  )
  assert "naive" not in naive_plan and naive_plan["sparse"]["score"] == "naive"
  without = run_prefill(
    _tiny_job(tmp_path, score="weight", policy="paper", naive_baseline=False),
    show_progress=False,
    log=lambda *a: None,
  )
  assert "naive" not in without and "naive top-k" not in format_table(without)
  dense = run_prefill(_tiny_job(tmp_path, pattern="dense"), show_progress=False, log=print)
  assert "naive" not in dense and "sparse" not in dense


def test_prefill_table_of_a_searched_plan_with_mixed_o_groups():
  row = dict(perplexity=39.44, tokens=4096, tokens_per_second=450.0, seconds=9.0)
  result = {
    "dense": dict(row, perplexity=33.31, seconds=7.0),
    "sparse": dict(row, pattern="8:16", policy="search", score="robust", o_order="mixed"),
    "coverage": 0.55,
    "removed": 0.275,
    "sparse_sites": {"q": 26, "k": 17, "v": 3, "o": 26, "gate": 12, "up": 2, "down": 30},
    "skip_layers": [],
  }
  table = format_table(result)
  print(table)
  assert "8:16 search/robust, o mixed" in table
  assert "layers sparse per projection: q 26, k 17, v 3, o 26, gate 12, up 2, down 30" in table
  assert "q/gate dense in layers" not in table


def _run_configs():
  from amber_jax.runs.amber_table import AmberTableConfig
  from amber_jax.runs.corrections import CorrectionsConfig
  from amber_jax.runs.front import FrontConfig
  from amber_jax.runs.generation import GenerationConfig
  from amber_jax.runs.quant_table import QuantTableConfig
  from amber_jax.runs.rotation_costs import RotationCostsConfig
  from amber_jax.runs.sensitivity import SensitivityRunConfig
  from amber_jax.runs.zero_shot import ZeroShotConfig

  needs_output = dict(output="out.json")
  return [
    (PrefillRunConfig, {}),
    (AmberTableConfig, {}),
    (CorrectionsConfig, {}),
    (FrontConfig, {}),
    (GenerationConfig, needs_output),
    (QuantTableConfig, {}),
    (RotationCostsConfig, {}),
    (SensitivityRunConfig, {}),
    (ZeroShotConfig, needs_output),
  ]


@pytest.mark.parametrize(
  "config_cls, extra", _run_configs(), ids=lambda v: getattr(v, "__name__", "")
)
def test_every_run_config_checks_dtype_and_cache_dir(config_cls, extra, tmp_path):
  config_cls(cache_dir=str(tmp_path), **extra)  # the defaults are valid
  with pytest.raises(ValueError, match="cache_dir must be given"):
    config_cls(cache_dir="", **extra)
  with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float32'\]"):
    config_cls(cache_dir=str(tmp_path), dtype="float16", **extra)


def test_results_record_no_machine_paths(tmp_path):
  from amber_jax.runs.common import recorded_config

  assert "cache_dir" not in recorded_config(PrefillRunConfig(cache_dir=str(tmp_path)))
  root = pathlib.Path(__file__).resolve().parents[1]
  for path in sorted((root / "results").glob("*.json")):
    text = path.read_text(encoding="utf-8")
    assert '"cache_dir"' not in text and str(root) not in text, path.name


@pytest.mark.parametrize(
  ("kwargs", "kind"),
  [
    (dict(method="wanda", pattern="2:4"), "weight"),
    (dict(method="sparsegpt", sparsity=0.4, calib_windows=5), "weight"),
    (dict(method="teal_uniform", sparsity=0.5), "threshold"),
    (dict(method="cats", sparsity=0.5, gen_prompts=2, gen_prompt_len=8, gen_tokens=4), "threshold"),
  ],
)
def test_baseline_methods_run_in_the_prefill_job(tmp_path, kwargs, kind):
  result = run_prefill(_tiny_job(tmp_path, **kwargs), show_progress=False, log=lambda *a: None)
  sparse = result["sparse"]
  assert (sparse["method"], sparse["policy"]) == (kwargs["method"], kind)
  assert sparse["tokens"] == result["dense"]["tokens"]
  assert sparse["perplexity"] != result["dense"]["perplexity"]
  assert 0 < result["removed"] <= result["coverage"] <= 1
  assert result["baseline"]["seconds"] > 0 and "naive" not in result
  if "sparsity" in kwargs and kind == "weight":
    assert result["baseline"]["zero_share"] == pytest.approx(kwargs["sparsity"], abs=0.01)
  if "gen_prompts" in kwargs:
    assert 0 <= result["generation"]["agreement"] <= 1
  table = format_table(result)
  assert f"{kwargs['method']} ({kind} sparsity)" in table


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(sparsity=0.5), "sparsity applies to the unstructured baselines"),
    (dict(method="teal"), "needs exactly one sparsity"),
    (dict(method="teal", pattern="2:4", sparsity=0.5), "takes a sparsity"),
    (dict(method="wanda", sparsity=1.5), r"in \(0, 1\)"),
    (dict(method="amber", sparsity=0.5), "takes an N:M pattern"),
    (dict(method="wanda", quant="w8a8"), "does not take quant"),
  ],
)
def test_bad_baseline_options_fail_at_config(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    PrefillRunConfig(cache_dir=str(tmp_path), **kwargs)
