"""Meshes and partition specs: tensor-parallel (Megatron) and optional FSDP sharding of the model.

One 2-D mesh with axes ``("data", "model")``:

* ``"model"`` (tensor parallelism, Megatron-LM style): q/k/v and gate/up are column-parallel
  (their output dim, i.e. whole attention heads and FFN columns, is split), o and down are
  row-parallel (their input dim is split). Each device then computes attention for its own heads
  and the SwiGLU for its own FFN columns with no communication; o and down produce partial sums
  that one all-reduce each completes (two per layer). The residual stream stays replicated over
  ``"model"``. The mesh's "model" size must divide the query heads, the KV heads and the FFN
  width (:func:`check_mesh`).
* ``"data"``: the batch is split over it (:func:`shard_batch`). With ``fsdp=True`` the other dim
  of every projection matrix (d_model for all seven) is split over ``"data"`` too, to be
  all-gathered one layer at a time inside the layer scan. XLA only chooses that if the model
  pins the activations' batch axis (:func:`constrain_batch`); from the input shardings alone
  it reshards the activations instead (measured in tests/test_sharding.py).
* The embedding and the LM head are vocab-parallel over ``"model"`` by default: the
  ``[V, D]`` table is the largest single tensor of a small model (21% of SmolLM2-135M's
  multiply-adds are in the LM head), so splitting it splits that work and memory; the
  lookup becomes a masked local gather plus one all-reduce of ``[B, T, D]``, and the log-softmax
  and argmax over the vocabulary reduce ``[B, T]`` statistics across devices (never logits).
  ``vocab_parallel=False`` replicates both instead (no collectives there; every device holds
  and multiplies the whole head).
* Norm weights, per-layer flags and scalars are replicated; the layer axis (scanned) is
  never split.

Plans follow the weights they belong to: a site's per-input-channel vectors (score factors,
smoothing divisors, folded scales, calibration absmax, all ``[L, d_in]``) are split over
``"model"`` exactly where that site's input is (o and down), so the N:M mask (groups of M never
straddle devices: a device holds whole heads / FFN columns) and the smoothing are computed on
each device's slice of the input; W8A8 ``w_q`` is split as the float weight, its
per-output-channel ``w_scale`` as the output dim. The per-token int8 scale of o/down inputs
reduces its absmax across "model"; their int32 partial sums all-reduce exactly.

No model code changes: jit with sharded inputs lets XLA's SPMD partitioner insert the
collectives. The math is the single-device math; float rounding is not (o/down partial sums are
reordered, and each program is compiled its own way), which N:M masks and int8 codes can turn
into a different selection where a value sits within rounding of a tie or a code boundary.

Multi-host: call ``jax.distributed.initialize()`` first; ``make_mesh`` then spans every
process's devices (keep "model" within a host: consecutive devices are a host's),
``shard_params``/``shard_plan`` build each global array from the (same) host copy through
``jax.make_array_from_callback`` (each process places only its own shards), and
``shard_batch(..., process_local=True)`` assembles the global batch from each process's rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from amber_jax.core.sites import Site, SiteSet
from amber_jax.plan.schema import leaf_field, tree_names

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


# ------------------------------------------------------------------------------------------------
# Meshes.


def make_mesh(
  *,
  data: int = 1,
  model: int = 1,
  devices: Sequence[jax.Device] | None = None,
  config=None,
  batch_size: int | None = None,
  fsdp: bool = False,
) -> Mesh:
  """A ``(data, model)`` mesh of ``devices`` (default: every device of every process).

  ``config`` and ``batch_size`` (optional) are checked against the mesh at once (see
  :func:`check_mesh`), so a bad shape fails here rather than deep inside a jit. The mesh's
  axes are ``Auto`` (XLA propagates shardings from the inputs), whatever ``jax.make_mesh``
  defaults to.

  Raises:
    ValueError: naming the argument, if ``data`` or ``model`` is < 1, if ``data * model`` is
      not the number of devices, or if the mesh does not divide the model or the batch.
  """
  for name, size in (("data", data), ("model", model)):
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"{name} must be a positive integer (mesh axis size), got {name}={size!r}")
  devices = list(jax.devices() if devices is None else devices)
  need = data * model
  if need != len(devices):
    hint = f"; to use a subset pass devices=jax.devices()[:{need}]" if need < len(devices) else ""
    raise ValueError(
      f"the mesh data={data} x model={model} needs {need} devices, but devices has "
      f"{len(devices)}: data * model must be the device count{hint}"
    )
  mesh = jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
  check_mesh(mesh, config=config, batch_size=batch_size, fsdp=fsdp)
  return mesh


def check_mesh(
  mesh: Mesh,
  *,
  config=None,
  batch_size: int | None = None,
  fsdp: bool = False,
  vocab_parallel: bool = True,
) -> None:
  """Checks that ``mesh`` can shard this model and batch: whole heads and FFN columns per device.

  The ``"model"`` axis must divide the query heads, the KV heads (grouped-query attention keeps
  a KV head with its query heads), the FFN width and, with ``vocab_parallel``, the vocabulary;
  ``"data"`` must divide ``batch_size`` and, with ``fsdp``, d_model.

  Raises:
    ValueError: naming the mesh axis and the model dimension it does not divide.
  """
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(f"mesh must have axes {AXES}, got mesh.axis_names={tuple(mesh.axis_names)}")
  model, data = mesh.shape[MODEL], mesh.shape[DATA]
  if config is not None:
    dims = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads}
    moe = getattr(config, "moe", None)
    if moe is None:
      dims["d_ff"] = config.d_ff
    else:  # expert parallel: whole experts per device
      dims["n_experts"] = moe.n_experts
    if vocab_parallel:
      dims["vocab_size"] = config.vocab_size
    for name, size in dims.items():
      if size % model:
        raise ValueError(
          f"model={model} (mesh axis 'model') must divide the model's {name}={size}; "
          f"valid model sizes: {_divisors_of_all(dims.values())}"
        )
    if fsdp and config.d_model % data:
      raise ValueError(
        f"data={data} (mesh axis 'data') must divide d_model={config.d_model} with fsdp=True"
      )
  if batch_size is not None and batch_size % data:
    raise ValueError(
      f"data={data} (mesh axis 'data') must divide the batch: batch_size={batch_size}"
    )


def _divisors_of_all(sizes) -> list[int]:
  g = math.gcd(*sizes)
  return [d for d in range(1, g + 1) if g % d == 0]


# ------------------------------------------------------------------------------------------------
# Partition specs.


def _matrix_spec(site: Site, fsdp: bool) -> P:
  """[L, d_in, d_out]: Megatron split over "model", the other dim over "data" with FSDP. An
  expert site [L, E, d_in, d_out] is expert parallel: its experts split over "model", each
  device holding whole experts (d_model over "data" with FSDP)."""
  other = DATA if fsdp else None
  if site.experts:
    d_model_axis = 0 if site.parallel == "column" else 1  # gate/up read d_model, down writes it
    return P(None, MODEL, *((other, None) if d_model_axis == 0 else (None, other)))
  if site.parallel == "column":
    return P(None, other, MODEL)
  return P(None, MODEL, other)


def _axis_spec(site: Site, axis: str) -> str | None:
  """The mesh axis a site's "in" or "out" channel axis is split over (None: replicated)."""
  if axis == "in":
    return MODEL if site.parallel == "row" else None
  return MODEL if site.parallel == "column" else None


