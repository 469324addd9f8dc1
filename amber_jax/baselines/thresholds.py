"""Activation-threshold baselines: TEAL (every linear's input) and CATS (the gated MLP activation).

* **TEAL** (Liu et al., arXiv 2408.14690): each site's input keeps the entries with
  ``|x| > t_site`` (unstructured, per token), ``t_site`` the magnitude quantile of the site's
  calibration inputs at its target sparsity, read from a histogram (TEAL's ``Distribution.icdf``;
  here of ``|x|`` on log-spaced bins). The site sparsities are uniform, or TEAL's block-wise
  greedy allocation: per layer, starting from 0, repeatedly raise the sparsity of the site whose
  step costs the least error of the layer's output (on the dense model's calibration inputs to
  that layer), each step worth the same share of the layer's multiply-adds, until the layer's
  MAC-weighted sparsity reaches the target (``teal/greedyopt.py``).
* **CATS** (Lee et al., arXiv 2404.08763): the MLP only; the gated activation ``silu(gate(x))``
  keeps the entries with ``|a| > t_layer`` (the quantile of its calibration values at the target
  sparsity), so ``down``'s input is sparse at that rate and the same rows of ``up`` are unused.

Both are plans (``SparsityPlan.threshold`` / ``gate_threshold``: data, so one compiled forward
serves every sparsity); they apply in prefill and, with ``decode=True``, in decode (the regime
both papers target). TEAL's own prefill sparsifies only the last half of a prompt's tokens
(``utils.SparsifyFn``); here every prefill token is, as Amber's N:M is.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.baselines.layerwise import layer_params, one_layer_config
from amber_jax.baselines.weight_masks import check_sparsity
from amber_jax.calibrate.harness import check_windows, windows_in_batches
from amber_jax.model.llama import embed, model_pass
from amber_jax.plan.coverage import site_macs
from amber_jax.plan.schema import SparsityPlan, check_thresholds, make_plan
from amber_jax.util.progress import progress_bar

# |x| histograms: bin 0 holds exact zeros, bins 1..HIST_BINS cover 2^LOG2_MIN .. 2^LOG2_MAX in
# equal steps of log2 (about 2% wide: the interpolated quantile is within a fraction of that).
HIST_BINS = 3072
LOG2_MIN, LOG2_MAX = -40.0, 20.0
_BIN_WIDTH = (LOG2_MAX - LOG2_MIN) / HIST_BINS
ALLOCATIONS = ("uniform", "greedy")
DEFAULT_GREEDY_STEP = 0.05  # TEAL's base_step_size
GATE_KEY = "gate_act"  # the histogram of |silu(gate(x))| (CATS)


def magnitude_histogram(a: jax.Array) -> jax.Array:
  """int32 [HIST_BINS + 1]: counts of ``|a|`` (bin 0: exact zeros; see the module constants)."""
  mag = jnp.abs(a.astype(jnp.float32)).reshape(-1)
  pos = (jnp.log2(jnp.maximum(mag, 2.0**LOG2_MIN)) - LOG2_MIN) / _BIN_WIDTH
  idx = jnp.where(mag > 0, 1 + jnp.clip(jnp.floor(pos), 0, HIST_BINS - 1).astype(jnp.int32), 0)
  return jnp.bincount(idx, length=HIST_BINS + 1)


def threshold_at(counts: np.ndarray, sparsity: float) -> float:
  """The magnitude t with a share ``sparsity`` of the histogram's values at or below it
  (geometric interpolation inside the bin; 0 when the zeros alone reach it)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total == 0 or sparsity <= 0:
    return 0.0
  target = sparsity * total
  cum = np.cumsum(counts)
  k = int(np.searchsorted(cum, target, side="left"))
  if k == 0:
    return 0.0
  k = min(k, HIST_BINS)
  below = cum[k - 1]
  frac = 0.0 if counts[k] == 0 else (target - below) / counts[k]
  lo = LOG2_MIN + (k - 1) * _BIN_WIDTH
  return float(2.0 ** (lo + frac * _BIN_WIDTH))


@dataclasses.dataclass(frozen=True)
class ActivationHistograms:
  """Calibration histograms: ``sites`` site -> int64 [L, HIST_BINS + 1] of each site's input,
  and ``gate`` [L, HIST_BINS + 1] of ``|silu(gate(x))|`` (None without a gated MLP)."""

  sites: dict[str, np.ndarray]
  gate: np.ndarray | None
  tokens: int


