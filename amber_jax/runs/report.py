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
import tempfile
from pathlib import Path

import numpy as np

from amber_jax.io.atomic import check_output_file
from amber_jax.runs.amber_table import amber_table_markdown
from amber_jax.runs.checks import check_markdown_file
from amber_jax.runs.front import front_markdown, save_front_plots
from amber_jax.runs.generation import RESULTS_FORMAT as GENERATION_FORMAT
from amber_jax.runs.generation import generation_markdown
from amber_jax.runs.markdown import markdown_table, update_markdown_section
from amber_jax.runs.plots import (
  save_accuracy_change,
  save_perplexity_vs_pattern,
  save_sensitivity_heatmap,
)
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


def _malformed(path, what: str, e: BaseException) -> ValueError:
  return ValueError(
    f"{what} file {path} is not a complete {what} results file ({type(e).__name__}: {e})"
  )


# What rendering a result file that lacks a key or holds a wrong type raises.
_RENDER_ERRORS = (KeyError, TypeError, AttributeError, IndexError, ValueError, ZeroDivisionError)


def _render(path, what: str, fn):
  """``fn()``, with a malformed file's KeyError or TypeError (and the like) turned into a
  ValueError naming the file."""
  try:
    return fn()
  except _RENDER_ERRORS as e:
    if isinstance(e, ValueError) and str(path) in str(e):
      raise
    raise _malformed(path, what, e) from None


def check_report_outputs(results_md, plots_dir, plot_names=(), *, args=("results_md", "plots_dir")):
  """ValueError naming the argument (``args``: their names for the message) if the markdown
  file or a PNG in ``plots_dir`` cannot be written; nothing is written."""
  if results_md:
    check_markdown_file(results_md, arg=args[0])
  if plots_dir:
    if Path(plots_dir).exists() and not Path(plots_dir).is_dir():
      raise ValueError(f"{args[1]}: {os.fspath(plots_dir)!r} is a file, not a directory")
    for name in plot_names or ("plot.png",):
      check_output_file(Path(plots_dir) / name, arg=args[1])


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

  Every input is read, checked and rendered (the sections and the PNGs, into a temporary
  directory) before anything is written, so a bad file, or an output that cannot be written,
  changes nothing.

  Raises:
    ValueError: an unreadable or malformed result file (named), an output path that cannot
      be written, or nothing to render.
  """
  if not any((dense_full, zero_shot, generation, amber_table, sensitivity, front)):
    raise ValueError("give at least one result file to render")
  sections: list[tuple[str, str]] = []
  plots = []  # (file name, source file, what, callable(path) -> the PNG(s) written)
  if dense_full:
    entries = load_results(dense_full)
    body = _render(dense_full, "dense_full", lambda: dense_accuracy_markdown(entries))
    sections.append(
      (
        "zero-shot-dense",
        "## Dense accuracy on every task (all examples)\n\n" + body + "\nBIG-bench multiple "
        "choice, 0-shot, lm-eval-style log-likelihood; ± one standard error.",
      )
    )
  if zero_shot:
    entries = load_results(zero_shot)
    body = _render(zero_shot, "zero_shot", lambda e=entries: report_markdown(e))
    sections.append(("zero-shot", "## Zero-shot accuracy\n\n" + body))
    changes = _render(zero_shot, "zero_shot", lambda e=entries: accuracy_changes(e))
    if changes:
      plots.append(
        (
          "accuracy_change.png",
          zero_shot,
          "zero_shot",
          lambda p, c=changes: save_accuracy_change(
            c, p, title="acc_norm change vs dense per task (± paired stderr)"
          ),
        )
      )
  if generation:
    entries = load_results(
      generation, fmt=GENERATION_FORMAT, need=("exact_match", "n", "answers", "settings")
    )
    body = _render(generation, "generation", lambda e=entries: generation_markdown(e))
    sections.append(("generation", "## Generation under sparse prefill\n\n" + body))
  if amber_table:
    result = _read_json(amber_table, "amber_table")
    if not isinstance(result, dict) or not {"rows", "dense", "config"} <= set(result):
      raise ValueError(f"amber_table file {amber_table} lacks rows/dense/config")

    def amber_section(r=result):
      cfg = r["config"]
      command = (
        f"python experiments/amber_table.py --patterns={','.join(cfg['patterns'])} "
        f"--scores={','.join(cfg['scores'])} --policies={','.join(cfg['policies'])}"
      )
      return amber_table_markdown(r, command)

    sections.append(("amber-table", _render(amber_table, "amber_table", amber_section)))
    plots.append(
      (
        "perplexity_vs_pattern.png",
        amber_table,
        "amber_table",
        lambda p, r=result: save_perplexity_vs_pattern(
          r["rows"], r["dense"]["perplexity"], p, title=f"{r['config']['model']}: perplexity"
        ),
      )
    )
  if sensitivity:
    result = _read_json(sensitivity, "sensitivity")
    if not isinstance(result, dict) or not {"errors", "projections"} <= set(result):
      raise ValueError(f"sensitivity file {sensitivity} lacks errors/projections")
    plots.append(
      (
        "sensitivity_heatmap.png",
        sensitivity,
        "sensitivity",
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
    if not isinstance(result, dict) or not {"rows", "dense", "config"} <= set(result):
      raise ValueError(f"front file {front} lacks rows/dense/config")
    sections.append(("front", _render(front, "front", lambda r=result: front_markdown(r))))
    plots.append(("coverage_front.png", front, "front", lambda p, r=result: save_front_plots(r, p)))
  names = [name for name, *_ in plots] + (["learning_curves.png"] if front else [])
  check_report_outputs(results_md, plots_dir if plots else None, names)
  written: list[Path] = []
  with tempfile.TemporaryDirectory(prefix="amber_jax_report_") as tmp:
    rendered: list[Path] = []
    if plots_dir:
      for name, source, what, make in plots:  # make(path) -> the PNG written, or a list
        made = _render(source, what, lambda m=make, n=name: m(Path(tmp) / n))
        rendered += made if isinstance(made, list) else [made]
    if results_md:
      for name, body in sections:
        update_markdown_section(results_md, name, body)
        log(f"wrote section {name!r} of {results_md}")
      written.append(Path(results_md))
    else:
      for _, body in sections:
        log(body)
    if rendered:
      Path(plots_dir).mkdir(parents=True, exist_ok=True)
    for made in rendered:
      path = Path(plots_dir) / made.name
      write_bytes_atomic(path, made.read_bytes())
      written.append(path)
      log(f"wrote {path}")
  return written


def write_bytes_atomic(path: Path, data: bytes) -> None:
  """``data`` into ``path`` through a temporary file in its directory and os.replace."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
