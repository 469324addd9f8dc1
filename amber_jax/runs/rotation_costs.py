"""What each rotation does to each projection's N:M cost: the KL to the dense model with one
projection sparse in every layer, on the plain model and on each rotated one.

For every (pattern, rotation) the rotated model is built from the calibration windows
(``amber_jax.rotate.rotate_model``, the same windows the front calibrates on), its dense logits
are compared with the plain model's, and for each projection a plan with robust scores makes
that projection sparse in all layers (o also with head-mixed groups, "o mixed"); the KL per
token is measured on the first ``search_windows`` calibration windows. A screen that needs no
site search: one pass per projection (about 45 s per rotation for SmolLM2-135M on 2 CPU cores),
where the front measures every single site (about 5 minutes per rotation).
"""

from __future__ import annotations

import dataclasses

from amber_jax.calibrate.site_search import KLMeter
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.io.atomic import check_output_file
from amber_jax.plan.channel_order import model_channel_order
from amber_jax.plan.schema import make_plan
from amber_jax.rotate import Rotation, rotate_model
from amber_jax.rotate.recipe import check_rotation_for
from amber_jax.runs.common import (
  DTYPES,
  EvalRunOptions,
  check_model_options,
  environment,
  prepare_eval,
  recorded_config,
)
from amber_jax.runs.markdown import markdown_table
from amber_jax.util.progress import progress_bar

DEFAULT_ROTATIONS = (
  "none",
  "res_fold",
  "res_pca",
  "res_balance",
  "res_hadamard",
  "res_random",
  "head_pca",
  "head_hadamard",
  "head_random",
  "down_balance",
  "down_hadamard",
  "res_pca+head_pca+down_balance",
)
MIXED = "o mixed"  # the o projection with head-mixed groups (o_order="mixed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationCostsConfig(EvalRunOptions):
  """Patterns x rotations; KL on the first ``search_windows`` calibration windows."""

  patterns: tuple[str, ...] = ("8:16", "2:4")
  rotations: tuple[str, ...] = DEFAULT_ROTATIONS
  search_windows: int = 2
  output: str = ""

  def __post_init__(self):
    if not self.patterns or not self.rotations:
      raise ValueError("patterns and rotations must each name at least one entry")
    for p in self.patterns:
      NMPattern.parse(p)
    names = [Rotation.parse(r).name for r in self.rotations]
    if len(set(names)) != len(names):
      raise ValueError(f"rotations name one rotation twice: {list(self.rotations)}")
    if any(Rotation.parse(r).learn_steps for r in self.rotations):
      raise ValueError("learned rotations (learn<N>) need a plan: run them in the front")
    if not 1 <= self.search_windows <= self.calib_windows:
      raise ValueError(
        f"search_windows must be in 1..{self.calib_windows} (calib_windows), "
        f"got {self.search_windows}"
      )
    check_model_options(self.dtype, self.cache_dir)
    if self.output:
      check_output_file(self.output, arg="output")


def run_rotation_costs(cfg: RotationCostsConfig, *, log=print, show_progress=True) -> dict:
  """One row per (pattern, rotation): the KL of each projection sparse in every layer."""
  rotations = [Rotation.parse(r) for r in cfg.rotations]

  def validate(c):
    for p in cfg.patterns:
      for r in rotations:
        check_rotation_for(c, r, NMPattern.parse(p).m)

  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    validate=validate,
    show_progress=show_progress,
    log=log,
  )
  dtype = DTYPES[cfg.dtype]
  search = setup.calib_windows[: cfg.search_windows]
  rows = []
  with progress_bar(
    total=len(cfg.patterns) * len(rotations), desc="rotations", disable=not show_progress
  ) as bar:
    for pattern in cfg.patterns:
      for rotation in rotations:
        rm = rotate_model(
          setup.params,
          setup.config,
          rotation,
          m=NMPattern.parse(pattern).m,
          calib_windows=setup.calib_windows[:, :-1],
          check_tokens=search[:1, :-1],
          batch_size=cfg.batch_size,
          dtype=dtype,
          show_progress=False,
        )
        meter = KLMeter(rm.params, search, config=rm.config, batch_size=cfg.batch_size, dtype=dtype)
        factors = model_factors(rm.params, "robust")
        kl = {}
        for site in rm.config.sites:
          for o_order in ("heads", "mixed") if site.heads else ("heads",):
            plan = make_plan(
              rm.config,
              pattern,
              sites=[(l, site.name) for l in range(rm.config.n_layers)],
              factors=factors,
              channel_order=model_channel_order(rm.config, o_order),
            )
            kl[MIXED if o_order == "mixed" else site.name] = meter(plan)
        rows.append(
          {
            "pattern": pattern,
            "rotation": rotation.name,
            "kl": kl,
            "rotation_seconds": rm.seconds,
            "dense_logit_gap": rm.dense_logit_gap,
            "dense_logit_gap_f64": rm.dense_logit_gap_f64,
            "inference_cost": rotation.inference_cost,
          }
        )
        log(
          f"{pattern} {rotation.name:>34}: "
          + " ".join(f"{k} {1e3 * v:.1f}" for k, v in kl.items())
          + f" (x1e-3; dense logits move {rm.dense_logit_gap:.1e} f32, "
          f"{rm.dense_logit_gap_f64:.1e} f64)"
        )
        bar.update(1)
  return {"rows": rows, "config": recorded_config(cfg), **environment()}


def rotation_costs_markdown(result: dict, command: str) -> str:
  """RESULTS.md section: per pattern, the KL of each projection sparse in all layers under each
  rotation (x 1e3, and the ratio to the plain model's), and the dense check."""
  cfg = result["config"]
  rows = result["rows"]
  out = [
    f"## Rotations: what each does to each projection's N:M cost ({cfg['model']})",
    "",
    f"Command: `{command}`. KL to dense (nats/token x 1e3) with one projection sparse in all"
    f" layers (robust scores), on {cfg['search_windows']} calibration windows of"
    f" {cfg['seq_len']} tokens of {cfg['text']}; in brackets the ratio to the unrotated model's"
    f" cost. '{MIXED}': o with head-mixed groups. Rotations are calibrated on the"
    f" {cfg['calib_windows']} calibration windows. Last columns: the dense model's largest"
    " |logit| change on one window with float32 and with float64 passes (the rotation's own"
    " error), and the inference cost.",
    "",
  ]
  for pattern in dict.fromkeys(r["pattern"] for r in rows):
    mine = [r for r in rows if r["pattern"] == pattern]
    names = list(mine[0]["kl"])
    plain = next((r["kl"] for r in mine if r["rotation"] == "none"), None)
    table = []
    for r in mine:
      cells = []
      for n in names:
        v = r["kl"][n]
        ratio = "" if plain is None or r["rotation"] == "none" else f" ({v / plain[n]:.2f}x)"
        cells.append(f"{1e3 * v:.1f}{ratio}")
      table.append(
        [
          r["rotation"],
          *cells,
          f"{r['dense_logit_gap']:.1e}",
          f"{r['dense_logit_gap_f64']:.1e}",
          r["inference_cost"],
        ]
      )
    out += [
      f"**{pattern}**",
      "",
      markdown_table(["rotation", *names, "dlogit f32", "dlogit f64", "inference"], table),
      "",
    ]
  return "\n".join(out).rstrip()