def _vector_spec(site: Site, axes: tuple[str, ...], per_expert: bool = True) -> P:
  """[L, (E,) channels] per-channel vectors: split like the site's weight on that axis (an
  expert site's over its experts, its channels whole)."""
  if site.experts:
    return P(None, MODEL, *(None for _ in axes)) if per_expert else P()
  split = tuple(_axis_spec(site, a) for a in axes)
  return P(None, *split) if any(split) else P()


def _param_spec(names: tuple[str, ...], sites: SiteSet, *, fsdp: bool, vocab_parallel: bool) -> P:
  norms = {s.folds_into for s in sites if s.folds_into is not None}  # the pre-norms sites read
  match names:
    case ("embed",):  # [V, D]
      return P(MODEL, None) if vocab_parallel else P()
    case ("lm_head",):  # [D, V]
      return P(None, MODEL) if vocab_parallel else P()
    case ("final_norm",):
      return P()
    case ("layers", name) if name in norms:  # [L, D] norm weights
      return P()
    case ("layers", "q_norm" | "k_norm" | "router"):  # [L, head_dim], the router [L, D, E]
      return P()
    case ("layers", name, "w") if name in sites.names:
      return _matrix_spec(sites[name], fsdp)
    case ("layers", name, "b") if name in sites.names:
      return _vector_spec(sites[name], ("out",))
  raise ValueError(
    f"no partition rule for params leaf {'/'.join(names)!r}: amber_jax.plan.sharding knows the "
    f"embedding, LM head, norms and the weights of the declared sites ({', '.join(sites.names)})"
  )


