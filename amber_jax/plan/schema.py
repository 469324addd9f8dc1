"""The sparsity plan: per-site choices as data (a pytree next to params).

A site is one linear of one layer, as the architecture declares it (``config.sites``,
``amber_jax.core.sites``; for Llama ``q, k, v, o, gate, up, down``). For every site the plan
holds, stacked over layers:

* ``enabled[proj]``: bool ``[L]``, whether that site's input is sparsified in prefill;
* ``factors[proj]``: float32 ``[L, d_in]``, the per-input-channel score factors
  (all ones for the naive |x| score).

and optionally ``threshold``, per site a float32 ``[L]`` magnitude threshold (TEAL: the input
keeps the entries with ``|x| > threshold``, unstructured, per token; 0 changes nothing), and
``gate_threshold``, a float32 ``[L]`` threshold on a gated MLP's activation (CATS: the entries of
``silu(gate(x))`` with ``|a| <= t`` are zeroed before the product with ``up(x)``, so ``down``
reads a sparse input and those rows of ``up`` need not be computed); both apply in prefill and,
with ``threshold_decode``, in decode too. They are ``amber_jax.baselines.thresholds``' plans;
a plan may hold them with or without an N:M pattern,

and optionally ``quant``, the W8A8 part (``amber_jax.plan.quant_state.QuantState``: smoothed
int8 weights, scales, folded norms, float sites), and ``correction``, per-site output
corrections of the sparse sites calibrated by ``amber_jax.calibrate.correction_fit`` (arrays stacked
over layers; None: no correction, the plain N:M transform), and ``channel_order``, per projection
a permutation of its input channels per layer that forms the N:M groups
(``amber_jax.plan.channel_order``; None, or a projection left out: M consecutive channels).

Only the N:M pattern (and the implementation choices) are static: they fix shapes and
code inside the mask computation; changing which sites are enabled or the factors
re-uses the compiled function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from amber_jax.core.backends import check_impl, default_impl
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sites import Architecture, Site
from amber_jax.core.sparsity import MASK_METHODS, check_channel_order

# ------------------------------------------------------------------------------------------------
# The schema: every per-site array a plan can hold, with its axes. Plan I/O, its checks, the
# sharding of a plan and the identity values derive from this table, so a new per-site field is
# one entry here (and the step of ``amber_jax.core.linear`` that reads it).


@dataclasses.dataclass(frozen=True)
class SiteField:
  """One per-site array of a plan: where it sits (``group``, and ``key`` inside a group of
  arrays), its axes after the leading layer axis (an expert site adds its expert axis after
  that), "in" (the site's input channels) or "out" (its output channels), and its dtype.
  ``whole``: the array is used whole by every device (a permutation of the entire input), so a
  sharded plan replicates it. ``decode``: the site's linear reads it in decode too (the W8A8
  part); the other fields belong to the N:M step, which only prefill runs."""

  group: str
  key: str | None
  axes: tuple[str, ...]
  dtype: str
  doc: str
  whole: bool = False
  decode: bool = False
  every_site: bool = True  # False: only some sites have it (a channel order of o alone)
  per_expert: bool = True  # False: one entry per layer even on an expert site (``enabled``)

  @property
  def name(self) -> str:
    return self.group if self.key is None else f"{self.group}/{self.key}"

  def shape(self, site: Site, n_layers: int) -> tuple[int, ...]:
    """The array's shape for ``site`` of a model of ``n_layers`` layers."""
    experts = (site.experts,) if site.experts and self.per_expert else ()
    dims = {"in": site.d_in, "out": site.d_out}
    return (n_layers, *experts, *(dims[a] for a in self.axes))


