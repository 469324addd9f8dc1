"""Coverage-quality front: the best plan of each method at each coverage target, on two texts.

Methods are names of the registry (``amber_jax.calibrate.methods``; all calibrated on the main
text's calibration windows only) that have a coverage target:

* ``naive_rules``: |x| scores, the paper's site rules (q, gate, down; q/gate skip layers by
  sensitivity), so coverage at most 0.594 on Llama-shaped models;
* ``amber``: the paper's robust scores under the same rules (Amber Pruner);
* ``search``: robust scores, sites chosen by their measured KL cost
  (``amber_jax.calibrate.site_search``), any coverage;
* ``search_mixed``: ``search`` with the o-projection's N:M groups mixing attention heads
  (``AmberConfig(o_order="mixed")``, ``amber_jax.plan.channel_order``); its site costs are measured
  with that grouping. Every suffix below applies to it as to ``search``;
* ``search+<correction>``: the searched plan with an output correction
  (``amber_jax.calibrate.correction_fit``);
* ``search+learned`` (4 optimiser steps) or ``search+learnedN`` (N steps): the searched plan
  with score factors learned by optax (``amber_jax.calibrate.learned_factors``), evaluated at the
  goal coverage only (about 40 s per step on 2 CPU cores for SmolLM2-135M);
  ``search+learnedscale[N]`` also learns a per-output-channel scale of every sparse site. After a
  correction (``search+median+learned``) the factors are learned through the calibrated correction.

Rows carry the method's canonical name (``paper`` and ``best`` are resolved). Results files
written before the registry (no ``"method_names"`` key) called ``naive_rules`` "naive" and
``amber`` "paper": their rows are read under the new names (``OLD_NAMES``), so such a file
still resumes and renders. ``naive`` itself (every site sparse, coverage 1.0) has no coverage
target and is refused here.

Every method also runs on rotated models (``FrontConfig.rotations``, ``amber_jax.rotate`` names
such as "res_pca+head_pca+down_balance"; "none" is the model as loaded): the rotation is
calibrated on the calibration windows for each pattern's group size, the dense model's logits
before and after are compared (``dense_logit_gap``, float32 and float64 passes) and each rotated
model gets its own site costs. A learned rotation (``...+learn<N>``) is trained at the goal
coverage through the plan of the method's base on its base rotation, whose site costs it reuses.
Rows carry their rotation, its calibration seconds and its inference cost; tables label them
"method [rotation]".

The per-site costs are measured once per (pattern, grouping, rotation) and reused for every
target. Rows are written to the JSON output (atomically) as they finish, and a rerun with the
same setup skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from amber_jax.calibrate.methods import DEFAULT_LEARN_STEPS as REGISTRY_LEARN_STEPS
from amber_jax.calibrate.methods import Method, build_method_plan, resolve_method
from amber_jax.calibrate.policy import max_skips_for_coverage
from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.calibrate.site_search import KLMeter, SiteCosts, measure_site_costs
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.eval.perplexity import perplexity
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.plan.channel_order import model_channel_order
from amber_jax.plan.schema import make_plan
from amber_jax.rotate import RotatedModel, Rotation, rotate_model
from amber_jax.rotate.learned import with_learned_rotation
from amber_jax.rotate.recipe import check_rotation_for
from amber_jax.runs.checks import check_text_source
from amber_jax.runs.common import (
  DTYPES,
  EvalRunOptions,
  check_model_options,
  environment,
  evaluation_texts,
  prepare_eval,
  recorded_config,
)
from amber_jax.runs.markdown import markdown_table
from amber_jax.runs.plots import save_coverage_front, save_learning_curves

DEFAULT_METHODS = ("naive_rules", "amber", "search", "search+median", "search+learned")
DEFAULT_COVERAGES = (0.4, 0.55, 0.7, 0.9)
DEFAULT_LEARN_STEPS = REGISTRY_LEARN_STEPS
# What rows of a results file written before the registry (no "method_names") were called.
OLD_NAMES = {"naive": "naive_rules", "paper": "amber"}
METHOD_NAMES = "amber_jax.methods/1"  # marks a file whose rows use the registry's names


def front_method(name: str) -> Method:
  """The registry method ``name`` stands for, if it has a coverage target (ValueError else)."""
  m = resolve_method(name)
  if not m.has_coverage_target:
    hint = (
      "; the |x| baseline under the paper's rules is 'naive_rules' (called 'naive' by this "
      "runner before the method registry)"
      if m.name == "naive"
      else ""
    )
    raise ValueError(
      f"method {name!r} has no coverage target (front methods choose their sites for one: "
      f"naive_rules, amber, search, search_mixed and their suffixes){hint}"
    )
  return m


def parse_method(method: str) -> tuple[str, str, int, bool]:
  """(base, correction, learning steps, learn output scales) of a registry name, e.g.
  "search+median" -> ("search", "median", 0, False); "search+learned" -> ("search", "none", 4,
  False); "search+learnedscale12" -> ("search", "none", 12, True). The parsing is
  ``amber_jax.calibrate.methods.resolve_method``'s; this tuple form is kept for its callers."""
  m = resolve_method(method)
  return m.base.name, m.correction, m.learned_steps, m.learn_scales