def _histogram_hook(name, x, weights, row, linear):
  del weights, row
  y = linear(x)
  record = {"input": magnitude_histogram(x)}
  if name == "gate":
    record[GATE_KEY] = magnitude_histogram(jax.nn.silu(y))
  return y, record


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_histograms(params, tokens_BxT, *, config, dtype):
  return model_pass(params, tokens_BxT, config=config, dtype=dtype, hook=_histogram_hook).records


def collect_histograms(
  params, config, windows, *, batch_size: int = 4, dtype=jnp.float32, show_progress=True
) -> ActivationHistograms:
  """Histograms of every site's input (and of the gated activation) of the dense model over
  ``windows`` [W, T] (``magnitude_histogram``), summed over the windows in int64."""
  windows = check_windows(windows)
  sites: dict[str, np.ndarray] = {}
  gate = None
  for rows in windows_in_batches(
    windows, batch_size, desc="histograms", show_progress=show_progress
  ):
    records = _batch_histograms(params, rows, config=config, dtype=dtype)
    for name, rec in records.items():
      h = np.asarray(rec["input"], np.int64)
      sites[name] = h if name not in sites else sites[name] + h
      if GATE_KEY in rec:
        g = np.asarray(rec[GATE_KEY], np.int64)
        gate = g if gate is None else gate + g
  return ActivationHistograms(sites=sites, gate=gate, tokens=int(windows.size))


@dataclasses.dataclass(frozen=True)
class ThresholdPlan:
  """A TEAL or CATS plan and its record: the target, the per-site sparsities it was set to
  (site -> [L]; for CATS the "down" input's), the share of the linear multiply-adds removed at
  those sparsities, and the calibration time."""

  plan: SparsityPlan
  method: str
  sparsity: float
  site_sparsity: dict[str, np.ndarray]
  removed: float
  seconds: float
  allocation: str = "uniform"

  def record(self) -> dict:
    return {
      "method": self.method,
      "sparsity": self.sparsity,
      "allocation": self.allocation,
      "removed": self.removed,
      "seconds": self.seconds,
      "site_sparsity": {k: [float(x) for x in v] for k, v in self.site_sparsity.items()},
    }


def removed_share(config, site_sparsity: dict[str, np.ndarray]) -> float:
  """The share of the model's linear multiply-adds (LM head excluded) whose input entries are
  zero at the per-site, per-layer sparsities ``site_sparsity`` (site -> [L])."""
  macs = site_macs(config)
  total = config.n_layers * sum(macs.values())
  return float(sum(macs[s] * np.sum(v) for s, v in site_sparsity.items()) / total)


def _check_sites(config, sites) -> dict[int, tuple[str, ...]]:
  """layer -> the sites thresholded there, from "all" or (layer, site) pairs."""
  if isinstance(sites, str):
    if sites != "all":
      raise ValueError(f"sites must be 'all' or (layer, site) pairs, got {sites!r}")
    return {l: config.sites.names for l in range(config.n_layers)}
  out: dict[int, list[str]] = {}
  for layer, name in sites:
    config.sites.check_name(name)
    if not 0 <= layer < config.n_layers:
      raise ValueError(f"layer {layer} out of range: the model has layers 0..{config.n_layers - 1}")
    out.setdefault(int(layer), []).append(name)
  if not out:
    raise ValueError("sites is empty: nothing to threshold")
  return {l: tuple(n for n in config.sites.names if n in v) for l, v in out.items()}


def _threshold_plan(config, thresholds: dict[str, np.ndarray], *, decode: bool, gate=None):
  plan = make_plan(config, None)
  threshold = (
    None if not thresholds else {k: jnp.asarray(v, jnp.float32) for k, v in thresholds.items()}
  )
  gate = None if gate is None else jnp.asarray(gate, jnp.float32)
  check_thresholds(config, threshold, gate)
  return plan.replace(threshold=threshold, gate_threshold=gate, threshold_decode=decode)