def _plan_spec(names: tuple[str, ...], sites: SiteSet, *, fsdp: bool) -> P:
  # From the plan schema (amber_jax.plan.schema.SITE_FIELDS): each array is split like the channel
  # axis of the site it belongs to. A channel order (o_order="mixed") permutes a site's whole
  # input: replicated. The computation stays exact (GSPMD gathers the sharded o input where a
  # group crosses devices); the price is that all-gather of the o input on every sparse o site.
  try:
    site, field = leaf_field(names)
  except ValueError as e:
    raise ValueError(f"no partition rule for plan leaf {'/'.join(names)!r}: {e}") from None
  if site is None or field.whole:  # folded norm weights, whole-input permutations
    return P()
  if site not in sites.names:
    raise ValueError(f"plan leaf {'/'.join(names)!r} names no declared site ({sites.names})")
  if field.axes == ("in", "out"):  # the int8 weight: split as the float one
    return _matrix_spec(sites[site], fsdp)
  return _vector_spec(sites[site], field.axes, field.per_expert)


def param_specs(params, *, sites: SiteSet, fsdp: bool = False, vocab_parallel: bool = True):
  """The PartitionSpec of every params leaf (same tree structure as ``params``), from the
  architecture's declared ``sites`` (``config.sites``: each site's "column"/"row" split).

  Raises:
    ValueError: naming the leaf, for a leaf outside the model's layout.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _param_spec(tree_names(path), sites, fsdp=fsdp, vocab_parallel=vocab_parallel),
    params,
  )


def plan_specs(plan, *, sites: SiteSet, fsdp: bool = False):
  """The PartitionSpec of every leaf of a SparsityPlan (with or without its W8A8 ``quant``),
  derived from the plan schema and the declared ``sites``.

  Returns a SparsityPlan of the same structure whose leaves are PartitionSpecs (usable as
  ``jax.jit`` in/out shardings after wrapping in NamedSharding).
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _plan_spec(tree_names(path), sites, fsdp=fsdp), plan
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays of any rank ([B], [B, T], [B, T, T], ...): rows split over "data", the rest
  whole (and replicated over "model")."""
  return NamedSharding(mesh, P(DATA))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Inside jit: pin ``x``'s leading (batch) axis to "data" of the ambient mesh, if any.

  A no-op unless a mesh with a "data" axis is set (``with jax.set_mesh(mesh): ...``), so model
  code may call it unconditionally; numerics are unchanged. Meant for the residual stream (or
  each projection's input). Measured in tests/test_sharding.py: (1) a batch passed as numpy
  (as ``eval.perplexity`` and ``eval.multiple_choice`` pass theirs) is then split over "data"
  instead of replicated (every data replica computing the whole batch), and (2) with
  ``fsdp=True`` XLA then all-gathers each layer's weight slices inside the scan instead of
  resharding the activations. The model does not call it yet (one line at the top of the
  layer scan's body in ``model.llama.model_pass``, ``h = constrain_batch(h)``, would).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA not in mesh.axis_names:
    return x
  # Only the batch axis is pinned; the others stay free, so an activation that is split over
  # "model" the Megatron way (the input of o and down) stays split.
  return jax.lax.with_sharding_constraint(x, P(DATA, *[P.UNCONSTRAINED] * (x.ndim - 1)))


# ------------------------------------------------------------------------------------------------
# Placement.


def _check_divisible(names: tuple[str, ...], shape, spec: P, mesh: Mesh, what: str) -> None:
  if len(spec) > len(shape):
    raise ValueError(
      f"{what} leaf {'/'.join(names)!r} has shape {tuple(shape)}, too few axes for {spec}"
    )
  for dim, axis in enumerate(spec):
    if axis is None:
      continue
    size = mesh.shape[axis]
    if shape[dim] % size:
      raise ValueError(
        f"{what} leaf {'/'.join(names)!r} of shape {tuple(shape)}: axis {dim} "
        f"({shape[dim]}) is not divisible by the mesh's {axis!r} size {size}"
      )


def _place(x, sharding: NamedSharding):
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  # Multi-host: every process holds the whole (same) value and places only its own shards.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _shard_tree(tree, specs, mesh: Mesh, what: str):
  def one(path, x, spec):
    _check_divisible(tree_names(path), np.shape(x), spec, mesh, what)
    return _place(x, NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, tree, specs)


def shard_params(params, mesh: Mesh, *, config, fsdp: bool = False, vocab_parallel: bool = True):
  """Places ``params`` on ``mesh`` by :func:`param_specs` (tensor parallel, optional FSDP).

  ``config`` gives the declared sites (how each weight splits) and is checked to put whole
  heads on each device (:func:`check_mesh`).

  Raises:
    ValueError: naming the leaf or the model dimension that the mesh does not divide.
  """
  check_mesh(mesh, config=config, fsdp=fsdp, vocab_parallel=vocab_parallel)
  specs = param_specs(params, sites=config.sites, fsdp=fsdp, vocab_parallel=vocab_parallel)
  return _shard_tree(params, specs, mesh, "params")


def shard_plan(plan, mesh: Mesh, *, config, fsdp: bool = False):
  """Places a SparsityPlan (and its W8A8 part) on ``mesh``, consistently with shard_params
  (``config`` gives the declared sites).

  ``fsdp`` must be the value given to :func:`shard_params` (the int8 weights are split as the
  float ones). A dense plan (``None``) is returned as is.
  """
  if plan is None:
    return None
  return _shard_tree(plan, plan_specs(plan, sites=config.sites, fsdp=fsdp), mesh, "plan")


def shard_batch(x, mesh: Mesh, *, process_local: bool = False) -> jax.Array:
  """A batch array ([B, ...]) with its rows split over "data" (replicated over "model").

  ``process_local=True`` (multi-host): ``x`` holds only this process's rows, in process order,
  and the global batch is assembled from every process's part.

  Raises:
    ValueError: naming the batch size, if "data" does not divide it.
  """
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  if x.ndim < 1:
    raise ValueError(f"a batch array needs a leading batch axis, got shape {x.shape}")
  sharding = batch_sharding(mesh)
  if process_local:
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  check_mesh(mesh, batch_size=x.shape[0])
  return _place(x, sharding)


def describe(tree) -> dict[str, Any]:
  """'/'-joined leaf path -> PartitionSpec of each placed array (for logs and tests)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    out["/".join(tree_names(path))] = spec
  return out
