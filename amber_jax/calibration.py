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
from amber_jax.model.llama import causal_mask, embed, run_layers
from amber_jax.progress import progress_bar


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _batch_absmax(params, tokens_BxT, *, config, dtype):
  b, t = tokens_BxT.shape
  h = embed(params, tokens_BxT, dtype)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def make_lin(layer_params, layer_x, layer):
    del layer_x, layer
    records = {}

    def lin(x, proj):
      records[proj] = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))
      y = jnp.einsum("...i,io->...o", x, layer_params[proj]["w"].astype(x.dtype))
      if "b" in layer_params[proj]:
        y = y + layer_params[proj]["b"].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
      return y

    return lin, records

  _, _, records = run_layers(
    config, params, h, positions, causal_mask(t, None, b), None, make_lin, None
  )
  return records


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
