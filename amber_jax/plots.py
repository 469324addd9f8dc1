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
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
