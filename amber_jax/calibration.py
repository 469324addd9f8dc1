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

from amber_jax.model.config import PROJECTIONS, LlamaConfig
from amber_jax.model.llama import dense_pass_records
from amber_jax.policy import check_batch_size
from amber_jax.progress import progress_bar


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_absmax(params, tokens_BxT, *, config, dtype):
  def record(x, weights, site_x):
    del weights, site_x
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))

  return dense_pass_records(
    params, tokens_BxT, config=config, dtype=dtype, site_xs=None, record=record
  )


def collect_input_absmax(
  params,
  windows: np.ndarray,
  *,
  config: LlamaConfig,
  batch_size: int = 4,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> dict[str, np.ndarray]:
  """proj -> float32 [n_layers, d_in]: max |input| per channel over ``windows`` [W, T]."""
  check_batch_size(batch_size)
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or len(windows) == 0:
    raise ValueError(f"windows must be a non-empty [W, T] array, got shape {windows.shape}")
  out = {
    p: np.zeros((config.n_layers, config.linear_shapes()[p][0]), np.float32) for p in PROJECTIONS
  }
  with progress_bar(
    total=len(windows), desc="calibration", unit="window", disable=not show_progress
  ) as bar:
    for start in range(0, len(windows), batch_size):
      rows = jnp.asarray(windows[start : start + batch_size])
      records = _batch_absmax(params, rows, config=config, dtype=dtype)
      for p in PROJECTIONS:
        out[p] = np.maximum(out[p], np.asarray(records[p], np.float32))
      bar.update(len(rows))
  return out


@functools.partial(jax.jit, static_argnames=("config", "act_mode", "dtype"))
def _batch_quant_errors(params, tokens_BxT, sites, *, config, act_mode, dtype):
  from amber_jax.quant import int8_dot_general, quantize_activation

  def record(x, weights, q):
    y = jnp.einsum("...i,io->...o", x, weights["w"].astype(x.dtype)).astype(jnp.float32)
    s = (q["fold"] * q["act_div"]).astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    static = q["act_scale"] if act_mode == "tensor" else None
    x_q, x_scale = quantize_activation(x / s, mode=act_mode, static_scale=static)
    acc = int8_dot_general(x_q, q["w_q"], (((x.ndim - 1,), (0,)), ((), ())))
    y_q = acc.astype(jnp.float32) * x_scale * q["w_scale"].reshape((1,) * (y.ndim - 1) + (-1,))
    err = y - y_q
    return jnp.sum(err * err), jnp.sum(y * y)

  return dense_pass_records(
    params, tokens_BxT, config=config, dtype=dtype, site_xs=sites, record=record
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
  """[n_layers, 7] relative output error ||Y - Y_w8a8|| / ||Y|| of each site quantized alone
  (dense float model upstream), on ``windows``: what automatic float-site selection ranks."""
  check_batch_size(batch_size)
  windows = np.asarray(windows, np.int32)
  err2 = np.zeros((config.n_layers, len(PROJECTIONS)))
  ref2 = np.zeros_like(err2)
  with progress_bar(
    total=len(windows), desc="quant error", unit="window", disable=not show_progress
  ) as bar:
    for start in range(0, len(windows), batch_size):
      rows = jnp.asarray(windows[start : start + batch_size])
      records = _batch_quant_errors(
        params, rows, quant_state.sites, config=config, act_mode=quant_state.act_mode, dtype=dtype
      )
      for j, p in enumerate(PROJECTIONS):
        err2[:, j] += np.asarray(records[p][0], np.float64)
        ref2[:, j] += np.asarray(records[p][1], np.float64)
      bar.update(len(rows))
  return np.sqrt(err2) / (np.sqrt(ref2) + 1e-12)


def most_sensitive_sites(errors_LxP: np.ndarray, k: int) -> tuple[tuple[int, str], ...]:
  """The ``k`` (layer, projection) sites with the largest errors."""
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  order = np.argsort(-errors_LxP, axis=None, kind="stable")[:k]
  return tuple(
    sorted(
      (int(i // errors_LxP.shape[1]), PROJECTIONS[int(i % errors_LxP.shape[1])]) for i in order
    )
  )
