"""Ablation of the output corrections (amber_jax.calibrate.correction_fit) on one model and two
texts.

For every pattern and method (names of ``amber_jax.calibrate.methods`` without a correction or
learned factors of their own; by default ``amber``: robust score, auto policy at the coverage
target, and ``naive``: |x| score, every site sparse; ``paper`` is ``amber``'s old name), one base
plan is built, then each correction is fitted on
the calibration windows of the main text and evaluated on its evaluation windows and on the
evaluation windows of a second text (never calibrated on), to see whether the gain transfers.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from amber_jax.calibrate.correction_fit import (
  CORRECTIONS,
  CorrectionSpec,
  calibrate_corrections,
  check_correction_inputs,
)
from amber_jax.calibrate.methods import Method, resolve_method
from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.core.patterns import NMPattern
from amber_jax.eval.perplexity import perplexity
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

DEFAULT_METHODS = ("amber", "naive")
BEST = "median+scale+bias"
# "correction" (fitted on the dense model's inputs) or "correction@inputs".
DEFAULT_CORRECTIONS = (
  *CORRECTIONS,
  BEST,
  "median+scale_channel+bias",
  f"{BEST}@sequential",
  f"{BEST}@global",
)


def base_method(name: str) -> Method:
  """The registry method ``name`` stands for, if it can be a base plan here (ValueError naming
  ``methods`` else: dense, or a method with its own correction or learned factors)."""
  m = resolve_method(name)
  if m.is_dense or m.correction != "none" or m.learned_steps:
    raise ValueError(
      f"methods must be base plans (sparse, without a correction or learned factors of their "
      f"own: naive, naive_rules, amber, search, search_mixed), got {name!r} ({m.name})"
    )
  return m


def parse_run(run: str) -> tuple[CorrectionSpec, str]:
  """Parses "median+bias@sequential" into (spec, inputs); inputs default to "dense"."""
  name, _, inputs = run.partition("@")
  return CorrectionSpec.parse(name), check_correction_inputs(inputs or "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorrectionsConfig(EvalRunOptions):
  """The corrections ablation's settings: base methods x corrections per pattern."""

  patterns: tuple[str, ...] = ("8:16", "2:4")
  methods: tuple[str, ...] = DEFAULT_METHODS  # amber_jax.calibrate.methods names ("paper": amber)
  corrections: tuple[str, ...] = DEFAULT_CORRECTIONS  # "name" or "name@inputs"
  coverage: float = 0.55
  transfer_text: str = "enwiki"  # evaluation only ("" to skip)

  def __post_init__(self):
    for name in ("patterns", "methods", "corrections"):
      values = getattr(self, name)
      if not values:
        raise ValueError(f"{name} must name at least one entry (the table would have no rows)")
      if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")
    for p in self.patterns:
      NMPattern.parse(p)
    names = [base_method(m).name for m in self.methods]
    if len(set(names)) != len(names):
      raise ValueError(f"methods name one method twice: {list(self.methods)} -> {names}")
    for run in self.corrections:
      parse_run(run)
    AmberConfig(pattern=None, coverage=self.coverage)
    for name in ("seq_len", "num_windows", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.calib_windows < 1:  # the corrections (and the paper's auto policy) calibrate
      raise ValueError(f"calib_windows must be >= 1, got {self.calib_windows}")
    check_model_options(self.dtype, self.cache_dir)
    check_text_source(self.text, arg="text")
    if self.transfer_text:
      check_text_source(self.transfer_text, arg="text_file")

  def base_plan(self, pattern: str, method: str) -> AmberConfig:
    """The uncorrected plan of ``method`` (a registry name) at ``pattern``."""
    return base_method(method).amber_config(NMPattern.parse(pattern), coverage=self.coverage)


def run_corrections(cfg: CorrectionsConfig, *, log=print, show_progress=True) -> dict:
  """Dense perplexities, then every (pattern, method, correction, inputs) on both texts."""
  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    # M divides every sparsified width, the coverage target is reachable: before loading.
    validate=lambda c: [
      cfg.base_plan(p, m).validate_for(c) for p in cfg.patterns for m in cfg.methods
    ],
    show_progress=show_progress,
    log=log,
  )
  texts = evaluation_texts(setup, cfg, log)
  dtype = DTYPES[cfg.dtype]
  common = dict(
    config=setup.config, batch_size=cfg.batch_size, dtype=dtype, show_progress=show_progress
  )

  def evaluate(plan, desc):
    return {
      name: perplexity(setup.params, w, plan=plan, desc=f"{desc} [{name}]", **common).perplexity
      for name, w in texts.items()
    }

  dense = evaluate(None, "dense")
  log(f"dense: {dense}")
  rows = []
  for pattern in cfg.patterns:
    for name in cfg.methods:
      method = base_method(name).name  # rows carry the canonical name
      amber = cfg.base_plan(pattern, method)
      info = build_plan(
        setup.params,
        setup.config,
        amber,
        calib_windows=setup.calib_windows,
        batch_size=cfg.batch_size,
        dtype=dtype,
        show_progress=show_progress,
      )
      # [n_layers, n_sites] in config.sites order, like the correction errors.
      names = setup.config.sites.names
      sparse = np.stack([np.asarray(info.plan.enabled[p]) for p in names], axis=1)
      for run in cfg.corrections:
        spec, inputs = parse_run(run)
        plan, result = info.plan, None
        if not spec.is_none:
          result = calibrate_corrections(
            setup.params,
            info.plan,
            setup.calib_windows,
            config=setup.config,
            correction=spec,
            inputs=inputs,
            dtype=dtype,
            show_progress=show_progress,
          )
          plan = info.plan.replace(correction=result.correction)
        start = time.perf_counter()
        ppl = evaluate(plan, f"{pattern} {method} {spec} ({inputs})")
        row = {
          "pattern": pattern,
          "method": method,
          "correction": str(spec),
          "inputs": inputs,
          "perplexity": ppl,
          "coverage": info.coverage.covered,
          "skip_layers": list(info.skip_layers),
          "calib_seconds": 0.0 if result is None else result.seconds,
          "eval_seconds": time.perf_counter() - start,
          "site_error_before": None
          if result is None
          else float(result.errors_before[sparse].mean()),
          "site_error_after": None if result is None else float(result.errors_after[sparse].mean()),
        }
        rows.append(row)
        log(
          f"{pattern:>5} {method:>5} {str(spec):>28} {inputs:>10}: "
          + " ".join(f"{k} {v:8.3f}" for k, v in ppl.items())
          + f"  calib {row['calib_seconds']:.1f}s"
        )
  return {
    "dense": dense,
    "rows": rows,
    "config": recorded_config(cfg),
    **environment(),
  }