_F32, _BOOL = "float32", "bool"
SITE_FIELDS: tuple[SiteField, ...] = (
  SiteField(
    "enabled", None, (), _BOOL, "the site's input is N:M-sparsified in prefill", per_expert=False
  ),
  SiteField("factors", None, ("in",), _F32, "score factors: the score is |x| * factors"),
  SiteField(
    "channel_order",
    None,
    ("in",),
    "int32",
    "the N:M groups are consecutive in x[order]",
    whole=True,
    every_site=False,
  ),
  SiteField(
    "threshold",
    None,
    (),
    _F32,
    "keep the input entries with |x| > threshold (0: all)",
    every_site=False,
    per_expert=False,
  ),
  SiteField("correction", "center", ("in",), _F32, "input shift before selection"),
  SiteField("correction", "in_scale", ("in",), _F32, "per-input-channel rescale of kept values"),
  SiteField("correction", "token_rescale", (), _F32, "1: rescale each token's kept norm"),
  SiteField("correction", "out_scale", ("out",), _F32, "per-output-channel scale"),
  SiteField("correction", "out_bias", ("out",), _F32, "per-output-channel bias"),
  *(
    SiteField("quant", key, axes, dtype, doc, decode=True)
    for key, axes, dtype, doc in (
      ("w_q", ("in", "out"), "int8", "smoothed int8 weight"),
      ("w_scale", ("out",), _F32, "per-output-channel weight scale"),
      ("act_div", ("in",), _F32, "what the input is divided by (smoothing)"),
      ("fold", ("in",), _F32, "smoothing folded into the preceding norm"),
      ("act_scale", (), _F32, "static per-tensor activation scale"),
      ("in_float", (), _BOOL, "the site keeps its float weight"),
      ("act_absmax", ("in",), _F32, "calibration max |input| per channel"),
    )
  ),
)
# The plan's per-site groups in schema order, and whether the linear reads each in decode.
PLAN_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(f.group for f in SITE_FIELDS))
GROUP_IN_DECODE = {g: any(f.decode for f in SITE_FIELDS if f.group == g) for g in PLAN_GROUPS}
# The groups whose arrays are a dict of keys per site, and each group's keys.
GROUP_KEYS: dict[str, tuple[str, ...]] = {
  g: tuple(f.key for f in SITE_FIELDS if f.group == g) for g in ("correction", "quant")
}
# A W8A8 plan's folded norm weights ([L, D] per norm that sites fold into): not per site.
NORM_FIELD = SiteField("quant", "norms", ("model",), _F32, "RMSNorm weight with smoothing folded")
# A CATS plan's threshold on the gated MLP activation ([L]): one per layer, not per site.
GATE_THRESHOLD_FIELD = SiteField(
  "gate_threshold", None, (), _F32, "zero silu(gate(x)) entries with |a| <= t (CATS)"
)
_FIELDS = {(f.group, f.key): f for f in SITE_FIELDS}


def leaf_field(names: tuple[str, ...]) -> tuple[str | None, SiteField]:
  """(site name, field) of a plan leaf from its tree path as names, e.g. ("factors", "q"),
  ("correction", "o", "out_bias"), ("quant", "sites", "down", "w_q"); (None, NORM_FIELD) for
  ("quant", "norms", name). ValueError for a path outside the schema."""
  match names:
    case (group, site) if (group, None) in _FIELDS:
      return site, _FIELDS[(group, None)]
    case ("correction", site, key) if ("correction", key) in _FIELDS:
      return site, _FIELDS[("correction", key)]
    case ("quant", "sites", site, key) if ("quant", key) in _FIELDS:
      return site, _FIELDS[("quant", key)]
    case ("quant", "norms", _):
      return None, NORM_FIELD
    case ("gate_threshold",):
      return None, GATE_THRESHOLD_FIELD
  raise ValueError(
    f"no plan field at {'/'.join(names)!r}: a plan holds "
    f"{', '.join(sorted({f.name for f in SITE_FIELDS}))} per site "
    "(amber_jax.plan.schema.SITE_FIELDS)"
  )


def tree_names(path) -> tuple[str, ...]:
  """A pytree key path as plain names: ("layers", "q", "w"), ("quant", "sites", "o", "w_q")."""
  out = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(str(getattr(key, attr)))
        break
    else:
      out.append(str(key))
  return tuple(out)


