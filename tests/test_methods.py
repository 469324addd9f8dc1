"""The method registry (amber_jax.calibrate.methods): names, aliases, errors, and every runner's use
of it builds the same AmberConfig as the old flags did."""

from __future__ import annotations

import pytest

from amber_jax.calibrate import methods
from amber_jax.calibrate.methods import (
  ALIASES,
  BASE_METHODS,
  BEST,
  BEST_REASON,
  CALIBRATION_COSTS,
  check_method_conflicts,
  identify_method,
  resolve_method,
)
from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.core.patterns import NMPattern

P816 = NMPattern.parse("8:16")


@pytest.mark.parametrize("name", [*BASE_METHODS, *ALIASES])
def test_every_name_resolves_with_a_definition_and_cost(name):
  m = resolve_method(name)
  assert m.name in BASE_METHODS or "+" in m.name
  assert m.calibration in CALIBRATION_COSTS
  assert len(m.describe()) > 40
  if m.is_baseline:  # weight pruning / thresholds: build_method, not an AmberConfig
    assert identify_method(AmberConfig(pattern=None)) == "dense"
    return
  amber = m.amber_config("8:16")
  assert isinstance(amber, AmberConfig)
  assert (amber.pattern is None) == m.is_dense
  assert identify_method(amber, learned_steps=m.learned_steps, learn_scales=m.learn_scales) == (
    m.name
  )


def test_base_recipes_match_the_paper_and_the_old_flags():
  assert resolve_method("dense").amber_config("8:16") == AmberConfig(pattern=None)
  assert resolve_method("naive").amber_config("8:16") == AmberConfig(
    pattern=P816, score="naive", policy="all"
  )
  assert resolve_method("naive_rules").amber_config("8:16", coverage=0.4) == AmberConfig(
    pattern=P816, score="naive", policy="auto", coverage=0.4
  )
  assert resolve_method("amber").amber_config("8:16") == AmberConfig(
    pattern=P816, score="robust", policy="auto", coverage=0.55
  )
  assert resolve_method("search_mixed").amber_config("8:16", coverage=0.7) == AmberConfig(
    pattern=P816, score="robust", policy="search", coverage=0.7, o_order="mixed"
  )
  # The coverage target is ignored (the field keeps its default) where it does not apply.
  assert resolve_method("naive").amber_config("8:16", coverage=0.9).coverage == 0.55
  assert not resolve_method("naive").needs_calibration
  assert resolve_method("amber").needs_calibration


def test_aliases_and_suffixes():
  assert resolve_method("paper").name == "amber"
  assert resolve_method("paper").given == "paper"
  best = resolve_method("best")
  assert best.name == BEST == "search_mixed+learnedscale"
  assert (best.o_order, best.learned_steps, best.learn_scales) == ("mixed", 4, True)
  assert best.calibration == "optimiser steps"
  assert "37.73" in BEST_REASON and "42.72" in BEST_REASON  # the measured numbers behind it
  m = resolve_method("search+bias+median+learned12")
  assert (m.name, m.correction, m.learned_steps, m.learn_scales) == (
    "search+median+bias+learned12",
    "median+bias",
    12,
    False,
  )
  assert resolve_method("search+learned4").name == "search+learned"  # the default count
  assert resolve_method("search+median").amber_config("2:4").correction == "median"


@pytest.mark.parametrize(
  "name, match",
  [
    ("magic", r"unknown method 'magic'; valid: dense, naive, naive_rules, amber, search"),
    ("", "method must be a name"),
    ("amber+median", "apply to searched plans"),
    ("naive+learned", "apply to searched plans"),
    ("search+nonsense", "correction has unknown name 'nonsense'"),
    ("search+learned0", "learned steps must be a positive integer"),
    ("search+learnedscalex", "learned steps must be a positive integer"),
    ("search+learned+median", "unknown name 'learned'"),  # learning comes last
  ],
)
def test_bad_names(name, match):
  with pytest.raises(ValueError, match=match):
    resolve_method(name)


def test_conflicts_name_both():
  assert check_method_conflicts("search", {"policy": "search"}).name == "search"
  with pytest.raises(ValueError, match=r"method='search' conflicts with policy='auto'"):
    check_method_conflicts("search", {"policy": "auto"})
  with pytest.raises(ValueError, match=r"method='dense' conflicts with score='robust'"):
    check_method_conflicts("dense", {"score": "robust"})
  with pytest.raises(ValueError, match="fixes o_order"):
    resolve_method("amber").amber_config("8:16", o_order="mixed")


