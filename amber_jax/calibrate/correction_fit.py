"""Output corrections of N:M-sparsified sites, calibrated on calibration windows (weights fixed).

An N:M site computes ``y_s = W^T (x * m)`` instead of ``y = W^T x`` (``m`` keeps N of every M
input channels per token). The corrections here are cheap, training-free fixes of ``y_s``,
fitted per site on calibration tokens and stored as data in the plan
(``SparsityPlan.correction``), stacked over layers like the score factors, so trying another
correction re-uses the compiled model. The weights never change. At an enabled site in
prefill, the site's linear (``amber_jax.core.linear``) computes (``amber_jax.core.correction``)::

    x_c = x - center                          # per input channel (0: off)
    m   = N:M mask of |x_c| * factors         # the plan's score, on the centred values
    x_s = x_c * m                             # the sparse operand (still exactly N:M)
    g   = ||x_c|| / ||x_s|| per token         # only where token_rescale is 1
    y   = ((x_s * in_scale) @ W) * g * out_scale + out_bias

so the matmul's operand stays N:M sparse; everything else is elementwise or a per-token /
per-output-channel vector. Decode stays dense and uncorrected. The named corrections
(``correction=`` a name or names joined by "+", e.g. "median+bias+scale_channel"):

* ``scale``: one least-squares scalar per site, ``alpha = <Y, Y_s> / <Y_s, Y_s>`` over all
  calibration tokens and output channels (``Y`` the dense output, ``Y_s`` the sparse output
  after the input-side fixes below, if any); ``scale_channel``: one per output channel
  (``alpha_o = <Y_o, Y_s,o> / <Y_s,o, Y_s,o>``).
* ``bias``: the expected dropped contribution, ``W^T E[x - x_s]`` (``= W^T E[x * (1 - m)]``
  without centring), i.e. the mean output residual. With a scale as well, scale and bias are
  fitted jointly by least squares (``alpha = cov(Y, Y_s) / var(Y_s)``,
  ``bias = E[Y] - alpha E[Y_s]``; pooled over channels for the per-site scalar).
* ``median`` / ``mean``: shift each input channel by its calibration median (or mean) before
  selection and add it back after: the kept set is chosen on centred values, the operand is
  the sparse centred activation and ``W^T center`` is a constant folded into ``out_bias``
  (Mode-Centering of SCAP, Chua et al. 2024, arXiv 2412.07174, with the median as the mode
  estimate; the "median shift" of the lightweight N:M error mitigations studied by Alanova et
  al. 2025, arXiv 2509.22166).
* ``rescale``: per token, scale the kept activations so their L2 norm matches the (centred)
  dense row's, ``g = ||x_c|| / ||x_c * m||`` (no calibration: it is computed on the fly, as a
  per-token factor of the output); ``rescale_channel``: a calibrated per-input-channel factor
  ``k_j = sqrt(sum_t x_c,tj^2 / sum_t (x_c,tj m_tj)^2)`` that restores each channel's second
  moment (the "variance correction" family of Alanova et al. 2025; like dropout's 1/p, but
  measured, since the mask keeps the large values).

The bias is the rank-0 case of compensating the dropped part of ``x`` with a cheap
approximation (R-Sparse, Zhang et al. 2025, compensates it with a low-rank one). Magnitude
pruning of activations (TEAL, Liu et al. 2024; CATS, Lee et al. 2024) keeps the values of
largest |x|, treating 0 as every channel's centre; a channel with an offset loses it when
pruned, which the centring addresses. Fits
happen in this order: centre, input rescale, then the output scale/bias on top of them (each
stage sees the earlier ones). Medians are exact (``channel_median``).

Calibration inputs (``inputs=``): "dense" fits every site on the dense model's activations
(the sites' inputs as if nothing upstream were sparse); "sequential" runs the sparse,
already-corrected model and fits each site on the inputs it really sees there (layer by layer,
in the order of the forward pass), its target being ``W^T x`` of that same input; "global"
runs it the same way but fits each site to the dense model's output of that site, so the
correction also absorbs the error of the sparse sites upstream. Each is one jitted pass over
all calibration windows at once (the median and the sequential fits need every calibration
token of a site together: memory grows with windows x tokens; "global" runs both models).
"dense" is the default: on SmolLM2-135M, "sequential" was no better (8:16 paper: lee 41.91 vs
41.17 for median+scale+bias; 2:4 equal) and "global" far worse (49.0 vs 42.7 uncorrected;
"bias" alone 77.8 in a development run). Our unverified guess: a per-site constant cannot
undo upstream errors that differ token by token, and the least-squares scale shrinks when the
sparse model's output is that loosely tied to the dense target.

Measured (RESULTS.md, section "corrections"; experiments/corrections.py): the gains are small
and mostly do not transfer to a text outside calibration. Every correction stays off by default
(``correction="none"``), and a plan without one runs exactly the plain N:M code.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.harness import check_windows, record_only, site_records
from amber_jax.core.backends import get_backend
from amber_jax.core.correction import (
  sparse_operand,
  token_gain,
)
from amber_jax.core.linear import LinearSpec, site_linear
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sites import Architecture
from amber_jax.plan.schema import GROUP_KEYS, check_group_arrays, identity_arrays
from amber_jax.util.progress import progress_bar

# Single corrections; combine them with "+" (one of each kind: centre, rescale, scale, bias).
CORRECTIONS = (
  "none",
  "scale",
  "scale_channel",
  "bias",
  "median",
  "mean",
  "rescale",
  "rescale_channel",
)
CORRECTION_INPUTS = ("dense", "sequential", "global")
# The arrays of one site (stacked over layers in the plan), as the plan schema lists them.
CORRECTION_KEYS = GROUP_KEYS["correction"]

_KIND = {
  "scale": ("scale", "site"),
  "scale_channel": ("scale", "channel"),
  "bias": ("bias", True),
  "median": ("center", "median"),
  "mean": ("center", "mean"),
  "rescale": ("rescale", "token"),
  "rescale_channel": ("rescale", "channel"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorrectionSpec:
  """Which corrections to fit (parsed from "median+bias+scale_channel" and the like)."""

  center: str = "none"  # none | median | mean
  rescale: str = "none"  # none | token | channel
  scale: str = "none"  # none | site | channel
  bias: bool = False

  @classmethod
  def parse(cls, correction: str | CorrectionSpec) -> CorrectionSpec:
    """A spec from names joined by "+" (see CORRECTIONS); ValueError naming ``correction``."""
    if isinstance(correction, CorrectionSpec):
      return correction
    if not isinstance(correction, str) or not correction.strip():
      raise ValueError(
        f"correction must be a name or names joined by '+' from {', '.join(CORRECTIONS)}, "
        f"got {correction!r}"
      )
    names = [n.strip() for n in correction.split("+")]
    if names == ["none"]:
      return cls()
    fields: dict = {}
    for name in names:
      if name not in _KIND:
        raise ValueError(
          f"correction has unknown name {name!r} (in {correction!r}); valid: "
          f"{', '.join(CORRECTIONS)} ('none' only alone), joined by '+'"
        )
      kind, value = _KIND[name]
      if kind in fields:
        raise ValueError(
          f"correction {correction!r} names two corrections of the same kind ({kind}); "
          "give at most one centre (median|mean), one rescale (rescale|rescale_channel), "
          "one scale (scale|scale_channel) and bias"
        )
      fields[kind] = value
    return cls(**fields)

  def __str__(self) -> str:
    names = []
    if self.center != "none":
      names.append(self.center)
    if self.rescale != "none":
      names.append({"token": "rescale", "channel": "rescale_channel"}[self.rescale])
    if self.scale != "none":
      names.append({"site": "scale", "channel": "scale_channel"}[self.scale])
    if self.bias:
      names.append("bias")
    return "+".join(names) or "none"

  @property
  def is_none(self) -> bool:
    return str(self) == "none"


def check_correction(correction: str | CorrectionSpec) -> str:
  """The canonical name of ``correction`` (ValueError naming the argument if invalid)."""
  return str(CorrectionSpec.parse(correction))


def check_correction_inputs(inputs: str) -> str:
  """``inputs`` unchanged if it is one of ``CORRECTION_INPUTS``, else ValueError."""
  if inputs not in CORRECTION_INPUTS:
    raise ValueError(
      f"correction_inputs must be one of {', '.join(CORRECTION_INPUTS)}, got {inputs!r}"
    )
  return inputs


def _identity_site(d_in: int, d_out: int, lead: tuple[int, ...] = ()) -> dict[str, jax.Array]:
  return {
    "center": jnp.zeros((*lead, d_in), jnp.float32),
    "in_scale": jnp.ones((*lead, d_in), jnp.float32),
    "token_rescale": jnp.zeros(lead, jnp.float32),
    "out_scale": jnp.ones((*lead, d_out), jnp.float32),
    "out_bias": jnp.zeros((*lead, d_out), jnp.float32),
  }


def identity_correction(config: Architecture) -> dict[str, dict[str, jax.Array]]:
  """A correction that changes nothing (same pytree structure as every calibrated one)."""
  return identity_arrays("correction", config)


def check_correction_tree(config: Architecture, correction) -> None:
  """ValueError naming the entry unless ``correction`` has the arrays and shapes of a plan's."""
  check_group_arrays(config, "correction", correction)


