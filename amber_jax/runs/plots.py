"""Figures (matplotlib, imported lazily; written atomically as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def save_sensitivity_heatmap(
  errors_LxP: np.ndarray,
  projections: Sequence[str],
  path: str | os.PathLike,
  *,
  title: str = "",
  skip_layers: Sequence[int] = (),
) -> Path:
  """Layers x projections heatmap of relative output errors; skip layers marked."""
  plt = _pyplot()
  errors_LxP = np.asarray(errors_LxP)
  n_layers = errors_LxP.shape[0]
  fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(projections), 1.0 + 0.25 * n_layers))
  im = ax.imshow(errors_LxP, aspect="auto", cmap="viridis")
  ax.set_xticks(range(len(projections)), projections)
  ax.set_yticks(
    range(n_layers), [f"{l}{' *' if l in skip_layers else ''}" for l in range(n_layers)], fontsize=7
  )
  ax.set_xlabel("projection")
  ax.set_ylabel("layer (* = q/gate kept dense)")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="||Y - Y'|| / ||Y||")
  return _save(fig, path)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _plain_ticks():
  """Tick labels like 40 and 45 on a log axis (instead of 4 x 10^1)."""
  from matplotlib.ticker import FuncFormatter

  return FuncFormatter(lambda v, _: f"{v:g}")


def _save(fig, path: str | os.PathLike) -> Path:
  """Writes the figure as PNG under a temporary name, then renames it (never half-written)."""
  plt = _pyplot()
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.png")
  try:
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # "tight": legends outside the axes too
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    tmp.unlink(missing_ok=True)
  return path


def _pattern_sparsity(pattern: str) -> float:
  n, m = (int(x) for x in pattern.split(":"))
  return 1 - n / m


def save_perplexity_vs_pattern(
  rows: Sequence[dict], dense_perplexity: float, path: str | os.PathLike, *, title: str = ""
) -> Path:
  """Perplexity against the N:M pattern, one line per (score, policy), dense as a dashed line.

  ``rows``: dicts with ``pattern`` ("N:M"), ``score``, ``policy`` and ``perplexity`` (the
  ``rows`` of an amber_table result). Patterns are ordered by sparsity, then by M.
  """
  if not rows:
    raise ValueError("rows is empty: nothing to plot")
  plt = _pyplot()
  patterns = sorted(
    {r["pattern"] for r in rows}, key=lambda p: (_pattern_sparsity(p), int(p.split(":")[1]))
  )
  series: dict[tuple[str, str], dict[str, float]] = {}
  for r in rows:
    series.setdefault((r["policy"], r["score"]), {})[r["pattern"]] = r["perplexity"]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  styles = {"all": ":", "paper": "--", "auto": "-"}
  for (policy, score), by_pattern in sorted(series.items()):
    xs = [i for i, p in enumerate(patterns) if p in by_pattern]
    ys = [by_pattern[patterns[i]] for i in xs]
    ax.plot(xs, ys, styles.get(policy, "-."), marker="o", label=f"{policy} / {score}")
  ax.axhline(dense_perplexity, color="black", lw=1, ls="--", label=f"dense {dense_perplexity:.2f}")
  ax.set_xticks(range(len(patterns)), patterns)
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(_plain_ticks())
  ax.yaxis.set_minor_formatter(_plain_ticks())
  ax.set_xlabel("N:M pattern")
  ax.set_ylabel("perplexity (log scale)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)


def save_accuracy_change(
  changes: dict[str, dict[str, tuple[float, float]]],
  path: str | os.PathLike,
  *,
  title: str = "",
) -> Path:
  """Grouped bars: per task, each model's accuracy change vs dense (points), error bars = one
  standard error. ``changes``: model name -> task -> (change, stderr) (stderr may be NaN)."""
  if not changes:
    raise ValueError("changes is empty: nothing to plot")
  plt = _pyplot()
  tasks = list(dict.fromkeys(t for by_task in changes.values() for t in by_task))
  width = 0.8 / len(changes)
  fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(tasks), 4.2))
  for k, (name, by_task) in enumerate(changes.items()):
    xs = np.arange(len(tasks)) + (k - (len(changes) - 1) / 2) * width
    vals = [by_task.get(t, (np.nan, np.nan)) for t in tasks]
    ax.bar(
      xs,
      [v[0] for v in vals],
      width,
      yerr=[0 if np.isnan(v[1]) else v[1] for v in vals],
      capsize=2,
      label=name,
    )
  ax.axhline(0, color="black", lw=0.8)
  ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right", fontsize=7)
  ax.set_ylabel("accuracy change vs dense (points)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  return _save(fig, path)


def save_method_comparison(
  values: dict[str, dict[str, float]],
  columns: Sequence[str],
  dense: float,
  path: str | os.PathLike,
  *,
  ylabel: str,
  title: str = "",
) -> Path:
  """Grouped bars on a log scale: per column (target), one bar per method; the dense value as
  a dashed line. ``values``: method -> column -> value (a missing cell is no bar)."""
  if not values:
    raise ValueError("values is empty: nothing to plot")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.2, 4.2))
  width = 0.8 / len(values)
  for k, (name, by_column) in enumerate(values.items()):
    cells = [(i, by_column[c]) for i, c in enumerate(columns) if c in by_column]
    xs = [i + (k - (len(values) - 1) / 2) * width for i, _ in cells]
    ax.bar(xs, [v for _, v in cells], width, label=name)
  ax.axhline(dense, color="black", lw=1, ls="--", label=f"dense {dense:.2f}")
  ax.set_xticks(range(len(columns)), columns)
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(_plain_ticks())
  ax.yaxis.set_minor_formatter(_plain_ticks())
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, ncol=3)
  return _save(fig, path)


def save_coverage_front(
  rows: Sequence[dict],
  dense_perplexity: float,
  path: str | os.PathLike,
  *,
  text: str,
  title: str = "",
) -> Path:
  """Perplexity on ``text`` against achieved coverage, one panel per pattern and one line per
  method, dense as a dashed line. ``rows``: dicts with ``pattern``, ``method``, ``coverage`` and
  ``perplexity`` (text -> value), the ``rows`` of a run_front result."""
  rows = [r for r in rows if text in r["perplexity"]]
  if not rows:
    raise ValueError(f"no rows with a {text!r} perplexity: nothing to plot")
  plt = _pyplot()
  patterns = list(dict.fromkeys(r["pattern"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  # One colour per method in every panel (tab20 has 20: enough for the front's methods), and
  # diamonds for methods measured at one coverage only (the learned ones).
  colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
  fig, axes = plt.subplots(1, len(patterns), figsize=(5.2 * len(patterns), 4.2), squeeze=False)
  for ax, pattern in zip(axes[0], patterns, strict=True):
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
      if r["pattern"] == pattern:
        series.setdefault(r["method"], []).append((r["coverage"], r["perplexity"][text]))
    for method, points in series.items():
      xs, ys = zip(*sorted(points), strict=True)
      line = len(xs) > 1
      ax.plot(
        xs,
        ys,
        marker="o" if line else "D",
        ls="-" if line else "none",
        color=colors[method],
        label=method,
      )
    ax.axhline(
      dense_perplexity, color="black", lw=1, ls="--", label=f"dense {dense_perplexity:.2f}"
    )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_ticks())
    ax.yaxis.set_minor_formatter(_plain_ticks())
    ax.set_xlabel("coverage (share of linear multiply-adds with sparse input)")
    ax.set_ylabel(f"perplexity on {text} (log scale)")
    ax.set_title(f"{pattern} {title}".strip(), fontsize=9)
  # One legend for all panels, outside them (inside, it hid the points at coverage 0.7).
  handles = {}
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
      handles.setdefault(label, handle)
  fig.legend(
    handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7
  )
  return _save(fig, path)


def save_learning_curves(
  curves: dict[str, Sequence[float]], path: str | os.PathLike, *, title: str = ""
) -> Path:
  """KL (nats/token) per optimiser step, one line per run: ``curves`` maps a label to the
  values from the first step's (before any update) to the last (the learned factors' run
  records its training-batch losses and the final mean KL)."""
  if not curves or not all(len(v) for v in curves.values()):
    raise ValueError("curves must map at least one label to a non-empty list of KL values")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for i, (label, values) in enumerate(curves.items()):
    ax.plot(
      range(len(values)), values, marker="o", color=plt.get_cmap("tab20")(i % 20), label=label
    )
  ax.set_xlabel("optimiser step")
  ax.set_ylabel("KL(dense || sparse), nats per token")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
  return _save(fig, path)
