"""Layer-by-layer calibration: one decoder layer at a time on the calibration activations.

The weight-pruning baselines (Wanda, SparseGPT) calibrate as their reference code does: the
calibration windows are embedded once, then for each layer in order

1. one pass of that layer alone over the residual stream entering it records a statistic of
   every site's input (all sites of the layer see the layer's unpruned weights);
2. the caller's ``update(layer, layer_params, statistics)`` returns the layer's new weights;
3. the stream is advanced through the updated layer, so the next layer is calibrated on the
   inputs of the already-pruned model.

One layer runs as ``amber_jax.model.llama.model_pass`` of a one-layer config on the stream
(``h_BxTxD``), so every architecture the model runs (Qwen3's q/k norms, mixtures of experts)
runs here without a special case. Memory: the stream of all calibration windows, [W, T, D].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.calibrate.harness import check_windows, record_only
from amber_jax.model.llama import embed, model_pass
from amber_jax.util.progress import progress_bar

# statistic(x, weights) -> a pytree summed over batches (x: the site's input [B, T, d_in], or
# its routed rows [R, d_in] at an expert site, where weights["expert_rows"] says whose).
Statistic = Callable[[jax.Array, dict], object]


def one_layer_config(config):
  """``config`` with one layer: what a single decoder layer of it computes."""
  return dataclasses.replace(config, n_layers=1)


def layer_params(params, layer: int) -> dict:
  """The params a one-layer pass of ``layer`` reads: ``{"layers": each leaf's [layer:layer+1]}``."""
  return {"layers": jax.tree.map(lambda a: a[layer : layer + 1], params["layers"])}


@functools.partial(jax.jit, static_argnames=("config", "statistic"))
def _layer_statistics(one_layer, h_BxTxD, *, config, statistic):
  def record(x, weights, row):
    del row
    return statistic(x, weights)

  out = model_pass(
    one_layer, h_BxTxD=h_BxTxD, config=config, hook=record_only(record), dtype=h_BxTxD.dtype
  )
  return jax.tree.map(lambda a: a[0], out.records)  # the one layer's records


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_output(one_layer, h_BxTxD, *, config):
  return model_pass(one_layer, h_BxTxD=h_BxTxD, config=config, dtype=h_BxTxD.dtype).hidden


def calibrate_layer_by_layer(
  params,
  config,
  windows: np.ndarray,
  *,
  statistic: Statistic,
  update: Callable[[int, dict, dict], dict],
  batch_size: int = 4,
  dtype=jnp.float32,
  desc: str = "layers",
  show_progress: bool = True,
) -> dict:
  """Runs the loop of the module docstring; returns the new ``params["layers"]`` (every leaf
  stacked over layers again; the embedding, final norm and head are the caller's).

  ``statistic`` is summed over the batches of ``windows`` [W, T] per site; ``update(layer,
  one_layer_params, statistics)`` gets that layer's params (``layer_params``: leaves
  ``[1, ...]``) and ``statistics`` (site name -> summed statistic) and returns the layer's new
  params of the same structure."""
  windows = check_windows(windows)
  one = one_layer_config(config)
  stream = [
    embed(params, jnp.asarray(windows[i : i + batch_size]), dtype)
    for i in range(0, len(windows), batch_size)
  ]
  new_layers = []
  with progress_bar(
    total=config.n_layers, desc=desc, unit="layer", disable=not show_progress
  ) as bar:
    for layer in range(config.n_layers):
      current = layer_params(params, layer)
      sums = None
      for h in stream:
        records = _layer_statistics(current, h, config=one, statistic=statistic)
        sums = records if sums is None else jax.tree.map(jnp.add, sums, records)
      updated = update(layer, current, sums)
      stream = [_layer_output(updated, h, config=one) for h in stream]
      new_layers.append(jax.tree.map(np.asarray, updated["layers"]))
      bar.update(1)
  return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *new_layers)
