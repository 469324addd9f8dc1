"""What each rotation does to each projection's N:M cost: the KL to the dense model with one
projection sparse in every layer, on the plain model and on each rotated one.

For every (pattern, rotation) the rotated model is built from the calibration windows
(``amber_jax.rotate.rotate_model``, the same windows the front calibrates on), its dense logits
are compared with the plain model's, and for each projection a plan with robust scores makes
that projection sparse in all layers (o also with head-mixed groups, "o mixed"); the KL per
token is measured on the first ``search_windows`` calibration windows, and on as many windows
of the transfer text (never calibrated on: does the rotation's gain carry over?). A screen
that needs no site search: one pass per projection (about a minute per rotation and pattern
for SmolLM2-135M on 2 CPU cores), where the front measures every single site (5-6 minutes).
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
  transfer_text: str = "enwiki"  # KL measured here too ("" to skip); never calibrated on
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
    if self.transfer_text:
      check_text_source(self.transfer_text, arg="transfer_text")
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
  search = {cfg.text: setup.calib_windows[: cfg.search_windows]}
  if cfg.transfer_text:
    transfer = evaluation_texts(setup, cfg, log)[cfg.transfer_text]
    search[cfg.transfer_text] = transfer[: cfg.search_windows]
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
          check_tokens=search[cfg.text][:1, :-1],
          batch_size=cfg.batch_size,
          dtype=dtype,
          show_progress=False,
        )
        meters = {
          t: KLMeter(rm.params, w, config=rm.config, batch_size=cfg.batch_size, dtype=dtype)
          for t, w in search.items()
        }
        factors = model_factors(rm.params, "robust")
        kl = {t: {} for t in search}
        for site in rm.config.sites:
          for o_order in ("heads", "mixed") if site.heads else ("heads",):
            plan = make_plan(
              rm.config,
              pattern,
              sites=[(l, site.name) for l in range(rm.config.n_layers)],
              factors=factors,
              channel_order=model_channel_order(rm.config, o_order),
            )
            for t, meter in meters.items():
              kl[t][MIXED if o_order == "mixed" else site.name] = meter(plan)
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
          + " ".join(f"{k} {1e3 * v:.1f}" for k, v in kl[cfg.text].items())
          + f" (x1e-3; dense logits move {rm.dense_logit_gap:.1e} f32, "
          f"{rm.dense_logit_gap_f64:.1e} f64)"
        )
        bar.update(1)
  return {"rows": rows, "config": recorded_config(cfg), **environment()}


def rotation_costs_markdown(result: dict, command: str) -> str:
  """RESULTS.md section: per pattern, the KL of each projection sparse in all layers under each
  rotation (x 1e3 for the unrotated model, else the ratio to its cost) on the calibration text,
  the same ratios on the transfer text, and the dense check."""
  cfg = result["config"]
  rows = result["rows"]
  texts = list(rows[0]["kl"]) if rows else []
  out = [
    f"## Rotations: what each does to each projection's N:M cost ({cfg['model']})",
    "",
    f"Command: `{command}`. KL to dense with one projection sparse in all layers (robust"
    f" scores), on {cfg['search_windows']} windows of {cfg['seq_len']} tokens: calibration windows"
    f" of {cfg['text']} (the rotations are calibrated on its {cfg['calib_windows']} calibration"
    " windows)"
    + (f" and evaluation windows of {texts[1]}, never calibrated on" if len(texts) > 1 else "")
    + f". The unrotated row is in nats/token x 1e3, the others are ratios to it. '{MIXED}': o"
    " with head-mixed groups. Last columns: the dense model's largest |logit| change on one"
    " window with float32 and with float64 passes (the rotation's own error), and the inference"
    " cost.",
    "",
  ]
  for pattern in dict.fromkeys(r["pattern"] for r in rows):
    mine = [r for r in rows if r["pattern"] == pattern]
    plain = next((r["kl"] for r in mine if r["rotation"] == "none"), None)
    for text in texts:
      names = list(mine[0]["kl"][text])
      table = []
      for r in mine:
        cells = []
        for n in names:
          v = r["kl"][text][n]
          plain_row = plain is None or r["rotation"] == "none"
          cells.append(f"{1e3 * v:.1f}" if plain_row else f"{v / plain[text][n]:.2f}x")
        extra = [f"{r['dense_logit_gap']:.1e}", f"{r['dense_logit_gap_f64']:.1e}"]
        table.append([r["rotation"], *cells, *extra, r["inference_cost"]])
      out += [
        f"**{pattern}, {text}**",
        "",
        markdown_table(["rotation", *names, "dlogit f32", "dlogit f64", "inference"], table),
        "",
      ]
  return "\n".join(out).rstrip()
