"""Site search: which projections of which layers to sparsify, chosen by measured loss of fidelity.

The paper fixes the sparse projections (q, gate and down) and only chooses the layers whose q
and gate stay dense, from per-site *output* errors. Those errors do not say how much a site's
error matters downstream: on SmolLM2-135M at 8:16, sparsifying gate in layer 0 alone moves the
next-token distribution about 38x more than q in layer 7 (KL 14.6e-3 vs 0.38e-3) for 2.7x the
multiply-adds, while the relative output errors of the two differ by 1.6x (0.205 vs 0.129).

Here every site (layer, projection) is a candidate, k, v, o and up included. A site's cost is
the KL divergence from the dense model's next-token distribution to that of the model with
only that site sparsified (its score factors and corrections as in the given plan), measured on
calibration windows. The plan is the set of sites of least total cost whose multiply-adds reach
the coverage target: an exact 0/1 knapsack over multiply-add units. Summing single-site costs
ignores interactions between sites; ``plan_kl`` measures a whole plan. On SmolLM2-135M the sum
is close: exp(sum) x dense perplexity predicts 40.56 for the 8:16 plan at coverage 0.55, and
40.33 is measured (RESULTS.md, "front").

Measuring costs needs one pass per site over the calibration tokens, resumed at the site's layer
from the dense residual stream (the layers before it are unchanged), so half a forward pass on
average; plans are data, so one compiled function serves every site. It is done once per
(pattern, scores) and serves any coverage target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.policy import check_coverage_target, knapsack
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import forward, forward_from_layer, layer_inputs
from amber_jax.plan.coverage import site_macs
from amber_jax.plan.schema import SparsityPlan
from amber_jax.util.progress import progress_bar


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _dense_logprobs(params, tokens_BxT, *, config, dtype):
  logits = forward(params, tokens_BxT, config=config, dtype=dtype)
  return jax.nn.log_softmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _kl_sum(params, h_BxTxD, first_layer, dense_logprobs, plan, *, config, dtype):
  """Sum over tokens of KL(dense || plan), the pass resumed at ``first_layer`` from the dense
  residual stream ``h_BxTxD`` entering it (exact when the plan is dense before that layer)."""
  logits = forward_from_layer(params, h_BxTxD, first_layer, config=config, plan=plan, dtype=dtype)
  logp = jax.nn.log_softmax(logits, -1)
  return jnp.sum(jnp.exp(dense_logprobs) * (dense_logprobs - logp))


class KLMeter:
  """KL(dense || plan) per token on fixed calibration tokens: ``meter(plan)``.

  The dense side (next-token log-probabilities, the residual stream entering each layer) is
  computed once; a plan whose first sparse site is in layer l is run from layer l on (one site
  at a time: half the layers on average).
  """

  def __init__(self, params, windows: np.ndarray, *, config, batch_size: int, dtype):
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
      raise ValueError(f"calib_windows must be [W >= 1, T >= 2] token ids, got {windows.shape}")
    tokens = windows[:, :-1]
    self.params, self.config, self.dtype = params, config, dtype
    batches = [jnp.asarray(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
    kw = dict(config=config, dtype=dtype)
    self.dense = [
      (_dense_logprobs(params, b, **kw), layer_inputs(params, b, **kw)) for b in batches
    ]
    self.tokens = int(tokens.size)

  def __call__(self, plan: SparsityPlan) -> float:
    if plan.quant is not None:
      # The pass resumes at the first sparse layer from the dense residual stream, which would
      # leave out the quantization of every earlier layer.
      raise ValueError("KLMeter measures float plans (plan.quant must be None)")
    sparse_layers = [l for l, _ in plan.enabled_sites()] if plan.pattern is not None else []
    first = min(sparse_layers, default=self.config.n_layers - 1)
    total = 0.0
    for logprobs, inputs in self.dense:
      total += float(
        _kl_sum(
          self.params,
          inputs[first],
          first,
          logprobs,
          plan,
          config=self.config,
          dtype=self.dtype,
        )
      )
    return total / self.tokens


@dataclasses.dataclass(frozen=True)
class SiteCosts:
  """KL (nats/token) of sparsifying each site alone, [n_layers, n_sites] in ``site_names``
  (``config.sites``) order."""

  kl: np.ndarray
  pattern: str
  tokens: int
  seconds: float
  site_names: tuple[str, ...]
  # Projections whose N:M groups followed a channel order of the plan (e.g. ("o",) for
  # o_order="mixed"): their costs hold only for plans with the same grouping.
  ordered: tuple[str, ...] = ()

  def table(self) -> str:
    header = "layer " + " ".join(f"{p:>8}" for p in self.site_names)
    rows = [header] + [
      f"{l:>5} " + " ".join(f"{1e3 * c:>8.3f}" for c in row) for l, row in enumerate(self.kl)
    ]
    return "\n".join(rows + ["(KL x 1e3, nats per token)"])


def measure_site_costs(
  params,
  plan: SparsityPlan,
  calib_windows: np.ndarray,
  *,
  config: LlamaConfig,
  batch_size: int = 2,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> SiteCosts:
  """KL(dense || only that site sparse) for every site, with ``plan``'s pattern, factors,
  channel orders and corrections (its ``enabled`` flags are ignored). ``calib_windows``
  [W, T+1] token ids (the first T are the inputs). Raises ValueError for a plan without
  pattern or a W8A8 plan."""
  if plan.pattern is None:
    raise ValueError("plan has no N:M pattern: there are no sparse sites to search")
  if plan.quant is not None:
    raise ValueError("site search takes float plans (plan.quant must be None)")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  start = time.perf_counter()
  meter = KLMeter(params, calib_windows, config=config, batch_size=batch_size, dtype=dtype)
  names = config.sites.names
  off = {p: jnp.zeros((config.n_layers,), bool) for p in names}
  kl = np.zeros((config.n_layers, len(names)))
  with progress_bar(
    total=kl.size, desc=f"site search {plan.pattern}", unit="site", disable=not show_progress
  ) as bar:
    for l in range(config.n_layers):
      for j, proj in enumerate(names):
        enabled = dict(off, **{proj: off[proj].at[l].set(True)})
        kl[l, j] = meter(plan.replace(enabled=enabled))
        bar.update(1)
  return SiteCosts(
    kl=kl,
    pattern=str(plan.pattern),
    tokens=meter.tokens,
    seconds=time.perf_counter() - start,
    ordered=tuple(sorted(plan.channel_order or {})),
    site_names=names,
  )


def select_sites(
  costs: SiteCosts, config: LlamaConfig, coverage_target: float
) -> tuple[tuple[int, str], ...]:
  """The sites of least total cost whose multiply-adds are at least ``coverage_target`` of all
  (layer, projection) multiply-adds. Exact: a 0/1 knapsack choosing the sites that stay dense,
  each worth its cost, within the multiply-adds above the target (units: the gcd of the sites')."""
  check_coverage_target(coverage_target)
  names = config.sites.names
  if costs.kl.shape != (config.n_layers, len(names)):
    raise ValueError(f"costs are for {costs.kl.shape[0]} layers, the model has {config.n_layers}")
  macs = site_macs(config)
  unit = math.gcd(*macs.values())
  total = config.n_layers * sum(macs.values()) // unit
  capacity = int(math.floor(total * (1 - coverage_target) + 1e-9))
  items = [(l, p) for l in range(config.n_layers) for p in names]
  if not np.isfinite(costs.kl).all():  # max(nan, 0) is nan: the knapsack would take it as free
    bad = [items[i] for i in np.flatnonzero(~np.isfinite(costs.kl.ravel()))]
    raise ValueError(f"site costs must be finite; non-finite at (layer, projection) {bad[:8]}")
  # A negative measured KL is noise around zero: such a site is free to sparsify.
  values = [max(float(costs.kl[l, names.index(p)]), 0.0) for l, p in items]
  dense = set(knapsack([macs[p] // unit for _, p in items], values, capacity))
  return tuple(item for i, item in enumerate(items) if i not in dense)


def plan_kl(
  params,
  plan: SparsityPlan,
  calib_windows: np.ndarray,
  *,
  config: LlamaConfig,
  batch_size: int = 2,
  dtype=jnp.float32,
) -> float:
  """KL(dense || plan) in nats per token on ``calib_windows`` [W, T+1]; a float plan (a W8A8
  plan raises ValueError: the measurement resumes at the first sparse layer)."""
  meter = KLMeter(params, calib_windows, config=config, batch_size=batch_size, dtype=dtype)
  return meter(plan)
