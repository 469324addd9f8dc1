"""How much of an N:M site's output error any mask or cheap compensation could remove
(``experiments/error_floor.py``): per site, on held-out calibration tokens of the default text
(dense model inputs), the robust mask's relative output error energy, and as shares of it the
error of a random channel grouping, of a Gram-greedy mask and after rank-r compensation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.harness import record_only, site_records
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.core.sparsity import sparsify
from amber_jax.data.texts import DEFAULT_TEXT
from amber_jax.io.sources import DEFAULT_MODEL
from amber_jax.plan.channel_order import mixed_order
from amber_jax.runs.common import check_cache_dir, prepare_eval
from amber_jax.runs.markdown import markdown_table

SEQ_LEN = 512  # tokens per calibration window
DEFAULT_SITES = (
  "q:15", "o:3", "o:15", "o:25", "gate:3", "gate:15", "gate:25", "down:15", "down:25"
)  # fmt: skip


def parse_site(spec: str) -> tuple[str, int]:
  """'projection:layer' -> (projection, layer); ValueError naming --sites otherwise."""
  proj, _, layer = spec.strip().partition(":")
  if not proj or not layer.isdigit():
    raise ValueError(f"--sites entries must be projection:layer, got {spec!r}")
  return proj, int(layer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorFloorConfig:
  model: str = DEFAULT_MODEL
  pattern: str = "8:16"
  sites: tuple[tuple[str, int], ...] = tuple(parse_site(s) for s in DEFAULT_SITES)
  ranks: tuple[int, ...] = (16, 32, 64, 128)
  tokens: int = 512  # per window: compensation fitted on one, all measured on another
  gram_tokens: int = 64  # of those, for the (slow) Gram-greedy mask
  cache_dir: str = ""


def check_for_model(config, pattern: NMPattern, sites, ranks) -> None:
  """Before the weights load: the sites' layers exist, M divides their widths, and each rank
  is below the site's smaller dimension."""
  shapes = config.linear_shapes()
  for proj, layer in sites:
    config.sites.check_name(proj, where=f"--sites entry {proj}:{layer}: projection")
    if not 0 <= layer < config.n_layers:
      raise ValueError(
        f"--sites entry {proj}:{layer}: layer must be in 0..{config.n_layers - 1} "
        f"(the model has {config.n_layers} layers)"
      )
    d_in, d_out = shapes[proj]
    pattern.check_width(d_in, where=f"{proj}-projection input")
    too_big = [r for r in ranks if r > min(d_in, d_out)]
    if too_big:
      raise ValueError(
        f"--ranks {too_big} exceed the {proj} site's rank limit {min(d_in, d_out)} "
        f"(min of its {d_in} x {d_out} weight)"
      )


def gram_greedy_mask(x_TxD: np.ndarray, w_DxO: np.ndarray, pattern: NMPattern) -> np.ndarray:
  """Per token and group, drops M - N channels one at a time, each time the one that adds the
  least to the group's output error energy x_D^T (W W^T)_DD x_D. Returns the 0/1 keep mask."""
  gram = w_DxO @ w_DxO.T
  keep = np.ones_like(x_TxD)
  drop_count = pattern.m - pattern.n
  for t, x in enumerate(x_TxD):
    for start in range(0, x.shape[0], pattern.m):
      idx = np.arange(start, start + pattern.m)
      g = gram[np.ix_(idx, idx)] * np.outer(x[idx], x[idx])
      dropped: list[int] = []
      for _ in range(drop_count):
        rest = [j for j in range(pattern.m) if j not in dropped]
        cost = [g[np.ix_(dropped + [j], dropped + [j])].sum() for j in rest]
        dropped.append(rest[int(np.argmin(cost))])
      keep[t, idx[dropped]] = 0
  return keep


