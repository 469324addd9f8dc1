"""Saving and restoring a calibrated plan (N:M sites, score factors, W8A8 part) with orbax.

The arrays go through ``amber_jax.io.plan_checkpoint`` (atomic, per-leaf SHA-256, clear
errors for truncated, corrupt or mismatched checkpoints); the plan's static fields
(pattern, impl, mask algorithm, W8A8 activation mode and order, whether thresholds apply in
decode) travel in the metadata (output corrections, channel orders and activation thresholds,
if any, are arrays like the rest), so a restored plan is the saved one, bit for bit.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from amber_jax.core.backends import BACKENDS
from amber_jax.core.patterns import NMPattern
from amber_jax.core.quant import ACT_MODES
from amber_jax.core.sites import Architecture
from amber_jax.core.sparsity import MASK_METHODS
from amber_jax.io.plan_checkpoint import PlanCheckpointError, load_plan, save_plan
from amber_jax.plan.quant_state import ORDERS, QuantState
from amber_jax.plan.schema import PLAN_GROUPS, SparsityPlan, check_plan_arrays

__all__ = ["PlanCheckpointError", "load_sparsity_plan", "save_sparsity_plan"]


def _static(plan: SparsityPlan) -> dict:
  static = {
    "pattern": None if plan.pattern is None else str(plan.pattern),
    "impl": plan.impl,
    "mask_method": plan.mask_method,
    "quant": None,
    "threshold_decode": plan.threshold_decode,
  }
  if plan.quant is not None:
    static["quant"] = {"act_mode": plan.quant.act_mode, "order": plan.quant.order}
  return static


def save_sparsity_plan(path: str | os.PathLike, plan: SparsityPlan, *, metadata: dict) -> None:
  """Writes ``plan`` to the directory ``path`` (atomically), with the caller's ``metadata``
  (e.g. model, config, pattern, quant options: what ``load_sparsity_plan(expect=...)`` checks)."""
  # Every per-site group of the schema the plan holds; the W8A8 part with its folded norms.
  tree = {g: plan.group_arrays(g) for g in PLAN_GROUPS if g != "quant"}
  tree = {g: arrays for g, arrays in tree.items() if arrays is not None}
  if plan.quant is not None:
    tree["quant"] = {"sites": plan.quant.sites, "norms": plan.quant.norms}
  if plan.gate_threshold is not None:
    tree["gate_threshold"] = plan.gate_threshold
  save_plan(path, tree, metadata={**metadata, "plan_static": _static(plan)})


def _check_static(path, static: dict) -> None:
  """The restored static fields are ones this version can run (PlanCheckpointError if not)."""

  def bad(field, value, valid):
    raise PlanCheckpointError(
      f"plan checkpoint {os.fspath(path)!r}: {field} must be one of {valid}, got {value!r}"
    )

  if static.get("impl") not in BACKENDS:
    bad("impl", static.get("impl"), tuple(BACKENDS))
  if static.get("mask_method") not in ("auto", *MASK_METHODS):
    bad("mask_method", static.get("mask_method"), ("auto", *MASK_METHODS))
  quant = static.get("quant")
  if quant is not None:
    if quant.get("act_mode") not in ACT_MODES:
      bad("quant act_mode", quant.get("act_mode"), ACT_MODES)
    if quant.get("order") not in ORDERS:
      bad("quant order", quant.get("order"), ORDERS)


def load_sparsity_plan(
  path: str | os.PathLike, *, expect: dict | None = None, config: Architecture | None = None
) -> tuple[SparsityPlan, dict]:
  """Restores a plan saved by ``save_sparsity_plan``; ``expect`` entries must match the
  saved metadata (else PlanCheckpointError naming the key and both values). The static fields
  (impl, mask algorithm, W8A8 mode and order) are checked to be valid; with ``config`` the
  arrays are too: site flags and factors of the model's shapes, channel orders that are
  permutations, output corrections of the right layout."""
  tree, metadata = load_plan(path, expect=expect)
  static = metadata.get("plan_static")
  if not isinstance(static, dict):
    raise PlanCheckpointError(f"plan checkpoint {os.fspath(path)!r} has no plan_static metadata")
  _check_static(path, static)
  as_jnp = lambda d: {k: as_jnp(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in d.items()}
  quant = None
  if static.get("quant") is not None:
    quant = QuantState(
      sites=as_jnp(tree["quant"]["sites"]),
      norms=as_jnp(tree["quant"]["norms"]),
      act_mode=static["quant"]["act_mode"],
      order=static["quant"]["order"],
    )
  groups = {g: as_jnp(tree[g]) for g in PLAN_GROUPS if g != "quant" and g in tree}
  plan = SparsityPlan(
    **groups,
    pattern=None if static["pattern"] is None else NMPattern.parse(static["pattern"]),
    impl=static["impl"],
    mask_method=static["mask_method"],
    quant=quant,
    gate_threshold=None if "gate_threshold" not in tree else jnp.asarray(tree["gate_threshold"]),
    threshold_decode=bool(static.get("threshold_decode", False)),
  )
  if config is not None:
    try:
      check_plan_arrays(config, plan)
    except ValueError as e:
      raise PlanCheckpointError(f"plan checkpoint {os.fspath(path)!r}: {e}") from None
  return plan, metadata