def identity_arrays(group: str, config: Architecture) -> dict[str, dict[str, jax.Array]]:
  """site -> key -> the arrays of ``group`` ("correction") that change nothing, per the schema:
  zeros for shifts, biases and flags, ones for scales."""
  ones = {"in_scale", "out_scale"}
  out = {}
  for site in config.sites:
    out[site.name] = {}
    for key in GROUP_KEYS[group]:
      f = _FIELDS[(group, key)]
      fill = jnp.ones if key in ones else jnp.zeros
      out[site.name][key] = fill(f.shape(site, config.n_layers), f.dtype)
  return out


def check_group_arrays(config: Architecture, group: str, tree) -> None:
  """ValueError naming the entry unless ``tree`` (site -> array, or site -> key -> array for a
  keyed group such as ``correction`` or the W8A8 ``quant.sites``) covers the sites the schema
  asks for (every site of ``config``, or any of them for a group like ``channel_order``) with
  exactly the group's keys and the schema's shape for each array."""
  sites = config.sites
  keys = GROUP_KEYS.get(group, (None,))
  every_site = _FIELDS[(group, keys[0])].every_site
  if not isinstance(tree, dict) or (set(tree) != set(sites.names) if every_site else False):
    raise ValueError(f"{group} must map every site {sites.names} to its arrays, got {tree!r:.80}")
  unknown = sorted(set(tree) - set(sites.names))
  if unknown:
    raise ValueError(f"{group} has unknown projection {unknown[0]!r}; valid: {sites.names}")
  for name, arrays in tree.items():
    if keys != (None,) and (not isinstance(arrays, dict) or set(arrays) != set(keys)):
      raise ValueError(f"{group}[{name!r}] must have exactly the keys {keys}")
    for key in keys:
      a = arrays if key is None else arrays[key]
      want = _FIELDS[(group, key)].shape(sites[name], config.n_layers)
      if tuple(np.shape(a)) != want:
        where = f"{group}[{name!r}]" + ("" if key is None else f"[{key!r}]")
        raise ValueError(f"{where} must have shape {want}, got {tuple(np.shape(a))}")


def check_plan_arrays(config: Architecture, plan: SparsityPlan) -> None:
  """ValueError naming the entry unless every group of ``plan`` fits the schema for the sites
  of ``config`` (``check_group_arrays``), and every channel order is a permutation."""
  for group in PLAN_GROUPS:
    arrays = plan.group_arrays(group)
    if arrays is not None:
      check_group_arrays(config, group, arrays)
  if plan.channel_order is not None:
    check_plan_channel_order(config, {p: np.asarray(o) for p, o in plan.channel_order.items()})
  check_thresholds(config, plan.threshold, plan.gate_threshold)


def check_thresholds(config: Architecture, threshold, gate_threshold) -> None:
  """ValueError naming the entry unless every activation threshold is finite, >= 0 and of
  shape [L] (``threshold``: site -> [L]; ``gate_threshold``: [L], only for a gated MLP)."""
  entries = dict(threshold or {})
  if threshold is not None:
    check_group_arrays(config, "threshold", dict(threshold))
  if gate_threshold is not None:
    if "gate" not in config.sites.names:
      raise ValueError(
        f"gate_threshold needs a gated MLP (a 'gate' site); sites: {config.sites.names}"
      )
    entries["gate_threshold"] = gate_threshold
  for name, t in entries.items():
    t = np.asarray(t)
    if t.shape != (config.n_layers,):
      raise ValueError(f"threshold {name!r} must have shape ({config.n_layers},), got {t.shape}")
    if not (np.isfinite(t).all() and (t >= 0).all()):
      raise ValueError(f"threshold {name!r} must be finite and >= 0, got {t.tolist()}")


