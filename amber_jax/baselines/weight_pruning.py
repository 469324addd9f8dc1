"""Weight N:M and unstructured pruning baselines: Wanda and SparseGPT, on any set of sites.

* **Wanda** (Sun et al., arXiv 2306.11695): the score of weight ``W[j, o]`` is
  ``|W[j, o]| * ||X_j||_2``, the input channel's norm over the calibration tokens; N:M keeps the
  N best of every M consecutive inputs per output channel, unstructured pruning the best
  ``1 - s`` of each output channel. No weight update.
* **SparseGPT** (Frantar & Alistarh, arXiv 2301.00774): per site the Hessian ``X^T X`` of its
  calibration inputs (float32), dampened by ``damp`` times its mean diagonal; column blocks
  with OBS updates of the weights not yet pruned (``amber_jax.baselines.sparsegpt_solver``).

Both calibrate layer by layer as their reference code does (``amber_jax.baselines.layerwise``):
each layer sees the inputs of the model whose earlier layers are already pruned. The result is
a params tree with zeros in the pruned weights and the masks (``PrunedWeights``), saved and
restored through orbax (``save_pruned_weights`` / ``load_pruned_weights``); the weight sparsity
is counted exactly from the weights (``PrunedWeights.zero_share``). Evaluate it as a dense
model: ``forward(pruned.params, tokens, config=config)``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.baselines.layerwise import calibrate_layer_by_layer
from amber_jax.baselines.sparsegpt_solver import sparsegpt_prune
from amber_jax.baselines.weight_masks import (
  check_pattern_or_sparsity,
  expert_weight_mask,
  weight_mask,
)
from amber_jax.core.patterns import NMPattern
from amber_jax.io.plan_checkpoint import PlanCheckpointError, load_plan, save_plan
from amber_jax.util.progress import progress_bar

WEIGHT_METHODS = ("wanda", "sparsegpt")
DEFAULT_DAMP = 0.01  # SparseGPT's percdamp: 1% of the Hessian's mean diagonal
DEFAULT_BLOCK_SIZE = 128  # SparseGPT's lazy-update column block


@dataclasses.dataclass(frozen=True)
class PrunedWeights:
  """A weight-pruned model: ``params`` (the input tree with zeros where ``masks`` is False),
  ``masks`` (site -> bool [L, d_in, d_out], [L, E, d_in, d_out] at an expert site; True = kept;
  only the sites pruned in some layer), how it was made and how long calibration took."""

  params: dict
  masks: dict[str, jax.Array]
  method: str
  pattern: str | None
  sparsity: float | None
  sites: tuple[tuple[int, str], ...]
  seconds: float
  options: dict = dataclasses.field(default_factory=dict)

  def zero_share(self) -> dict[str, np.ndarray]:
    """site -> float64 [L]: the exact share of zero weights per layer, counted in ``params``
    (every site, pruned or not)."""
    out = {}
    for name, leaf in self.params["layers"].items():
      if isinstance(leaf, dict) and "w" in leaf and np.ndim(leaf["w"]) >= 3:
        w = np.asarray(leaf["w"])
        out[name] = (w == 0).reshape(w.shape[0], -1).mean(axis=1)
      # norms and other per-layer leaves are not sites
    return out

  def record(self) -> dict:
    """JSON: method, pattern / sparsity, sites, seconds, options and the zero share per site
    (mean over the pruned layers) and over all pruned weights."""
    share = self.zero_share()
    pruned = {}
    for name in self.masks:
      layers = sorted(l for l, s in self.sites if s == name)
      pruned[name] = float(np.mean(share[name][layers]))
    total_zero = sum(
      float((np.asarray(self.params["layers"][s]["w"][l]) == 0).sum()) for l, s in self.sites
    )
    total = sum(float(np.asarray(self.params["layers"][s]["w"][l]).size) for l, s in self.sites)
    return {
      "method": self.method,
      "pattern": self.pattern,
      "sparsity": self.sparsity,
      "sites": [f"{s}:{l}" for l, s in self.sites],
      "seconds": self.seconds,
      "options": self.options,
      "zero_share_per_site": pruned,
      "zero_share": total_zero / max(total, 1.0),
    }


def check_weight_sites(config, sites) -> tuple[tuple[int, str], ...]:
  """``sites`` ("all" or (layer, site) pairs) as sorted pairs; ValueError naming a bad one."""
  names = config.sites.names
  if isinstance(sites, str):
    if sites != "all":
      raise ValueError(f"sites must be 'all' or (layer, site) pairs, got {sites!r}")
    return tuple((l, s) for l in range(config.n_layers) for s in names)
  out = set()
  for layer, name in sites:
    config.sites.check_name(name)
    if not 0 <= layer < config.n_layers:
      raise ValueError(f"layer {layer} out of range: the model has layers 0..{config.n_layers - 1}")
    out.add((int(layer), name))
  if not out:
    raise ValueError("sites is empty: nothing to prune")
  return tuple(sorted(out))


# ------------------------------------------------------------------------------------------------
# Calibration statistics (module-level functions: jit caches them by identity)


def _sum_of_squares(x, weights):
  """Per input channel sum of x^2 over the tokens: [d_in], or [E, d_in] per expert."""
  x2 = jnp.square(x.astype(jnp.float32))
  rows = weights.get("expert_rows")
  if rows is None:
    return jnp.sum(x2.reshape(-1, x2.shape[-1]), axis=0)
  n_experts = weights["w"].shape[0]
  return jax.ops.segment_sum(x2, rows.expert_ids, num_segments=n_experts)


def _gram(x, weights):
  """The Hessian statistic X^T X [d_in, d_in] (float32, HIGHEST precision) over the tokens."""
  if weights.get("expert_rows") is not None:
    raise ValueError(
      "sparsegpt does not support expert sites yet (one Hessian per expert of the routed rows); "
      "give sites without the expert sites, or use wanda"
    )
  x2d = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  return jnp.einsum("ni,nj->ij", x2d, x2d, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _wanda_score(w, sum_sq):
  """|W| * ||X_j||: w [d_in, d_out] with sum_sq [d_in], or [E, d_in, d_out] with [E, d_in]."""
  return jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(sum_sq)[..., None]


def wanda_scores(w_IxO, sum_sq_I):
  """Wanda's score of every weight: ``|W[j, o]| * sqrt(sum over tokens of x_j^2)``."""
  return _wanda_score(jnp.asarray(w_IxO), jnp.asarray(sum_sq_I, jnp.float32))