def _safe_ratio(num, den, default=1.0):
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), default)


def _kth_smallest(x_TxC: jax.Array, k: int) -> jax.Array:
  """[C]: the k-th smallest (0-based) of each column, exactly, by bisection on the bits.

  Floats map monotonically to uint32 keys; 32 halvings of the key range find the smallest key
  with more than k entries at or below it. Each step is one compare-and-count over [T, C], which
  XLA runs far faster than a sort along the token axis on CPU (3-5x at calibration sizes).
  """
  bits = jax.lax.bitcast_convert_type(x_TxC.astype(jnp.float32), jnp.uint32)
  negative = bits >> 31 == 1
  keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))  # order-preserving

  def step(_, bounds):
    lo, hi = bounds  # the answer's key is in [lo, hi]
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(keys <= mid[None, :], axis=0, dtype=jnp.int32) > k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  c = x_TxC.shape[1]
  lo = jnp.zeros((c,), jnp.uint32)
  hi = jnp.full((c,), 0xFFFFFFFF, jnp.uint32)
  key, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def channel_median(x_TxC: jax.Array) -> jax.Array:
  """[C] float32: the median of each column (as np.median: the mean of the two middle values
  for an even count), exact, without sorting. Inputs must be finite."""
  t = x_TxC.shape[0]
  lo = _kth_smallest(x_TxC, (t - 1) // 2)
  if t % 2:
    return lo
  return 0.5 * (lo + _kth_smallest(x_TxC, t // 2))


def fit_site_correction(
  x: jax.Array,
  w: jax.Array,
  factors: jax.Array,
  pattern: NMPattern,
  spec: CorrectionSpec,
  *,
  method: str = "auto",
  target: jax.Array | None = None,
  channel_order: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
  """Fits one site's correction on its calibration inputs ``x`` [..., d_in] (w [d_in, d_out]).

  The fit approximates ``target`` [..., d_out] (default: the dense output ``x @ w``).
  Returns (the site's arrays, float32 [3]: squared error of the plain N:M output, of the
  corrected output, and the squared norm of the target, summed over tokens).
  """
  d_in, d_out = w.shape
  x = x.reshape(-1, d_in)
  f32 = lambda a: a.astype(jnp.float32)
  x32, w32 = f32(x), f32(w)
  if spec.center == "median":
    center = channel_median(x32)
  elif spec.center == "mean":
    center = jnp.mean(x32, axis=0)
  else:
    center = jnp.zeros((d_in,), jnp.float32)
  # The mask is chosen exactly as at inference (in the input's dtype).
  xc, xs = sparse_operand(x, pattern, factors, center, method, channel_order)
  xc, xs = f32(xc), f32(xs)
  if spec.rescale == "channel":
    in_scale = jnp.sqrt(_safe_ratio(jnp.sum(xc * xc, axis=0), jnp.sum(xs * xs, axis=0)))
  else:
    in_scale = jnp.ones((d_in,), jnp.float32)
  token_rescale = jnp.asarray(1.0 if spec.rescale == "token" else 0.0, jnp.float32)
  gain = token_gain(xc, xs, token_rescale)
  y = x32 @ w32 if target is None else f32(target).reshape(-1, d_out)  # the target [T, d_out]
  center_out = center @ w32
  y_hat = (xs * in_scale[None, :]) @ w32 * gain + center_out[None, :]
  if spec.bias:
    yc = y - jnp.mean(y, axis=0, keepdims=True)
    hc = y_hat - jnp.mean(y_hat, axis=0, keepdims=True)
    num, den = jnp.sum(yc * hc, axis=0), jnp.sum(hc * hc, axis=0)
  else:
    num, den = jnp.sum(y * y_hat, axis=0), jnp.sum(y_hat * y_hat, axis=0)
  if spec.scale == "site":
    alpha = jnp.full((d_out,), _safe_ratio(jnp.sum(num), jnp.sum(den)))
  elif spec.scale == "channel":
    alpha = _safe_ratio(num, den)
  else:
    alpha = jnp.ones((d_out,), jnp.float32)
  if spec.bias:
    bias = jnp.mean(y, axis=0) - alpha * jnp.mean(y_hat, axis=0)
  else:
    bias = jnp.zeros((d_out,), jnp.float32)
  arrays = {
    "center": center,
    "in_scale": in_scale,
    "token_rescale": token_rescale,
    "out_scale": alpha,
    "out_bias": alpha * center_out + bias,
  }
  zero = jnp.zeros((d_in,), jnp.float32)
  _, x_plain = sparse_operand(x32, pattern, factors, zero, method, channel_order)
  err_plain = y - x_plain @ w32
  err_fit = y - (y_hat * alpha[None, :] + bias[None, :])
  errors = jnp.stack([jnp.sum(err_plain**2), jnp.sum(err_fit**2), jnp.sum(y * y)])
  return arrays, errors


def _site_record(x, weights, site, *, pattern, spec, method, target=None):
  """cond(enabled): the fitted arrays and errors, or the identity for a dense site."""
  w = weights["w"]
  d_in, d_out = w.shape

  def fit(x_, target_):
    return fit_site_correction(
      x_,
      w,
      site["factors"],
      pattern,
      spec,
      method=method,
      target=target_,
      channel_order=site.get("channel_order"),
    )

  def identity(x_, target_):
    if target_ is None:
      target_ = jnp.einsum("...i,io->...o", x_.astype(jnp.float32), w.astype(jnp.float32))
    ref = jnp.sum(jnp.square(target_.astype(jnp.float32)))
    return _identity_site(d_in, d_out), jnp.stack([jnp.zeros(()), jnp.zeros(()), ref])

  return jax.lax.cond(site["enabled"], fit, identity, x, target)


@functools.partial(
  jax.jit, static_argnames=("config", "pattern", "spec", "inputs", "method", "dtype")
)
def _calibration_pass(params, tokens_BxT, sites, *, config, pattern, spec, inputs, method, dtype):
  record = functools.partial(_site_record, pattern=pattern, spec=spec, method=method)
  if inputs == "dense":
    return site_records(
      params,
      tokens_BxT,
      config=config,
      dtype=dtype,
      hook=record_only(lambda x, weights, site: record(x, weights, site)),
      hook_xs=sites,
    )
  # Sequential: the sparse, corrected model runs; each site is fitted on the input it sees,
  # then its corrected output feeds the rest of the forward pass. "global" also runs the dense
  # model, as the first half of a doubled batch (attention never mixes rows), and fits each
  # sparse site to the dense model's output of that site.
  b = tokens_BxT.shape[0]
  if inputs == "global":
    tokens_BxT = jnp.concatenate([tokens_BxT, tokens_BxT])
  linear_spec = LinearSpec(pattern=pattern, mask_method=method)

  def hook(name, x, weights, site, linear):
    del name
    target = y_dense = None
    if inputs == "global":
      x_dense, x = x[:b], x[b:]
      y_dense = linear(x_dense)  # the plan is dense here: the site's plain output
      # The fit's target excludes the site's own bias (added after the correction).
      target = jnp.einsum("...i,io->...o", x_dense, weights["w"].astype(x_dense.dtype))
    arrays, errors = record(x, weights, site, target=target)
    y = site_linear(x, weights, dict(site, correction=arrays), linear_spec)
    return (y if y_dense is None else jnp.concatenate([y_dense, y])), (arrays, errors)

  return site_records(params, tokens_BxT, config=config, dtype=dtype, hook=hook, hook_xs=sites)


@dataclasses.dataclass(frozen=True)
class CorrectionResult:
  """Calibrated corrections: ``plan.replace(correction=result.correction)`` applies them."""

  correction: dict[str, dict[str, jax.Array]]  # proj -> CORRECTION_KEYS -> stacked arrays
  spec: str  # canonical name, e.g. "median+scale_channel+bias"
  inputs: str  # "dense", "sequential" or "global"
  # [n_layers, n_sites] (``config.sites`` order) relative output error ||Y - Y'|| / ||Y|| on the
  # calibration tokens of each sparse site, plain N:M (before) and corrected (after); 0 for
  # dense sites. "sequential": on the inputs of the corrected model; "global": against the
  # dense model's output of the site.
  errors_before: np.ndarray
  errors_after: np.ndarray
  tokens: int
  seconds: float


def calibrate_corrections(
  params,
  plan,
  windows: np.ndarray,
  *,
  config: Architecture,
  correction: str | CorrectionSpec,
  inputs: str = "dense",
  dtype=jnp.float32,
  show_progress: bool = True,
) -> CorrectionResult:
  """Fits ``correction`` for every enabled site of ``plan`` on ``windows`` [W, T] token ids.

  One jitted pass over all windows at once (see the module docstring for ``inputs``). The
  plan's pattern, enabled sites, score factors and mask method define the masks; it must be
  an "xla" plan with float weights. ``correction="none"`` returns the identity arrays.
  """
  spec = CorrectionSpec.parse(correction)
  check_correction_inputs(inputs)
  if plan.pattern is None:
    raise ValueError("plan has no N:M pattern (a dense plan): there is nothing to correct")
  if not get_backend(plan.impl).corrections:
    raise ValueError(f"corrections need plan.impl='xla', got {plan.impl!r}")
  if plan.quant is not None:
    raise ValueError("corrections are for float plans: this plan has a W8A8 part (quant)")
  windows = check_windows(windows)
  start = time.perf_counter()
  names = config.sites.names
  sites = {p: {"enabled": plan.enabled[p], "factors": plan.factors[p]} for p in names}
  for p, order in (plan.channel_order or {}).items():
    sites[p]["channel_order"] = order
  with progress_bar(
    total=len(windows),
    desc=f"corrections {spec} ({inputs})",
    unit="window",
    disable=not show_progress,
  ) as bar:
    records = _calibration_pass(
      params,
      jnp.asarray(windows),
      sites,
      config=config,
      pattern=plan.pattern,
      spec=spec,
      inputs=inputs,
      method=plan.mask_method,
      dtype=dtype,
    )
    records = jax.block_until_ready(records)
    bar.update(len(windows))
  out = {p: dict(records[p][0]) for p in names}
  errors = np.stack([np.asarray(records[p][1], np.float64) for p in names], axis=1)
  ref = np.sqrt(errors[..., 2]) + 1e-12
  return CorrectionResult(
    correction=out,
    spec=str(spec),
    inputs=inputs,
    errors_before=np.sqrt(errors[..., 0]) / ref,
    errors_after=np.sqrt(errors[..., 1]) / ref,
    tokens=int(windows.size),
    seconds=time.perf_counter() - start,
  )
