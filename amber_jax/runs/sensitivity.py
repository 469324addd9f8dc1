"""Per-site sensitivity of the real model: table, heatmap and the auto policy's choice."""

from __future__ import annotations

import dataclasses
import time

from amber_jax.calibrate.policy import (
  check_coverage_target,
  measure_sensitivity,
  select_skip_layers,
)
from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import check_score, model_factors
from amber_jax.data.texts import DEFAULT_TEXT
from amber_jax.io.sources import DEFAULT_MODEL
from amber_jax.runs.common import (
  DTYPES,
  check_model_options,
  environment,
  prepare_eval,
  recorded_config,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SensitivityRunConfig:
  model: str = DEFAULT_MODEL
  pattern: str = "8:16"
  score: str = "robust"
  coverage: float = 0.55
  seq_len: int = 512
  eval_windows: int = 8  # skipped: calibration starts after them
  calib_windows: int = 8
  batch_size: int = 4
  dtype: str = "float32"
  text: str = DEFAULT_TEXT
  cache_dir: str = ""

  def __post_init__(self):
    NMPattern.parse(self.pattern)
    check_score(self.score)
    check_coverage_target(self.coverage)
    check_model_options(self.dtype, self.cache_dir)
    if self.calib_windows < 1:
      raise ValueError(f"calib_windows must be >= 1, got {self.calib_windows}")


def run_sensitivity(cfg: SensitivityRunConfig, *, log=print, show_progress=True) -> dict:
  """Measures every site's relative output error on the calibration windows."""
  pattern = NMPattern.parse(cfg.pattern)
  # The auto policy's choice at cfg.coverage: its target must be reachable under the paper's
  # rules, and M must divide every projection's input width (each site is measured).
  auto = AmberConfig(pattern=pattern, score=cfg.score, policy="auto", coverage=cfg.coverage)

  def validate(config):
    auto.validate_for(config)
    for site in config.sites:
      pattern.check_width(site.d_in, where=f"{site.name}-projection input")

  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.eval_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    validate=validate,
    show_progress=show_progress,
    log=log,
  )
  start = time.perf_counter()
  factors = model_factors(setup.params, cfg.score)
  sens = measure_sensitivity(
    setup.params,
    setup.calib_windows,
    config=setup.config,
    pattern=pattern,
    factors=factors,
    score=cfg.score,
    batch_size=cfg.batch_size,
    dtype=DTYPES[cfg.dtype],
    show_progress=show_progress,
  )
  skip = select_skip_layers(sens, setup.config, cfg.coverage)
  return {
    "errors": sens.errors.tolist(),
    "projections": list(sens.site_names),
    "skip_layers": list(skip),
    "seconds": time.perf_counter() - start,
    "tokens": sens.tokens,
    "table": sens.table(),
    "config": recorded_config(cfg),
    **environment(),
  }