def canonical_rows(result: dict) -> list[dict]:
  """``result``'s rows under the registry's names: a file written before the registry (no
  ``"method_names"``) has its "naive" and "paper" rows renamed (``OLD_NAMES``)."""
  rows = result.get("rows", [])
  if result.get("method_names") == METHOD_NAMES:
    return rows
  return [{**r, "method": OLD_NAMES.get(r["method"], r["method"])} for r in rows]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontConfig(EvalRunOptions):
  """The front's settings: patterns x methods x coverage targets, on two texts."""

  patterns: tuple[str, ...] = ("8:16", "2:4")
  methods: tuple[str, ...] = DEFAULT_METHODS
  coverages: tuple[float, ...] = DEFAULT_COVERAGES
  goal_coverage: float = 0.55  # the transfer text and learned factors are evaluated here only
  search_windows: int = 2  # of the calibration windows, for the per-site KL costs
  learning_rate: float = 0.05
  transfer_text: str = "enwiki"  # evaluation only ("" to skip)
  output: str = ""  # JSON written after every row; rows already there are skipped
  rotations: tuple[str, ...] = ("none",)  # amber_jax.rotate names; each method runs on each

  def __post_init__(self):
    for name in ("patterns", "methods", "coverages", "rotations"):
      if not getattr(self, name):
        raise ValueError(f"{name} must name at least one entry")
    for p in self.patterns:
      NMPattern.parse(p)
    names = [front_method(m).name for m in self.methods]
    if len(set(names)) != len(names):
      raise ValueError(f"methods name one method twice: {list(self.methods)} -> {names}")
    rotations = [Rotation.parse(r).name for r in self.rotations]
    if len(set(rotations)) != len(rotations):
      raise ValueError(f"rotations name one rotation twice: {list(self.rotations)}")
    for c in (*self.coverages, self.goal_coverage):
      AmberConfig(pattern=None, coverage=c)
    learned = [m for m in self.methods if front_method(m).learned_steps]
    if learned and not any(abs(c - self.goal_coverage) < 1e-9 for c in self.coverages):
      raise ValueError(  # they are evaluated at the goal coverage only: they would never run
        f"methods {learned} run at goal_coverage={self.goal_coverage} only, which is not one "
        f"of the coverages {list(self.coverages)}; add it to coverages or change goal_coverage"
      )
    for name in ("seq_len", "num_windows", "calib_windows", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 1 <= self.search_windows <= self.calib_windows:
      raise ValueError(
        f"search_windows must be in 1..{self.calib_windows} (calib_windows), "
        f"got {self.search_windows}"
      )
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    check_model_options(self.dtype, self.cache_dir)
    check_text_source(self.text, arg="text")
    if self.transfer_text:
      check_text_source(self.transfer_text, arg="text_file")
    if self.output:
      check_output_file(self.output, arg="output")

  def setup_key(self) -> dict:
    """What makes stored rows comparable (anything else may change between reruns)."""
    keys = ("model", "seq_len", "num_windows", "calib_windows", "search_windows", "dtype", "text")
    return {k: getattr(self, k) for k in (*keys, "transfer_text", "learning_rate")}


def _row_key(row: dict) -> tuple:
  return row["pattern"], row["method"], round(row["target"], 6), row.get("rotation", "none")


def row_label(row: dict) -> str:
  """A row's method, with its rotation in brackets when it has one: "search_mixed [res_pca]"."""
  rotation = row.get("rotation", "none")
  return row["method"] if rotation == "none" else f"{row['method']} [{rotation}]"


def _reachable(method: Method, config, target: float) -> bool:
  if method.policy != "auto":
    return True
  try:
    max_skips_for_coverage(config, target)
  except ValueError:
    return False
  return True


def _load_previous(cfg: FrontConfig, log) -> dict:
  """The rows and site costs of an earlier run of the same setup in ``cfg.output`` (to resume);
  ValueError naming the file if it is unreadable or holds another setup: its finished rows
  are never overwritten."""
  if not cfg.output or not Path(cfg.output).exists():
    return {"rows": [], "site_costs": {}}
  try:
    previous = json.loads(Path(cfg.output).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{cfg.output} is not a readable front results file: {e}") from None
  if not isinstance(previous, dict) or not isinstance(previous.get("rows"), list):
    raise ValueError(f"{cfg.output} is not a front results file (no 'rows' list)")
  setup = cfg.setup_key()
  if previous.get("setup") != setup:
    old = previous.get("setup") if isinstance(previous.get("setup"), dict) else {}
    diffs = [k for k in sorted(set(old) | set(setup)) if old.get(k) != setup.get(k)]
    raise ValueError(
      f"{cfg.output} holds a run of another setup (differs in {diffs}); use another --output "
      "or delete the file to start over"
    )
  previous.setdefault("site_costs", {})
  previous["rows"] = canonical_rows(previous)
  log(f"resuming {cfg.output}: {len(previous['rows'])} rows already measured")
  return previous


def run_front(cfg: FrontConfig, *, log=print, show_progress=True) -> dict:
  """Every (pattern, method, coverage target) row; see the module docstring."""
  previous = _load_previous(cfg, log)
  done = {_row_key(r): r for r in previous["rows"]}
  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    validate=lambda c: [
      (
        AmberConfig(pattern=NMPattern.parse(p), policy="search").validate_for(c),
        [check_rotation_for(c, Rotation.parse(r), NMPattern.parse(p).m) for r in cfg.rotations],
      )
      for p in cfg.patterns
    ],
    show_progress=show_progress,
    log=log,
  )
  texts = evaluation_texts(setup, cfg, log)
  dtype = DTYPES[cfg.dtype]
  search_windows = setup.calib_windows[: cfg.search_windows]
  batch = dict(batch_size=cfg.batch_size, dtype=dtype)
  plain = RotatedModel(setup.params, setup.config, Rotation(), 0.0, 0.0)
  models: dict[tuple[str, str], RotatedModel] = {}
  meters: dict[tuple[str, str], KLMeter] = {}

  def model_for(pattern: str, rotation: str) -> RotatedModel:
    """The (pattern, rotation) model, built on first use; calibrated on calib windows only. A
    learned rotation's base (its bases without the learned part) is built here; the row
    learns the rest (``_front_row``)."""
    if rotation == "none":
      return plain
    key = (pattern, rotation)
    if key not in models:
      models.clear()  # one rotated copy of the weights at a time
      models[key] = rotate_model(
        setup.params,
        setup.config,
        rotation,
        m=NMPattern.parse(pattern).m,
        calib_windows=setup.calib_windows[:, :-1],
        check_tokens=search_windows[:1, :-1],
        show_progress=show_progress,
        **batch,
      )
      rm = models[key]
      log(
        f"{pattern} rotation {rotation}: built in {rm.seconds:.0f}s, dense logits move by "
        f"{rm.dense_logit_gap:.1e} (float32 passes; {rm.dense_logit_gap_f64:.1e} in float64, "
        f"{search_windows.shape[1] - 1} tokens)"
      )
    return models[key]

  def meter_for(pattern: str, rotation: str) -> KLMeter:
    """KL to the (pattern, rotation) model's own dense side, computed once per model."""
    key = ("", "none") if rotation == "none" else (pattern, rotation)
    if key not in meters:
      for k in [k for k in meters if k[1] != "none"]:  # one rotated model's at a time
        del meters[k]
      rm = model_for(pattern, rotation)
      meters[key] = KLMeter(rm.params, search_windows, config=rm.config, **batch)
    return meters[key]

  def evaluate(rm: RotatedModel, plan, desc, names):
    return {
      n: perplexity(
        rm.params,
        texts[n],
        plan=plan,
        config=rm.config,
        desc=f"{desc} [{n}]",
        show_progress=show_progress,
        **batch,
      ).perplexity
      for n in names
    }

  result = {
    "setup": cfg.setup_key(),
    "dense": previous.get("dense") or evaluate(plain, None, "dense", list(texts)),
    "site_costs": dict(previous.get("site_costs", {})),
    "rows": list(previous["rows"]),
    "method_names": METHOD_NAMES,
    "commands": list(previous.get("commands", [])),  # callers append theirs
    "config": recorded_config(cfg),
    **environment(),
  }
  log(f"dense: {result['dense']}")
  costs: dict[str, SiteCosts] = {
    key: SiteCosts(
      kl=np.asarray(c["kl"]),
      pattern=key.split()[0],
      tokens=c["tokens"],
      seconds=c["seconds"],
      ordered=tuple(c.get("ordered", ())),
      site_names=tuple(c.get("site_names", setup.config.site_names)),
    )
    for key, c in result["site_costs"].items()
  }
  ctx = dict(
    model_for=model_for,
    meter_for=meter_for,
    evaluate=evaluate,
    texts=texts,
    search_windows=search_windows,
    dtype=dtype,
    batch=batch,
    log=log,
    show_progress=show_progress,
  )
  for pattern in cfg.patterns:
    for rotation in (Rotation.parse(r).name for r in cfg.rotations):
      for target in cfg.coverages:
        for name in cfg.methods:
          row = _front_row(cfg, setup, pattern, rotation, target, name, done, costs, result, ctx)
          if row is None:
            continue
          result["rows"].append(row)
          log(
            f"{pattern:>5} {row_label(row):>32} target {target:.2f} (coverage "
            f"{row['coverage']:.3f}): "
            + " ".join(f"{k} {v:7.2f}" for k, v in row["perplexity"].items())
            + f"  calib {row['calib_seconds']:.0f}s"
          )
          if cfg.output:
            write_json_atomic(cfg.output, result)
  return result


def _cost_key(pattern: str, o_order: str, rotation: str) -> str:
  """Site costs per (pattern, grouping, rotation): "8:16", "8:16 o_order=mixed",
  "8:16 o_order=mixed rotation=res_pca"."""
  key = pattern if o_order == "heads" else f"{pattern} o_order={o_order}"
  return key if rotation == "none" else f"{key} rotation={rotation}"


def _front_row(cfg, setup, pattern, rotation, target, name, done, costs, result, ctx):
  """One measured row of the front, or None when it is done, not for this target or not
  reachable (see ``run_front``)."""
  log, show_progress, dtype = ctx["log"], ctx["show_progress"], ctx["dtype"]
  m = front_method(name)
  method, learned = m.name, m.learned_steps
  if (pattern, method, round(target, 6), rotation) in done:
    return None
  if learned and abs(target - cfg.goal_coverage) > 1e-9:
    return None
  if not _reachable(m, setup.config, target):
    log(f"{pattern} {method} @ {target}: unreachable under the paper's rules, skipped")
    return None
  rot = Rotation.parse(rotation)
  if rot.learn_steps and abs(target - cfg.goal_coverage) > 1e-9:
    return None  # a learned rotation is trained for the goal coverage's plan only
  base_rotation = rot.without_learning().name
  rm = ctx["model_for"](pattern, base_rotation)
  params, config = rm.params, rm.config
  amber = m.amber_config(NMPattern.parse(pattern), coverage=target)
  score, policy, o_order = m.score, m.policy, m.o_order
  # A learned rotation's sites are chosen from its base model's costs.
  cost_key = _cost_key(pattern, o_order, base_rotation)
  if policy == "search" and cost_key not in costs:
    base_plan = make_plan(
      config,
      amber.pattern,
      factors=model_factors(params, score),
      channel_order=model_channel_order(config, o_order),
    )
    costs[cost_key] = found = measure_site_costs(
      params,
      base_plan,
      ctx["search_windows"],
      config=config,
      dtype=dtype,
      show_progress=show_progress,
    )
    log(f"{cost_key} site costs in {found.seconds:.0f}s:\n{found.table()}")
    result["site_costs"][cost_key] = {
      "kl": found.kl.tolist(),
      "tokens": found.tokens,
      "seconds": found.seconds,
      "ordered": list(found.ordered),
      "site_names": list(found.site_names),
    }
  plan_kw = dict(
    calib_windows=setup.calib_windows,
    batch_size=cfg.batch_size,
    dtype=dtype,
    show_progress=show_progress,
    site_costs=costs.get(cost_key) if policy == "search" else None,
    learning_rate=cfg.learning_rate,
  )
  learned_rotation = None
  if rot.learn_steps:  # through the plan of the method's base (no correction, no learning)
    base_plan = build_method_plan(params, config, resolve_method(m.base.name), amber, **plan_kw)
    rm, learned_rotation = with_learned_rotation(
      rm,
      rot,
      base_plan.plan,
      setup.calib_windows,
      original=(setup.params, setup.config),
      check_tokens=ctx["search_windows"][:1, :-1],
      show_progress=show_progress,  # 2 windows per step, as the learned factors (memory)
    )
    params = rm.params
    log(
      f"{pattern} {rotation}: learned rotation KL {learned_rotation.initial_kl:.4f} -> "
      f"{learned_rotation.final_kl:.4f} in {learned_rotation.seconds:.0f}s"
    )
  start = time.perf_counter()
  built = build_method_plan(params, config, m, amber, **plan_kw)
  info, plan, learn_log = built.info, built.plan, built.learned_record()
  calib_seconds = time.perf_counter() - start
  texts = ctx["texts"]
  names = list(texts) if abs(target - cfg.goal_coverage) < 1e-9 else [cfg.text]
  row = {
    "pattern": pattern,
    "method": method,
    "target": target,
    "coverage": info.coverage.covered,
    "sparse_sites": {p: int(np.asarray(plan.enabled[p]).sum()) for p in plan.enabled},
    "calib_kl": (
      ctx["meter_for"](pattern, rotation)
      if learned_rotation is None
      else KLMeter(params, ctx["search_windows"], config=config, **ctx["batch"])
    )(plan),
    "perplexity": ctx["evaluate"](rm, plan, f"{pattern} {method} @ {target}", names),
    "calib_seconds": calib_seconds,
    "learned": learn_log,
  }
  if learned_rotation is not None:
    row["learned_rotation"] = {
      "losses": learned_rotation.losses,
      "initial_kl": learned_rotation.initial_kl,
      "final_kl": learned_rotation.final_kl,
      "seconds": learned_rotation.seconds,
    }
  if rotation != "none":
    row.update(
      rotation=rotation,
      rotation_seconds=rm.seconds,
      dense_logit_gap=rm.dense_logit_gap,
      dense_logit_gap_f64=rm.dense_logit_gap_f64,
      inference_cost=rm.rotation.inference_cost,
    )
  return row


def _gap_closed(ppl: float, base: float, dense: float) -> float:
  """Share of the paper's log-perplexity gap to dense that a plan closes (1 = dense)."""
  gap = np.log(base) - np.log(dense)
  return float((np.log(base) - np.log(ppl)) / gap) if gap > 0 else float("nan")


def front_markdown(result: dict, commands: list[str] | None = None) -> str:
  """RESULTS.md section: the front (perplexity per method and coverage target) and, at the goal
  coverage, the ablation with the transfer text and the share of the paper's gap closed.
  ``commands`` default to the ones recorded in ``result``."""
  commands = commands or result.get("commands") or ["python experiments/front.py"]
  cfg = result["config"]
  main, dense = cfg["text"], result["dense"]
  rows = [{**r, "method": row_label(r)} for r in canonical_rows(result)]
  # Rows may come from several runs into one file (other methods or targets): list them all.
  methods = list(dict.fromkeys(r["method"] for r in rows))
  patterns = list(dict.fromkeys(r["pattern"] for r in rows))
  out = [
    f"## Coverage-quality front: site search, corrections, learned factors ({cfg['model']})",
    "",
    "Commands: "
    + ", ".join(f"`{c}`" for c in commands)
    + f" ({cfg['num_windows']} windows x {cfg['seq_len']} tokens of {main};"
    f" calibration on {cfg['calib_windows']} other windows, site costs on"
    f" {cfg['search_windows']} of them). Dense: "
    + ", ".join(f"{t} {p:.2f}" for t, p in dense.items())
    + ".",
    "",
  ]
  for pattern in patterns:
    by = {(r["method"], round(r["target"], 6)): r for r in rows if r["pattern"] == pattern}
    targets = sorted({t for _, t in by})
    if not targets:
      continue
    table = []
    for m in methods:
      cells = []
      for t in targets:
        r = by.get((m, t))
        cells.append("-" if r is None else f"{r['perplexity'][main]:.2f} ({r['coverage']:.3f})")
      table.append([m, *cells])
    out += [
      f"**{pattern}**: {main} perplexity (achieved coverage) per coverage target; '-' = not"
      " reachable under the method's rules or not run.",
      "",
      markdown_table(["method", *[f"{t:g}" for t in targets]], table),
      "",
    ]
  goal = round(cfg["goal_coverage"], 6)
  ablation = []
  for pattern in patterns:
    base = next(
      (
        r
        for r in rows
        if (r["pattern"], r["method"], round(r["target"], 6)) == (pattern, "amber", goal)
      ),
      None,
    )
    for r in rows:
      if r["pattern"] != pattern or round(r["target"], 6) != goal:
        continue
      cells = [pattern, r["method"], f"{r['coverage']:.3f}"]
      for t in dense:
        p = r["perplexity"].get(t)
        closed = (
          ""
          if base is None or p is None
          else f" ({_gap_closed(p, base['perplexity'][t], dense[t]):+.0%})"
        )
        cells.append("-" if p is None else f"{p:.2f}{closed}")
      cells += [f"{1e3 * r['calib_kl']:.1f}", f"{r['calib_seconds']:.0f}"]
      ablation.append(cells)
  if ablation:
    out += [
      f"Ablation at coverage target {cfg['goal_coverage']}: perplexity (share of the paper's"
      " log-perplexity gap to dense closed), KL to dense on the site-search windows (x 1e3),"
      " calibration seconds (site costs, measured once per pattern, not included:"
      + ", ".join(f" {p} {c['seconds']:.0f}s" for p, c in result.get("site_costs", {}).items())
      + ").",
      "",
      markdown_table(["pattern", "method", "coverage", *dense, "KL x1e3", "calib s"], ablation),
    ]
  out += rotation_markdown(result)
  return "\n".join(out)


def rotation_markdown(result: dict) -> list[str]:
  """Lines of the rotations' tables (empty without rotated rows): each rotation's build time,
  the dense model's largest logit change and its inference cost; then, per pattern, the median
  single-site KL cost of each projection with and without each rotation."""
  rotated = [r for r in result.get("rows", []) if r.get("rotation", "none") != "none"]
  if not rotated:
    return []
  seen = {}
  for r in rotated:
    seen.setdefault((r["pattern"], r["rotation"]), r)
  table = [
    [
      p,
      rot,
      f"{r['rotation_seconds']:.0f}",
      f"{r['dense_logit_gap']:.1e}",
      f"{r.get('dense_logit_gap_f64', float('nan')):.1e}",
      r["inference_cost"],
    ]
    for (p, rot), r in seen.items()
  ]
  out = [
    "",
    "Rotations: calibration seconds (statistics and bases, on the calibration windows); the dense"
    " model's largest |logit| change on one calibration window, with both passes in float32 (the"
    " pass's own rounding: a pure permutation of the MLP channels moves it by about 1e-4) and in"
    " float64 (the rotation's error); inference cost.",
    "",
    markdown_table(
      ["pattern", "rotation", "s", "max dlogit f32", "max dlogit f64", "inference cost"], table
    ),
  ]
  costs = result.get("site_costs", {})
  for pattern in dict.fromkeys(p for p, _ in seen):
    keys = [k for k in costs if k.split()[0] == pattern]
    if len(keys) < 2:
      continue
    # Files from before site names were stored: the rows' sites are the same ones, in order.
    names = next(
      (costs[k]["site_names"] for k in keys if costs[k].get("site_names")),
      list(seen[next(iter(seen))].get("sparse_sites", {})),
    )
    lines = []
    for k in keys:
      kl = np.asarray(costs[k]["kl"])
      med = np.median(kl, axis=0)
      lines.append([k, *[f"{1e3 * v:.2f}" for v in med], f"{1e3 * kl.sum():.0f}"])
    out += [
      "",
      f"{pattern} single-site KL cost (x 1e3, median over layers; last column: sum over all"
      " sites) per grouping and rotation:",
      "",
      markdown_table(["costs", *names, "sum"], lines),
    ]
  return out


def save_front_plots(result: dict, coverage_png: str | os.PathLike) -> list[Path]:
  """The front's PNGs: ``coverage_png`` (perplexity against coverage per method) and, if any
  row learned factors, ``learning_curves.png`` next to it (KL per step). Returns the paths."""
  text = result["config"]["text"]
  rows = [{**r, "method": row_label(r)} for r in canonical_rows(result)]
  written = [save_coverage_front(rows, result["dense"][text], coverage_png, text=text)]
  curves = learning_curves(result)
  if curves:
    path = Path(coverage_png).with_name("learning_curves.png")
    title = "learned score factors: KL to dense per step (last: mean over all windows)"
    written.append(save_learning_curves(curves, path, title=title))
  return written


def learning_curves(result: dict) -> dict[str, list[float]]:
  """ "pattern method" -> KL per step of every learned row: the training-batch KL before each
  update, then the mean KL over all calibration windows after the last one."""
  return {
    f"{r['pattern']} {row_label(r)}": [*r["learned"]["losses"], r["learned"]["final_kl"]]
    for r in canonical_rows(result)
    if r.get("learned")
  }