def _closed(none: float, corrected: float, dense: float) -> float:
  """Share of the (log-)perplexity gap to dense that a correction closes."""
  gap = math.log(none) - math.log(dense)
  return (math.log(none) - math.log(corrected)) / gap if gap > 0 else float("nan")


def corrections_markdown(result: dict, command: str) -> str:
  """RESULTS.md section: one row per (pattern, method, correction, inputs)."""
  cfg = result["config"]
  texts = list(result["dense"])
  main = texts[0]
  none = {
    (r["pattern"], r["method"]): r["perplexity"]
    for r in result["rows"]
    if r["correction"] == "none"
  }
  header = ["pattern", "method", "correction", "inputs"]
  for t in texts:
    header += [f"ppl {t}", f"gap closed {t}"]
  if len(texts) > 1:
    header.append(f"kept on {texts[1]}")
  header += ["site error (plain -> corrected)", "calibration s"]
  rows = []
  for r in result["rows"]:
    base = none.get((r["pattern"], r["method"]))
    cells = [r["pattern"], r["method"], r["correction"], r["inputs"]]
    closed = {}
    for t in texts:
      closed[t] = _closed(base[t], r["perplexity"][t], result["dense"][t]) if base else math.nan
      cells += [
        f"{r['perplexity'][t]:.2f}",
        "" if r["correction"] == "none" else f"{closed[t]:+.0%}",
      ]
    if len(texts) > 1:
      keep = closed[texts[1]] / closed[main] if closed[main] > 0 else math.nan
      cells.append("" if r["correction"] == "none" or math.isnan(keep) else f"{keep:.2f}")
    if r["site_error_before"] is None:
      cells.append("")
    else:
      cells.append(f"{r['site_error_before']:.3f} -> {r['site_error_after']:.3f}")
    cells.append(f"{r['calib_seconds']:.1f}" if r["correction"] != "none" else "")
    rows.append(cells)
  env = result["device"]
  dense = ", ".join(f"{t} **{v:.2f}**" for t, v in result["dense"].items())
  summary = [f"- {line}" for line in _summary(result, texts, none)]
  return "\n".join(
    [
      f"## Output corrections of the sparse sites ({cfg['model']})",
      "",
      f"Perplexity on the first {cfg['num_windows']} windows of {cfg['seq_len']} predicted "
      f"tokens of each text; dense {dense}. Corrections (`amber_jax.calibrate.correction_fit`) "
      "are fitted on "
      f"the next {cfg['calib_windows']} windows of `{cfg['text']}` only; `{texts[-1]}` is never "
      "seen in calibration. amber (paper in files written before amber_jax.calibrate.methods) "
      "= robust "
      "score, auto policy at coverage >= "
      f'{cfg["coverage"]}; naive = |x| score on every site. "gap closed" = share of the '
      "log-perplexity gap between the uncorrected plan and dense that the correction removes; "
      '"kept" = gap closed on the second text / gap closed on the first. Site error = mean '
      "over sparse sites of ||Y - Y'|| / ||Y|| on the calibration tokens. Inputs: dense = fitted "
      "on the dense model's activations; sequential = on the sparse, corrected model's (target: "
      "the site's dense output of that input); global = on the sparse model's, to the dense "
      "model's output of the site (its site errors are against that target). The combinations "
      "were picked in development runs on the main text's evaluation windows, so their numbers "
      "there are optimistic; the second text is the held-out check.",
      "",
      *summary,
      "",
      f"Command: `{command}` (backend {env['backend']}, jax {result['versions']['jax']}).",
      "",
      markdown_table(header, rows),
    ]
  )