@struct.dataclass
class SparsityPlan:
  """Which linear inputs are sparsified in prefill, and with which score factors."""

  enabled: dict[str, jax.Array]  # proj -> bool [L]
  factors: dict[str, jax.Array]  # proj -> float32 [L, d_in] ([L, E, d_in] on an expert site)
  pattern: NMPattern | None = struct.field(pytree_node=False, default=None)
  impl: str = struct.field(pytree_node=False, default="xla")  # see amber_jax.core.backends
  # impl="xla": the mask algorithm (amber_jax.core.sparsity.nm_mask); all give the same mask.
  mask_method: str = struct.field(pytree_node=False, default="auto")
  # W8A8 part (amber_jax.plan.quant_state.QuantState) or None for float weights.
  quant: Any = None
  # Output corrections of sparse sites in prefill (amber_jax.calibrate.correction_fit: proj ->
  # center, in_scale, token_rescale, out_scale, out_bias stacked over layers) or None for none.
  correction: Any = None
  # proj -> int32 [L, d_in]: the groups of M are consecutive in x[..., order[l]] (see
  # amber_jax.core.sparsity.nm_keep); projections not in the dict (or None) use the natural order.
  channel_order: dict[str, jax.Array] | None = None
  # proj -> float32 [L]: magnitude thresholds of the sites' inputs (TEAL); None: none.
  threshold: dict[str, jax.Array] | None = None
  # float32 [L]: threshold on the gated MLP activation silu(gate(x)) (CATS); None: none.
  gate_threshold: jax.Array | None = None
  # Whether the thresholds (threshold, gate_threshold) also apply in decode (TEAL and CATS
  # target decode; the N:M transform never does).
  threshold_decode: bool = struct.field(pytree_node=False, default=False)

  @property
  def has_thresholds(self) -> bool:
    """Whether the plan holds activation thresholds (TEAL or CATS)."""
    return self.threshold is not None or self.gate_threshold is not None

  def enabled_sites(self) -> list[tuple[int, str]]:
    """(layer, site) pairs that are sparsified, in layer-major, block order."""
    flags = {p: np.asarray(v) for p, v in self.enabled.items()}
    n_layers = len(next(iter(flags.values())))
    return [(l, p) for l in range(n_layers) for p in flags if flags[p][l]]

  def site_rows(self, *, sparse: bool = True) -> dict | None:
    """The plan as the layer scan reads it, every array stacked over layers: ``{"sites": name
    -> row, "norms": folded RMSNorm weights or None}``, where a row holds what the site's linear
    uses (``amber_jax.core.linear``): ``enabled``, ``factors``, and where present
    ``channel_order`` and ``correction`` (only when ``sparse``: decode runs no N:M step), and
    ``quant`` (the W8A8 part, in prefill and decode). None when nothing applies (a dense plan,
    or decode of a float plan). The one place a plan is sliced per site."""
    nm = sparse and self.pattern is not None
    thresholds = self.has_thresholds and (sparse or self.threshold_decode)
    if not nm and self.quant is None and not thresholds:
      return None
    groups = [
      g for g in PLAN_GROUPS if nm or GROUP_IN_DECODE[g] or (g == "threshold" and thresholds)
    ]
    sites = {}
    for name in self.enabled:
      row = {}
      for group in groups:
        arrays = self.group_arrays(group)
        if arrays is not None and name in arrays:
          row[group] = arrays[name]
      sites[name] = row
    return {
      "sites": sites,
      "norms": None if self.quant is None else self.quant.norms,
      "gate_threshold": self.gate_threshold if thresholds else None,
    }

  def group_arrays(self, group: str) -> dict | None:
    """site -> the arrays of ``group`` (one of ``PLAN_GROUPS``), or None where the plan has none
    (the W8A8 group's are ``quant.sites``)."""
    if group == "quant":
      return None if self.quant is None else self.quant.sites
    return getattr(self, group)


def dense_plan(config: Architecture) -> SparsityPlan:
  """A plan that sparsifies nothing (pattern None): exactly the dense model."""
  return make_plan(config, None, sites=())


