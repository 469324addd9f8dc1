"""Result JSON files -> RESULTS.md sections and PNG plots, in one call (experiments/report.py).

Each input is optional; what is given is rendered, what is not is left as it is:

* ``dense_full`` (zero-shot results, dense row, all examples): the dense model's acc and
  acc_norm with standard errors on every task ("zero-shot-dense" section);
* ``zero_shot`` (zero-shot results): the paper-style table, rows = method x pattern, columns =
  tasks, average and change vs dense ("zero-shot" section), and ``accuracy_change.png``;
* ``generation``: exact match and agreement with dense ("generation" section);
* ``amber_table``: perplexity by score x policy x pattern ("amber-table" section) and
  ``perplexity_vs_pattern.png``;
* ``sensitivity``: ``sensitivity_heatmap.png``;
* ``front`` (experiments/front.py output): the coverage-quality front and ablation ("front"
  section), ``coverage_front.png`` and ``learning_curves.png``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from amber_jax.plots import (
  save_accuracy_change,
  save_perplexity_vs_pattern,
  save_sensitivity_heatmap,
)
from amber_jax.report import markdown_table, update_markdown_section
from amber_jax.runs.amber_table import amber_table_markdown
from amber_jax.runs.front import front_markdown, save_front_plots
from amber_jax.runs.generation import RESULTS_FORMAT as GENERATION_FORMAT
from amber_jax.runs.generation import generation_markdown
from amber_jax.runs.zero_shot import DENSE, entry_id, load_results, report_markdown


def _read_json(path: str | os.PathLike, what: str) -> dict:
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{what} file {path} is not readable JSON ({e})") from e


def accuracy_changes(entries: dict) -> dict[str, dict[str, tuple[float, float]]]:
  """Model name -> task -> (acc_norm change vs dense in points, its standard error).

  The error is paired (example by example) when both entries carry per-example results on the
  same examples, else the unpaired sqrt(se_a^2 + se_dense^2).
  """
  out: dict[str, dict[str, tuple[float, float]]] = {}
  for e in entries.values():
    if (e["method"], e["pattern"]) == (DENSE, DENSE):
      continue
    d = entries.get(entry_id(DENSE, DENSE, e["task"]))
    if d is None:
      continue
    change = 100 * (e["acc_norm"] - d["acc_norm"])
    a, b = e.get("correct_norm"), d.get("correct_norm")
    if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
      diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
      se = 100 * float(diff.std(ddof=1) / math.sqrt(len(diff)))
    else:
      se = 100 * math.hypot(e.get("acc_norm_stderr", math.nan), d.get("acc_norm_stderr", math.nan))
    out.setdefault(f"{e['pattern']} {e['method']}", {})[e["task"]] = (change, se)
  return out


def dense_accuracy_markdown(entries: dict) -> str:
  """The dense model's acc and acc_norm (%, ± stderr) on every task, with n."""
  rows = []
  for e in entries.values():
    if (e["method"], e["pattern"]) != (DENSE, DENSE):
      continue
    rows.append(
      [
        e["task"],
        e["n"],
        f"{100 * e['acc']:.1f} ± {100 * e['acc_stderr']:.1f}",
        f"{100 * e['acc_norm']:.1f} ± {100 * e['acc_norm_stderr']:.1f}",
      ]
    )
  if not rows:
    raise ValueError("no dense entries: the dense table needs the dense row")
  n = sum(r[1] for r in rows)
  acc = np.mean([e["acc"] for e in entries.values() if e["method"] == DENSE])
  acc_norm = np.mean([e["acc_norm"] for e in entries.values() if e["method"] == DENSE])
  rows.append(["average", n, f"{100 * acc:.1f}", f"{100 * acc_norm:.1f}"])
  return markdown_table(["task", "n", "acc (%)", "acc_norm (%)"], rows) + "\n"