def _summary(result: dict, texts: list[str], none: dict) -> list[str]:
  """Per base plan: the best correction on the main text, and the best of those that keep at
  least 2/3 of their gain (share of the gap to dense closed) on every other text."""
  lines = []
  main = texts[0]
  dense = result["dense"]
  for key, base in none.items():
    rows = [
      r for r in result["rows"] if (r["pattern"], r["method"]) == key and r["correction"] != "none"
    ]
    if not rows:
      continue
    desc = lambda r: (
      f"{r['correction']} ({r['inputs']}): "
      + ", ".join(f"{t} {r['perplexity'][t]:.2f}" for t in texts)
    )
    line = f"{key[0]} {key[1]} (none: {', '.join(f'{t} {base[t]:.2f}' for t in texts)}): "
    line += f"best on {main} {desc(min(rows, key=lambda r: r['perplexity'][main]))}"
    if len(texts) > 1:
      closed = lambda r, t, b=base: _closed(b[t], r["perplexity"][t], dense[t])
      kept = [
        r
        for r in rows
        if closed(r, main) > 0 and all(closed(r, t) >= 2 / 3 * closed(r, main) for t in texts[1:])
      ]
      if kept:
        line += f"; best that keeps >= 2/3 of its gain on {', '.join(texts[1:])} "
        line += desc(min(kept, key=lambda r: r["perplexity"][main]))
      else:
        line += f"; none keeps >= 2/3 of its gain on {', '.join(texts[1:])}"
    lines.append(line)
  return lines