def prune_weights(
  params,
  config,
  method: str,
  *,
  calib_windows: np.ndarray,
  pattern: NMPattern | str | None = None,
  sparsity: float | None = None,
  sites: Iterable[tuple[int, str]] | str = "all",
  damp: float = DEFAULT_DAMP,
  block_size: int = DEFAULT_BLOCK_SIZE,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> PrunedWeights:
  """Prunes the weights of ``sites`` with ``method`` ("wanda" | "sparsegpt") to an N:M
  ``pattern`` or an unstructured ``sparsity`` (exactly one), calibrated layer by layer on
  ``calib_windows`` [W, T]. Everything is checked before calibration starts: the method, the
  pattern against every pruned site's d_in (named), the sparsity in (0, 1), the sites, damp > 0,
  and for SparseGPT that the calibration tokens are at least the widest Hessian's width (fewer
  give a singular X^T X whose inverse is mostly dampening)."""
  if method not in WEIGHT_METHODS:
    raise ValueError(
      f"unknown weight-pruning method {method!r}; valid: {', '.join(WEIGHT_METHODS)}"
    )
  pattern, sparsity = check_pattern_or_sparsity(pattern, sparsity)
  sites = check_weight_sites(config, sites)
  by_layer: dict[int, list[str]] = {}
  for layer, name in sites:
    by_layer.setdefault(layer, []).append(name)
    if pattern is not None:
      pattern.check_width(config.sites[name].d_in, where=f"{name} weight input (d_in)")
  calib_windows = np.asarray(calib_windows, np.int32)
  if calib_windows.ndim != 2 or calib_windows.size == 0:
    raise ValueError(f"calib_windows must be a non-empty [W, T] array, got {calib_windows.shape}")
  if method == "sparsegpt":
    if not damp > 0:
      raise ValueError(f"damp must be > 0 (a share of the Hessian's mean diagonal), got {damp}")
    widest = max(config.sites[name].d_in for _, name in sites)
    if calib_windows.size < widest:
      raise ValueError(
        f"sparsegpt needs at least as many calibration tokens as the widest Hessian "
        f"(d_in={widest}), got {calib_windows.size} tokens ({calib_windows.shape})"
      )
    experts = [name for _, name in sites if config.sites[name].experts]
    if experts:
      raise ValueError(
        f"sparsegpt does not support expert sites yet ({sorted(set(experts))}); use wanda or "
        "give sites without them"
      )
  statistic = _sum_of_squares if method == "wanda" else _gram
  start = time.perf_counter()
  bar = progress_bar(
    total=len(sites), desc=f"{method} sites", unit="site", disable=not show_progress
  )
  masks_per_layer: dict[str, dict[int, np.ndarray]] = {}

  def update(layer, one_layer, stats):
    new = jax.tree.map(lambda a: a, one_layer)  # a shallow copy of the structure
    for name in by_layer.get(layer, ()):
      w = one_layer["layers"][name]["w"][0]
      if method == "wanda":
        score = wanda_scores(w, stats[name])
        if w.ndim == 3:
          mask = expert_weight_mask(score, pattern, sparsity)
        else:
          mask = weight_mask(score, pattern, sparsity)
        pruned = jnp.where(mask, w, jnp.zeros((), w.dtype))
      else:
        result = sparsegpt_prune(
          w.astype(jnp.float32),
          stats[name],
          pattern=pattern,
          sparsity=sparsity,
          damp=damp,
          block_size=block_size,
        )
        mask, pruned = result.mask, result.weight.astype(w.dtype)
      layer_w = dict(new["layers"][name])
      layer_w["w"] = pruned[None]
      new["layers"] = {**new["layers"], name: layer_w}
      masks_per_layer.setdefault(name, {})[layer] = np.asarray(mask)
      bar.update(1)
    return new

  with bar:
    layers = calibrate_layer_by_layer(
      params,
      config,
      calib_windows,
      statistic=statistic,
      update=update,
      batch_size=batch_size,
      dtype=dtype,
      show_progress=False,
    )
  masks = {}
  for name, per_layer in masks_per_layer.items():
    site = config.sites[name]
    shape = ((site.experts,) if site.experts else ()) + site.shape
    full = np.ones((config.n_layers, *shape), bool)
    for layer, m in per_layer.items():
      full[layer] = m
    masks[name] = jnp.asarray(full)
  options = {"damp": damp, "block_size": block_size} if method == "sparsegpt" else {}
  options["calib_tokens"] = int(calib_windows.size)
  return PrunedWeights(
    params={**params, "layers": layers},
    masks=masks,
    method=method,
    pattern=None if pattern is None else str(pattern),
    sparsity=sparsity,
    sites=sites,
    seconds=time.perf_counter() - start,
    options=options,
  )


# ------------------------------------------------------------------------------------------------
# Saving and restoring: only the pruned sites' weights and masks (the rest is the base model's)


def save_pruned_weights(path: str | os.PathLike, pruned: PrunedWeights, *, metadata: dict) -> None:
  """Writes the pruned sites' weights and masks to the directory ``path`` (atomically, per-leaf
  digests: ``amber_jax.io.plan_checkpoint``), with how they were made and the caller's
  ``metadata`` (model name, ...: what ``load_pruned_weights(expect=...)`` checks)."""
  tree = {
    "weights": {name: pruned.params["layers"][name]["w"] for name in pruned.masks},
    "masks": dict(pruned.masks),
  }
  record = {
    "method": pruned.method,
    "pattern": pruned.pattern,
    "sparsity": pruned.sparsity,
    "sites": [[l, s] for l, s in pruned.sites],
    "seconds": pruned.seconds,
    "options": pruned.options,
  }
  save_plan(path, tree, metadata={**metadata, "pruned_weights": record})


def load_pruned_weights(
  path: str | os.PathLike, params, *, expect: dict | None = None
) -> PrunedWeights:
  """The ``PrunedWeights`` saved at ``path``, its weights put into ``params`` (the base model
  it was pruned from). PlanCheckpointError naming the path for a checkpoint that is not one,
  a site the params lack, a weight of another shape, or ``expect`` that does not match."""
  tree, metadata = load_plan(path, expect=expect)
  record = metadata.get("pruned_weights")
  if not isinstance(record, dict) or "weights" not in tree or "masks" not in tree:
    raise PlanCheckpointError(f"{os.fspath(path)!r} is not a pruned-weights checkpoint")
  layers = dict(params["layers"])
  for name, w in tree["weights"].items():
    if name not in layers or np.shape(layers[name]["w"]) != np.shape(w):
      want = None if name not in layers else np.shape(layers[name]["w"])
      raise PlanCheckpointError(
        f"pruned-weights checkpoint {os.fspath(path)!r}: site {name!r} has weight "
        f"{np.shape(w)}, the params {want}"
      )
    layers[name] = {**layers[name], "w": jnp.asarray(w, layers[name]["w"].dtype)}
  return PrunedWeights(
    params={**params, "layers": layers},
    masks={name: jnp.asarray(m) for name, m in tree["masks"].items()},
    method=record["method"],
    pattern=record["pattern"],
    sparsity=record["sparsity"],
    sites=tuple((int(l), s) for l, s in record["sites"]),
    seconds=float(record["seconds"]),
    options=dict(record.get("options", {})),
  )
