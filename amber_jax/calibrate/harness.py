"""The one calibration harness: run the model over calibration windows, recording (or
overriding) what every site sees.

Every calibration pass of the library (W8A8 statistics, quantization errors, sensitivities,
corrections, learned factors) runs ``amber_jax.model.llama.model_pass`` with a *site hook*
(``hook(name, x, weights, row, linear) -> (y, record)``), through the two functions here:

* ``site_records``: one pass over a batch; the records come back per site, stacked over layers;
* ``windows_in_batches``: the batches of a [W, T] window array, with a progress bar.

A record is any pytree the hook returns for a site (a statistic, fitted arrays); ``y`` is the
site's output that the rest of the pass sees: ``linear(x)`` (the plan's own) to record only,
anything else to override it.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from amber_jax.model.llama import SiteHook, model_pass
from amber_jax.util.progress import progress_bar


def check_windows(windows: np.ndarray) -> np.ndarray:
  """``windows`` as an int32 [W, T] array; ValueError unless it is 2-D and non-empty."""
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or len(windows) == 0:
    raise ValueError(f"windows must be a non-empty [W, T] array, got shape {windows.shape}")
  return windows


def windows_in_batches(
  windows: np.ndarray, batch_size: int, *, desc: str, show_progress: bool = True
) -> Iterator[jnp.ndarray]:
  """The rows of ``windows`` [W, T] in batches of ``batch_size``, with a progress bar."""
  with progress_bar(total=len(windows), desc=desc, unit="window", disable=not show_progress) as bar:
    for start in range(0, len(windows), batch_size):
      rows = jnp.asarray(windows[start : start + batch_size])
      yield rows
      bar.update(len(rows))


def site_records(
  params,
  tokens_BxT,
  *,
  config,
  hook: SiteHook,
  hook_xs=None,
  plan=None,
  dtype=jnp.float32,
) -> dict:
  """One pass of the model (under ``plan``; None: dense) with ``hook`` at every site: the
  records, site name -> stacked over layers. ``hook_xs`` are the hook's per-site data (site
  name -> arrays stacked over layers)."""
  return model_pass(
    params, tokens_BxT, config=config, plan=plan, dtype=dtype, hook=hook, hook_xs=hook_xs
  ).records


def record_only(record):
  """A hook that leaves every site's output as the plan computes it and records
  ``record(x, weights, row)``."""

  def hook(name, x, weights, row, linear):
    del name
    return linear(x), record(x, weights, row)

  return hook


def site_error_table(
  batch_sums, windows, *, config, batch_size: int, desc: str, show_progress: bool = True
) -> np.ndarray:
  """[n_layers, n_sites] (``config.sites`` order) relative errors sqrt(sum err2) /
  sqrt(sum ref2), where ``batch_sums(rows)`` returns site -> (err2 [L], ref2 [L]) for a batch of
  windows; summed in float64 over the batches of ``windows``."""
  names = config.sites.names
  err2 = np.zeros((config.n_layers, len(names)))
  ref2 = np.zeros_like(err2)
  for rows in windows_in_batches(windows, batch_size, desc=desc, show_progress=show_progress):
    records = batch_sums(rows)
    for j, name in enumerate(names):
      err2[:, j] += np.asarray(records[name][0], np.float64)
      ref2[:, j] += np.asarray(records[name][1], np.float64)
  return relative_errors(err2, ref2)


def relative_errors(err2: np.ndarray, ref2: np.ndarray) -> np.ndarray:
  """sqrt(err2) / sqrt(ref2) elementwise (the relative output error of accumulated sums)."""
  return np.sqrt(err2) / (np.sqrt(ref2) + 1e-12)
