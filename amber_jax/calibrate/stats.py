"""Calibration statistics: one streaming, jitted pass of the dense model over calibration windows.

Collects, for every linear site, the per-input-channel absolute maximum of its input
(max |X[:, j]| over all calibration tokens), which SmoothQuant-style smoothing and static
activation scales need.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.harness import (
  check_windows,
  record_only,
  site_error_table,
  site_records,
  windows_in_batches,
)
from amber_jax.calibrate.policy import check_batch_size
from amber_jax.core.linear import LinearSpec, site_linear, site_product
from amber_jax.core.quant import int8_rescaled_dot, quantize_activation
from amber_jax.model.config import LlamaConfig


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_absmax(params, tokens_BxT, *, config, dtype):
  def record(x, weights, row):
    del weights, row
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))

  return site_records(params, tokens_BxT, config=config, dtype=dtype, hook=record_only(record))


def collect_input_absmax(
  params,
  windows: np.ndarray,
  *,
  config: LlamaConfig,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> dict[str, np.ndarray]:
  """site -> float32 [n_layers, d_in]: max |input| per channel over ``windows`` [W, T]."""
  check_batch_size(batch_size)
  windows = check_windows(windows)
  out = {s.name: np.zeros((config.n_layers, s.d_in), np.float32) for s in config.sites}
  for rows in windows_in_batches(
    windows, batch_size, desc="calibration", show_progress=show_progress
  ):
    records = _batch_absmax(params, rows, config=config, dtype=dtype)
    for p in out:
      out[p] = np.maximum(out[p], np.asarray(records[p], np.float32))
  return out


@functools.partial(jax.jit, static_argnames=("config", "act_mode", "dtype"))
def _batch_quant_errors(params, tokens_BxT, sites, *, config, act_mode, dtype):
  def record(x, weights, q):
    y = site_product(x, weights).astype(jnp.float32)
    rows = weights.get("expert_rows")
    if rows is not None:  # an expert site: its own W8A8 product, the smoothing undone
      q = {**q, "act_div": q["fold"] * q["act_div"], "in_float": jnp.zeros_like(q["in_float"])}
      spec = LinearSpec(act_mode=act_mode)
      err = y - site_linear(x, weights, {"quant": q}, spec, rows).astype(jnp.float32)
      return jnp.sum(err * err), jnp.sum(y * y)
    s = (q["fold"] * q["act_div"]).astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    static = q["act_scale"] if act_mode == "tensor" else None
    x_q, x_scale = quantize_activation(x / s, mode=act_mode, static_scale=static)
    y_q = int8_rescaled_dot(x_q, x_scale, q["w_q"], q["w_scale"], out_dtype=jnp.float32)
    err = y - y_q
    return jnp.sum(err * err), jnp.sum(y * y)

  return site_records(
    params, tokens_BxT, config=config, dtype=dtype, hook=record_only(record), hook_xs=sites
  )


def measure_quant_errors(
  params,
  windows: np.ndarray,
  quant_state,
  *,
  config: LlamaConfig,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> np.ndarray:
  """[n_layers, n_sites] (``config.sites`` order) relative output error ||Y - Y_w8a8|| / ||Y||
  of each site quantized alone (dense float model upstream), on ``windows``: what automatic
  float-site selection ranks."""
  check_batch_size(batch_size)
  windows = np.asarray(windows, np.int32)
  return site_error_table(
    lambda rows: _batch_quant_errors(
      params, rows, quant_state.sites, config=config, act_mode=quant_state.act_mode, dtype=dtype
    ),
    windows,
    config=config,
    batch_size=batch_size,
    desc="quant error",
    show_progress=show_progress,
  )


def most_sensitive_sites(
  errors_LxP: np.ndarray, k: int, site_names: tuple[str, ...]
) -> tuple[tuple[int, str], ...]:
  """The ``k`` (layer, site) pairs with the largest errors; ``site_names`` name the columns of
  ``errors_LxP`` (``config.sites.names``)."""
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  if errors_LxP.shape[1] != len(site_names):
    raise ValueError(f"errors_LxP has {errors_LxP.shape[1]} columns for {len(site_names)} sites")
  order = np.argsort(-errors_LxP, axis=None, kind="stable")[:k]
  n = errors_LxP.shape[1]
  return tuple(sorted((int(i // n), site_names[int(i % n)]) for i in order))