def run_error_floor(cfg: ErrorFloorConfig) -> list[list[str]]:
  """The table's rows, one per site: site, robust, mixed, gram and one column per rank."""
  pattern = NMPattern.parse(cfg.pattern)
  sites, ranks = list(cfg.sites), list(cfg.ranks)
  check_cache_dir(cfg.cache_dir)
  setup = prepare_eval(
    model=cfg.model,
    text=DEFAULT_TEXT,
    cache_dir=cfg.cache_dir,
    seq_len=SEQ_LEN,
    num_windows=8,
    calib_windows=2,
    dtype="float32",
    validate=lambda config: check_for_model(config, pattern, sites, ranks),
  )
  config, params = setup.config, setup.params
  factors = {p: jnp.asarray(v) for p, v in model_factors(params, "robust").items()}
  record = jax.jit(
    lambda p, t: site_records(p, t, config=config, hook=record_only(lambda x, w, row: x))
  )
  fit_inputs, test_inputs = (
    record(params, jnp.asarray(setup.calib_windows[i : i + 1, : cfg.tokens])) for i in (0, 1)
  )

  def site_inputs(inputs, proj, layer):
    return np.asarray(inputs[proj][layer], np.float64).reshape(-1, inputs[proj].shape[-1])

  def dropped_part(x, proj, layer, order=None):
    kept = sparsify(jnp.asarray(x, jnp.float32), pattern, factors[proj][layer], channel_order=order)
    return x - np.asarray(kept)

  rows = []
  for proj, layer in sites:
    w = np.asarray(params["layers"][proj]["w"][layer], np.float64)
    x = site_inputs(test_inputs, proj, layer)
    x_d = dropped_part(x, proj, layer)
    robust_err = np.sum((x_d @ w) ** 2)
    robust = robust_err / np.sum((x @ w) ** 2)
    order = jnp.asarray(mixed_order(config.n_layers, x.shape[1])[layer])
    mixed_ratio = np.sum((dropped_part(x, proj, layer, order) @ w) ** 2) / robust_err
    sub = x[: cfg.gram_tokens]
    gram_dropped = sub * (1 - gram_greedy_mask(sub, w, pattern))
    gram_ratio = np.sum((gram_dropped @ w) ** 2) / np.sum((dropped_part(sub, proj, layer) @ w) ** 2)
    # Data-aware low rank: whiten by the fit window's dropped-part covariance C = L L^T, keep the
    # top-r left singular vectors P_r of L^T W, compensate with W_r = L^-T P_r P_r^T L^T W.
    fit_d = dropped_part(site_inputs(fit_inputs, proj, layer), proj, layer)
    cov = fit_d.T @ fit_d / len(fit_d)
    evals, evecs = np.linalg.eigh(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    root = evecs * np.sqrt(evals)  # L
    inv_root_t = evecs / np.sqrt(evals)  # L^-T
    p_mat = np.linalg.svd(root.T @ w, full_matrices=False)[0]
    left = []
    for r in ranks:
      w_r = inv_root_t @ (p_mat[:, :r] @ (p_mat[:, :r].T @ (root.T @ w)))
      left.append(np.sum((x_d @ (w - w_r)) ** 2) / robust_err)
    extra = [r * sum(w.shape) / w.size for r in ranks]
    rows.append(
      [
        f"{proj}:{layer}",
        f"{robust:.4f}",
        f"{mixed_ratio:.3f}",
        f"{gram_ratio:.3f}",
        *[f"{lf:.2f} (+{e:.0%})" for lf, e in zip(left, extra, strict=True)],
      ]
    )
  return rows


def error_floor_markdown(cfg: ErrorFloorConfig, rows: list[list[str]]) -> str:
  """A caption line, then the markdown table of ``run_error_floor``'s rows."""
  caption = (
    f"{NMPattern.parse(cfg.pattern)}, {cfg.tokens} held-out tokens: robust = relative output "
    "error energy of the robust mask; mixed = error with the groups over a random channel order "
    f"/ robust error; gram = Gram-greedy error / robust error (first {cfg.gram_tokens} tokens); "
    "rank r = error left after rank-r compensation fitted on another window / robust error "
    "(+ extra multiply-adds of the site)."
  )
  header = ["site", "robust", "mixed", "gram", *[f"rank {r}" for r in cfg.ranks]]
  return caption + "\n" + markdown_table(header, rows)