def make_plan(
  config: Architecture,
  pattern: NMPattern | str | None,
  *,
  sites: Iterable[tuple[int, str]] | str = "all",
  factors: Mapping[str, np.ndarray] | None = None,
  impl: str | None = None,
  mask_method: str = "auto",
  channel_order: Mapping[str, np.ndarray] | None = None,
) -> SparsityPlan:
  """Builds a plan.

  Args:
    config: the model configuration (gives L and its sites with their input widths).
    pattern: N:M pattern, "N:M", or None for dense.
    sites: "all" (every projection of every layer) or an iterable of
      (layer, projection) pairs to sparsify.
    factors: optional proj -> [L, d_in] score factors (default: ones, the |x| score);
      [L, E, d_in] for an expert site.
    impl: "xla", "pallas" (the fused kernel) or "pallas_mask" (mask pass + dot); None picks
      the backend's default (xla everywhere for now: see amber_jax.core.backends). An impl that
      cannot run raises ValueError.
    mask_method: the mask algorithm of impl "xla" (amber_jax.core.sparsity.nm_mask).
    channel_order: optional proj -> [L, d_in] permutations of each layer's input channels
      that form the N:M groups (amber_jax.plan.channel_order.model_channel_order makes them).

  Raises:
    ValueError: naming the projection, if M does not divide a sparsified input
      width, if a site is out of range, or if a channel order is not a permutation.
  """
  pattern = None if pattern is None else NMPattern.parse(pattern)
  impl = check_impl(default_impl() if impl is None else impl, pattern)
  if mask_method not in ("auto", *MASK_METHODS):
    raise ValueError(f"mask_method must be 'auto' or one of {MASK_METHODS}, got {mask_method!r}")
  n_layers = config.n_layers
  names = config.sites.names
  shapes = {s.name: s.shape for s in config.sites}
  enabled = {p: np.zeros((n_layers,), bool) for p in names}
  if pattern is not None:
    if isinstance(sites, str):
      if sites != "all":
        raise ValueError(f"sites must be 'all' or (layer, projection) pairs, got {sites!r}")
      sites = [(l, p) for l in range(n_layers) for p in names]
    for layer, proj in sites:
      if proj not in names:
        raise ValueError(f"unknown projection {proj!r}; valid: {', '.join(names)}")
      if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
      enabled[proj][layer] = True
    for proj in names:
      if enabled[proj].any():
        pattern.check_width(shapes[proj][0], where=f"{proj}-projection input")
  unknown = sorted(set(factors or {}) - set(names))
  if unknown:
    raise ValueError(f"factors has unknown projections {unknown}; valid: {', '.join(names)}")
  out_factors = {}
  for proj in names:
    want = _FIELDS[("factors", None)].shape(config.sites[proj], n_layers)
    f = np.ones(want, np.float32)
    if factors is not None and proj in factors:
      f = np.asarray(factors[proj], np.float32)
      if f.shape != want:
        raise ValueError(f"factors[{proj!r}] must have shape {want}, got {f.shape}")
      if not (np.isfinite(f).all() and (f >= 0).all()):
        raise ValueError(
          f"factors[{proj!r}] must be finite and >= 0 (score = |x| * factor), got "
          f"{int((f < 0).sum())} negative and {int((~np.isfinite(f)).sum())} non-finite entries"
        )
    out_factors[proj] = jnp.asarray(f)
  return SparsityPlan(
    enabled={p: jnp.asarray(v) for p, v in enabled.items()},
    factors=out_factors,
    pattern=pattern,
    impl=impl,
    mask_method=mask_method,
    channel_order=check_plan_channel_order(config, channel_order),
  )


def check_plan_channel_order(
  config: Architecture, channel_order: Mapping[str, np.ndarray] | None
) -> dict[str, jax.Array] | None:
  """``channel_order`` as the plan stores it (int32 jax arrays; None for an empty mapping),
  after checking that every row is a permutation of its projection's input channels."""
  if not channel_order:
    return None
  shapes = {s.name: s.shape for s in config.sites}
  out = {}
  for proj, order in channel_order.items():
    if proj not in shapes:
      raise ValueError(f"channel_order has unknown projection {proj!r}; valid: {tuple(shapes)}")
    if config.sites[proj].experts:
      raise ValueError(f"channel_order[{proj!r}]: channel orders of expert sites are not supported")
    order = np.asarray(order)
    d_in = shapes[proj][0]
    if order.shape != (config.n_layers, d_in):
      raise ValueError(
        f"channel_order[{proj!r}] must have shape {(config.n_layers, d_in)}, got {order.shape}"
      )
    for layer, row in enumerate(order):
      check_channel_order(row, d_in, where=f"channel_order[{proj!r}][{layer}]")
    out[proj] = jnp.asarray(order, jnp.int32)
  return out