def test_prefill_method_gives_the_old_flags_config():
  from amber_jax.runs.prefill import PrefillRunConfig as Config

  def PrefillRunConfig(**kw):  # noqa: N802
    return Config(cache_dir="unused", **kw)

  default = PrefillRunConfig()
  assert PrefillRunConfig(method="amber").amber() == default.amber()
  assert PrefillRunConfig(method="paper").amber() == default.amber()
  assert default.method_name() == "amber"
  naive = PrefillRunConfig(score="naive", policy="all")
  assert PrefillRunConfig(method="naive").amber() == naive.amber()
  assert naive.method_name() == "naive"
  mixed = PrefillRunConfig(policy="search", o_order="mixed", coverage=0.7)
  assert PrefillRunConfig(method="search_mixed", coverage=0.7).amber() == mixed.amber()
  best = PrefillRunConfig(method="best")
  assert best.amber() == AmberConfig(pattern=P816, score="robust", policy="search", o_order="mixed")
  assert (best.policy, best.o_order, best.method_name()) == ("search", "mixed", BEST)
  assert PrefillRunConfig(method="dense").amber().pattern is None
  assert PrefillRunConfig(score="weight").method_name() is None  # no registry name
  with pytest.raises(ValueError, match=r"method='search' conflicts with policy='paper'"):
    PrefillRunConfig(method="search", policy="paper")
  with pytest.raises(ValueError, match="unknown method 'fast'"):
    PrefillRunConfig(method="fast")
  with pytest.raises(ValueError, match="conflicts with pattern='2:4'"):
    PrefillRunConfig(method="dense", pattern="2:4")
  with pytest.raises(ValueError, match="cannot be combined with quant='w8a8'"):
    PrefillRunConfig(method="search+median", quant="w8a8")


def test_zero_shot_and_generation_rows_match_the_old_configs():
  from amber_jax.runs.zero_shot import needs_calibration, plan_rows

  rows = dict(plan_rows(("dense", "8:16"), ("naive", "paper", "search_mixed"), 0.6, impl="xla"))
  assert rows[("dense", "dense")] == AmberConfig(pattern=None)
  assert rows[("naive", "8:16")] == AmberConfig(
    pattern=P816, score="naive", policy="all", impl="xla"
  )
  assert rows[("amber", "8:16")] == AmberConfig(
    pattern=P816, score="robust", policy="auto", coverage=0.6, impl="xla"
  )
  assert rows[("search_mixed", "8:16")].o_order == "mixed"
  assert not needs_calibration(("8:16",), ("naive",))
  assert needs_calibration(("8:16",), ("naive", "search"))
  assert not needs_calibration(("dense",), ("amber",))


def test_corrections_and_front_use_registry_names():
  from amber_jax.runs.corrections import CorrectionsConfig
  from amber_jax.runs.front import canonical_rows, front_method, parse_method

  cfg = CorrectionsConfig(methods=("paper", "naive"), cache_dir="x")
  assert cfg.base_plan("8:16", "paper") == AmberConfig(
    pattern=P816, score="robust", policy="auto", coverage=0.55
  )
  assert cfg.base_plan("8:16", "naive") == AmberConfig(pattern=P816, score="naive", policy="all")
  with pytest.raises(ValueError, match="methods must be base plans"):
    CorrectionsConfig(methods=("best",), cache_dir="x")
  with pytest.raises(ValueError, match="name one method twice"):
    CorrectionsConfig(methods=("paper", "amber"), cache_dir="x")

  assert front_method("paper").name == "amber"
  assert front_method("naive_rules").amber_config("8:16").policy == "auto"
  with pytest.raises(ValueError, match="'naive_rules'"):
    front_method("naive")  # every site sparse: no coverage target for the front
  assert parse_method("search_mixed+median+learnedscale3") == ("search_mixed", "median", 3, True)
  old = {"rows": [{"method": "naive"}, {"method": "paper"}, {"method": "search"}]}
  assert [r["method"] for r in canonical_rows(old)] == ["naive_rules", "amber", "search"]
  new = {**old, "method_names": "amber_jax.methods/1"}
  assert [r["method"] for r in canonical_rows(new)] == ["naive", "paper", "search"]


def test_build_method_plan_without_learning_is_build_plan(monkeypatch):
  calls = []

  def fake_build_plan(params, config, amber, **kw):
    calls.append((amber, kw))
    return "info"

  monkeypatch.setattr(methods, "build_plan", fake_build_plan)
  amber = resolve_method("amber").amber_config("8:16")
  out = methods.build_method_plan(None, None, "amber", amber, calib_windows=[1])
  assert out.info == "info" and out.learned is None and out.learned_record() is None
  assert methods.build_method_plan(None, None, None, amber).info == "info"
  assert calls[0][0] == amber