def teal_plan(
  params,
  config,
  calib_windows,
  *,
  sparsity: float,
  sites: Iterable[tuple[int, str]] | str = "all",
  allocation: str = "uniform",
  decode: bool = False,
  greedy_step: float = DEFAULT_GREEDY_STEP,
  greedy_windows: int = 1,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  histograms: ActivationHistograms | None = None,
) -> ThresholdPlan:
  """TEAL's thresholds for a target activation ``sparsity`` of ``sites`` (see the module
  docstring): ``allocation="uniform"`` sets every site to it, ``"greedy"`` allocates it within
  each layer (the first ``greedy_windows`` calibration windows measure the layer's output
  error; steps of ``greedy_step`` of the layer's multiply-adds). ``histograms`` may be given to
  reuse one calibration pass for several targets."""
  sparsity = check_sparsity(sparsity)
  if allocation not in ALLOCATIONS:
    raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
  if not 0 < greedy_step < 1:
    raise ValueError(f"greedy_step must be in (0, 1), got {greedy_step}")
  by_layer = _check_sites(config, sites)
  calib_windows = check_windows(calib_windows)
  start = time.perf_counter()
  if histograms is None:
    histograms = collect_histograms(
      params, config, calib_windows, batch_size=batch_size, dtype=dtype, show_progress=show_progress
    )
  shares = {n: np.zeros(config.n_layers) for n in config.sites.names}
  if allocation == "uniform":
    for layer, names in by_layer.items():
      for n in names:
        shares[n][layer] = sparsity
  else:
    shares = _greedy_shares(
      params,
      config,
      calib_windows[:greedy_windows],
      histograms,
      by_layer,
      sparsity,
      step=greedy_step,
      dtype=dtype,
      show_progress=show_progress,
    )
  thresholds = {
    n: np.array(
      [threshold_at(histograms.sites[n][l], shares[n][l]) for l in range(config.n_layers)]
    )
    for n in config.sites.names
  }
  plan = _threshold_plan(config, thresholds, decode=decode)
  used = {n: v for n, v in shares.items() if v.any()}
  return ThresholdPlan(
    plan=plan,
    method="teal",
    sparsity=sparsity,
    site_sparsity=used,
    removed=removed_share(config, used),
    seconds=time.perf_counter() - start,
    allocation=allocation,
  )


@functools.partial(jax.jit, static_argnames=("config",))
def _one_layer_out(one_layer, h, plan, *, config):
  return model_pass(one_layer, h_BxTxD=h, config=config, plan=plan, dtype=h.dtype).hidden


def _greedy_shares(
  params, config, windows, histograms, by_layer, target, *, step, dtype, show_progress
) -> dict[str, np.ndarray]:
  """TEAL's block-wise greedy allocation (``teal/greedyopt.py``, see ``teal_plan``)."""
  one = one_layer_config(config)
  shares = {n: np.zeros(config.n_layers) for n in config.sites.names}
  h = embed(params, jnp.asarray(windows), dtype)
  bar = progress_bar(
    total=config.n_layers, desc="teal greedy", unit="layer", disable=not show_progress
  )
  with bar:
    for layer in range(config.n_layers):
      lp = layer_params(params, layer)
      counts = {n: histograms.sites[n][layer] for n in config.sites.names}
      dense = _threshold_plan(one, {n: np.zeros(1) for n in config.sites.names}, decode=False)
      target_out = _one_layer_out(lp, h, dense, config=one)
      names = by_layer.get(layer, ())
      if names:
        found = _greedy_layer(one, lp, h, target_out, counts, names, target, step)
        for n in names:
          shares[n][layer] = found[n]
      h = target_out  # TEAL calibrates every layer on the dense model's inputs
      bar.update(1)
  return shares


def _greedy_layer(one, lp, h, target_out, counts, names, target, step) -> dict[str, float]:
  """One layer's site sparsities: from 0, repeatedly the step of the site whose step raises
  the layer's output error (squared, over the calibration tokens) least, until the layer's
  MAC-weighted sparsity reaches ``target``. Each site's step is ``step`` times the mean site
  MACs over its own MACs (TEAL's ``base_step_size / weight``): every step removes the same
  share of the layer's multiply-adds."""
  macs = site_macs(one)
  weights = {n: macs[n] for n in names}
  total = sum(weights.values())
  mean_w = total / len(names)
  steps = {n: step * mean_w / weights[n] for n in names}
  s = {n: 0.0 for n in names}

  def plan_of(s_):
    t = {n: np.array([threshold_at(c, s_.get(n, 0.0))]) for n, c in counts.items()}
    return _threshold_plan(one, t, decode=False)

  while sum(weights[n] * s[n] for n in names) / total < target - 1e-9:
    best, best_err = None, np.inf
    for n in names:
      if s[n] + steps[n] >= 1.0:
        continue
      out = _one_layer_out(lp, h, plan_of({**s, n: s[n] + steps[n]}), config=one)
      err = float(jnp.sum(jnp.square((out - target_out).astype(jnp.float32))))
      if err < best_err:
        best, best_err = n, err
    if best is None:  # every site is one step below 1: the target cannot be reached
      break
    s[best] += steps[best]
  return s