def write_report(
  *,
  dense_full: str | os.PathLike | None = None,
  zero_shot: str | os.PathLike | None = None,
  generation: str | os.PathLike | None = None,
  amber_table: str | os.PathLike | None = None,
  sensitivity: str | os.PathLike | None = None,
  front: str | os.PathLike | None = None,
  results_md: str | os.PathLike | None = None,
  plots_dir: str | os.PathLike | None = None,
  log=print,
) -> list[Path]:
  """Renders every given result file; returns the files written (markdown and PNGs).

  Every input is read and checked before anything is written, so a bad file changes nothing.

  Raises:
    ValueError: an unreadable or malformed result file, or nothing to render.
  """
  if not any((dense_full, zero_shot, generation, amber_table, sensitivity, front)):
    raise ValueError("give at least one result file to render")
  sections: list[tuple[str, str]] = []
  plots = []  # (file name, callable(path) -> the PNG(s) written)
  if dense_full:
    entries = load_results(dense_full)
    body = dense_accuracy_markdown(entries)
    sections.append(
      (
        "zero-shot-dense",
        "## Dense accuracy on every task (all examples)\n\n" + body + "\nBIG-bench multiple "
        "choice, 0-shot, lm-eval-style log-likelihood; ± one standard error.",
      )
    )
  if zero_shot:
    entries = load_results(zero_shot)
    sections.append(("zero-shot", "## Zero-shot accuracy\n\n" + report_markdown(entries)))
    changes = accuracy_changes(entries)
    if changes:
      plots.append(
        (
          "accuracy_change.png",
          lambda p, c=changes: save_accuracy_change(
            c, p, title="acc_norm change vs dense per task (± paired stderr)"
          ),
        )
      )
  if generation:
    entries = load_results(
      generation, fmt=GENERATION_FORMAT, need=("exact_match", "n", "answers", "settings")
    )
    sections.append(
      ("generation", "## Generation under sparse prefill\n\n" + generation_markdown(entries))
    )
  if amber_table:
    result = _read_json(amber_table, "amber_table")
    if "rows" not in result or "dense" not in result or "config" not in result:
      raise ValueError(f"amber_table file {amber_table} lacks rows/dense/config")
    cfg = result["config"]
    command = (
      f"python experiments/amber_table.py --patterns={','.join(cfg['patterns'])} "
      f"--scores={','.join(cfg['scores'])} --policies={','.join(cfg['policies'])}"
    )
    sections.append(("amber-table", amber_table_markdown(result, command)))
    plots.append(
      (
        "perplexity_vs_pattern.png",
        lambda p, r=result: save_perplexity_vs_pattern(
          r["rows"], r["dense"]["perplexity"], p, title=f"{r['config']['model']}: perplexity"
        ),
      )
    )
  if sensitivity:
    result = _read_json(sensitivity, "sensitivity")
    if "errors" not in result or "projections" not in result:
      raise ValueError(f"sensitivity file {sensitivity} lacks errors/projections")
    plots.append(
      (
        "sensitivity_heatmap.png",
        lambda p, r=result: save_sensitivity_heatmap(
          np.asarray(r["errors"]),
          r["projections"],
          p,
          title=f"{r['config']['pattern']} {r['config']['score']}: relative output error",
          skip_layers=r.get("skip_layers", ()),
        ),
      )
    )
  if front:
    result = _read_json(front, "front")
    if not {"rows", "dense", "config"} <= set(result):
      raise ValueError(f"front file {front} lacks rows/dense/config")
    sections.append(("front", front_markdown(result)))
    plots.append(("coverage_front.png", lambda p, r=result: save_front_plots(r, p)))
  written: list[Path] = []
  if results_md:
    for name, body in sections:
      update_markdown_section(results_md, name, body)
      log(f"wrote section {name!r} of {results_md}")
    written.append(Path(results_md))
  else:
    for _, body in sections:
      log(body)
  if plots_dir:
    for name, make in plots:  # make(path) -> the PNG written, or a list of them
      made = make(Path(plots_dir) / name)
      for path in made if isinstance(made, list) else [made]:
        written.append(path)
        log(f"wrote {path}")
  return written
