"""The score x policy x pattern perplexity table of Amber Pruner on one model and text."""

from __future__ import annotations

import dataclasses
import time

from amber_jax.calibrate.pruner import AmberConfig, build_plan
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import SCORES
from amber_jax.eval.perplexity import perplexity
from amber_jax.runs.common import (
  DTYPES,
  EvalRunOptions,
  check_model_options,
  environment,
  prepare_eval,
  recorded_config,
)
from amber_jax.runs.markdown import markdown_table


@dataclasses.dataclass(frozen=True, kw_only=True)
class AmberTableConfig(EvalRunOptions):
  """The Amber table's settings: patterns x scores x policies at one coverage target."""

  patterns: tuple[str, ...] = ("2:4", "4:8", "8:16")
  scores: tuple[str, ...] = SCORES
  # "search" measures 210 single-site KLs per pattern and score (minutes): opt in by name.
  policies: tuple[str, ...] = ("all", "paper", "auto")
  coverage: float = 0.55

  def __post_init__(self):
    for name in ("patterns", "scores", "policies"):
      values = getattr(self, name)
      if not values:
        raise ValueError(f"{name} must name at least one entry (the table would have no rows)")
      if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")
    for p in self.patterns:
      NMPattern.parse(p)
    for s in self.scores:
      AmberConfig(pattern=None, score=s)
    for p in self.policies:
      AmberConfig(pattern=None, policy=p)
    AmberConfig(pattern=None, coverage=self.coverage)
    for name in ("seq_len", "num_windows", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.calib_windows < (1 if {"auto", "search"} & set(self.policies) else 0):
      raise ValueError(
        f"policies auto and search need calib_windows >= 1, got {self.calib_windows}"
      )
    check_model_options(self.dtype, self.cache_dir)

  def ambers(self) -> list[AmberConfig]:
    """The AmberConfig of every (pattern, score, policy) row, in table order."""
    return [
      AmberConfig(
        pattern=NMPattern.parse(pattern), score=score, policy=policy, coverage=self.coverage
      )
      for pattern in self.patterns
      for score in self.scores
      for policy in self.policies
    ]


def run_amber_table(cfg: AmberTableConfig, *, log=print, show_progress=True) -> dict:
  """Dense perplexity, then every (pattern, score, policy) on the same windows."""
  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    # M divides every sparsified width, auto's coverage target is reachable: before loading.
    validate=lambda c: [amber.validate_for(c) for amber in cfg.ambers()],
    show_progress=show_progress,
    log=log,
  )
  dtype = DTYPES[cfg.dtype]
  common = dict(
    config=setup.config, batch_size=cfg.batch_size, dtype=dtype, show_progress=show_progress
  )
  dense = perplexity(setup.params, setup.eval_windows, desc="dense", **common)
  rows = []
  for pattern in cfg.patterns:
    for score in cfg.scores:
      for policy in cfg.policies:
        amber = AmberConfig(
          pattern=NMPattern.parse(pattern), score=score, policy=policy, coverage=cfg.coverage
        )
        start = time.perf_counter()
        info = build_plan(
          setup.params,
          setup.config,
          amber,
          calib_windows=setup.calib_windows,
          batch_size=cfg.batch_size,
          dtype=dtype,
          show_progress=show_progress,
        )
        r = perplexity(
          setup.params,
          setup.eval_windows,
          plan=info.plan,
          desc=f"{pattern} {score} {policy}",
          **common,
        )
        rows.append(
          {
            "pattern": pattern,
            "score": score,
            "policy": policy,
            "perplexity": r.perplexity,
            "coverage": info.coverage.covered,
            "removed": info.coverage.removed,
            "skip_layers": list(info.skip_layers),
            "plan_seconds": info.seconds,
            "seconds": time.perf_counter() - start,
          }
        )
        log(
          f"{pattern:>5} {score:>7} {policy:>6}: ppl {r.perplexity:8.3f} "
          f"coverage {info.coverage.covered:.3f} skip {list(info.skip_layers)}"
        )
  return {
    "dense": {"perplexity": dense.perplexity, "tokens": dense.tokens},
    "rows": rows,
    "config": recorded_config(cfg),
    **environment(),
  }


def amber_table_markdown(result: dict, command: str) -> str:
  """RESULTS.md section: one row per (policy, score), one column per pattern."""
  cfg = result["config"]
  patterns = list(cfg["patterns"])
  header = ["policy", "score", *[f"ppl {p}" for p in patterns], "coverage", "q/gate dense in"]
  by_key = {(r["policy"], r["score"], r["pattern"]): r for r in result["rows"]}
  table_rows = []
  for policy in cfg["policies"]:
    for score in cfg["scores"]:
      cells = [by_key.get((policy, score, p)) for p in patterns]
      present = [c for c in cells if c is not None]
      if not present:
        continue
      skips = sorted({tuple(c["skip_layers"]) for c in present})
      table_rows.append(
        [
          policy,
          score,
          *[f"{c['perplexity']:.2f}" if c else "" for c in cells],
          f"{100 * present[0]['coverage']:.1f}%",
          "; ".join(
            f"{p}: {list(c['skip_layers'])}" for p, c in zip(patterns, cells, strict=True) if c
          )
          if policy == "auto"
          else (str(list(skips[0])) if skips[0] else "-"),
        ]
      )
  env = result["device"]
  return "\n".join(
    [
      f"## Amber Pruner: score x policy x pattern ({cfg['model']})",
      "",
      f"Perplexity on the first {cfg['num_windows']} windows of {cfg['seq_len']} predicted "
      f"tokens of `{cfg['text']}`; dense **{result['dense']['perplexity']:.2f}**. The auto "
      f"policy calibrates on the next {cfg['calib_windows']} windows (never the evaluation "
      f"ones) with coverage >= {cfg['coverage']}. Coverage = share of linear multiply-adds "
      "(q, k, v, o, gate, up, down) whose input is sparsified.",
      "",
      f"Command: `{command}` (backend {env['backend']}, jax {result['versions']['jax']}).",
      "",
      markdown_table(header, table_rows),
    ]
  )