def cats_plan(
  params,
  config,
  calib_windows,
  *,
  sparsity: float,
  layers: Iterable[int] | str = "all",
  decode: bool = False,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
  histograms: ActivationHistograms | None = None,
) -> ThresholdPlan:
  """CATS's per-layer thresholds on ``|silu(gate(x))|`` at the target ``sparsity`` (see the
  module docstring) for ``layers`` ("all" or layer indices; the others keep t = 0)."""
  sparsity = check_sparsity(sparsity)
  if "gate" not in config.sites.names:
    raise ValueError(f"cats needs a gated MLP (a 'gate' site); sites: {config.sites.names}")
  chosen = range(config.n_layers) if layers == "all" else sorted(set(int(l) for l in layers))
  for l in chosen:
    if not 0 <= l < config.n_layers:
      raise ValueError(f"layer {l} out of range: the model has layers 0..{config.n_layers - 1}")
  calib_windows = check_windows(calib_windows)
  start = time.perf_counter()
  if histograms is None:
    histograms = collect_histograms(
      params, config, calib_windows, batch_size=batch_size, dtype=dtype, show_progress=show_progress
    )
  gate = np.zeros(config.n_layers)
  share = np.zeros(config.n_layers)
  for l in chosen:
    gate[l] = threshold_at(histograms.gate[l], sparsity)
    share[l] = sparsity
  plan = _threshold_plan(config, {}, decode=decode, gate=gate)
  # The down input's zeros also make the same rows of up unused: both sites' MACs count.
  used = {"up": share, "down": share}
  return ThresholdPlan(
    plan=plan,
    method="cats",
    sparsity=sparsity,
    site_sparsity={"down": share},
    removed=removed_share(config, used),
    seconds=time.perf_counter() - start,
  )


def _sparsity_hook(name, x, weights, row, linear):
  del weights, name
  t = row  # this site's threshold in this layer (the plan's own, passed as the hook's data)
  zero = jnp.abs(x) <= t if t is not None else x == 0
  return linear(x), (jnp.sum(zero | (x == 0)), jnp.size(x))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_zero_counts(params, tokens, plan, thresholds, *, config, dtype):
  return model_pass(
    params, tokens, config=config, plan=plan, dtype=dtype, hook=_sparsity_hook, hook_xs=thresholds
  ).records


def measure_activation_sparsity(
  params,
  config,
  plan: SparsityPlan,
  windows,
  *,
  batch_size: int = 4,
  dtype=jnp.float32,
  upstream: str = "plan",
) -> dict[str, np.ndarray]:
  """site -> [L]: the share of each site's input entries that are zero after ``plan``'s
    thresholds on ``windows`` [W, T]: what a TEAL/CATS plan achieves on held-out tokens.
    ``upstream="plan"`` runs the model under the plan (every site sees its sparsified upstream:
    the sparsity the plan really has); ``"dense"`` runs it dense and counts each site's input
    against its threshold (the distribution the thresholds were calibrated on: TEAL calibrates on
    the dense model). CATS's gated activation shows as the zeros of the "down" input (under
  ``"plan"`` only: a dense pass applies no threshold of its own)."""
  if upstream not in ("plan", "dense"):
    raise ValueError(f"upstream must be 'plan' or 'dense', got {upstream!r}")
  windows = check_windows(windows)
  thresholds = {
    n: (
      plan.threshold[n]
      if plan.threshold is not None and n in plan.threshold
      else jnp.zeros(config.n_layers)
    )
    for n in config.sites.names
  }
  zeros = {n: np.zeros(config.n_layers) for n in config.sites.names}
  sizes = {n: np.zeros(config.n_layers) for n in config.sites.names}
  for rows in windows_in_batches(windows, batch_size, desc="sparsity", show_progress=False):
    run_plan = plan if upstream == "plan" else make_plan(config, None)
    records = _batch_zero_counts(params, rows, run_plan, thresholds, config=config, dtype=dtype)
    for n, (z, size) in records.items():
      zeros[n] += np.asarray(z, np.float64)
      sizes[n] += np.asarray(size, np.float64)
  return {n: zeros[n] / sizes[n] for n in zeros}
