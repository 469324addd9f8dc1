"""Zero-shot (or few-shot) BIG-bench accuracy of dense and N:M-sparse models, resumable.

Every (method x pattern, task) pair is one entry of the results JSON, keyed by the stable id
``"method/pattern/task"`` (the dense model is the single row ``"dense/dense/task"``). The whole
file is rewritten atomically after each finished pair, so an interrupted run loses at most the
pair in progress; rerunning with the same ``output`` loads the finished entries and skips them.

An entry made with other settings (model, limit, num_fewshot, dtype, seed, or, for the amber
method, the calibration text and windows) is an error naming the entry and the mismatch rather
than being recomputed: silently replacing it would throw away finished work, and mixing settings
in one file would make the table compare unlike numbers. Use another ``output`` (or delete the
file) to run with new settings.

Methods, for each sparse pattern: names of ``amber_jax.calibrate.methods`` (the default two below;
any other sparse one, e.g. ``search_mixed`` or ``best``, works the same way; entries carry the
canonical name, so ``paper`` rows are ``amber`` rows):

* ``naive``: every linear input sparsified (policy "all"), score |x|;
* ``amber``: Amber Pruner (policy "auto", robust score), q/gate skip layers chosen on the
  calibration windows that follow the first ``num_windows`` windows of the text, as run_prefill.

Every method that calibrates (all but ``naive``) records the calibration settings in its
entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amber_jax.calibrate.methods import (
  BuiltMethod,
  build_method,
  parse_target,
  resolve_method,
  target_name,
)
from amber_jax.calibrate.pruner import AmberConfig
from amber_jax.core.patterns import NMPattern
from amber_jax.data.bigbench import BIGBENCH_TASKS, bigbench_task_path, load_bigbench_task
from amber_jax.data.texts import DEFAULT_TEXT
from amber_jax.eval.multiple_choice import evaluate_task
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.io.loading import load_tokenizer
from amber_jax.io.sources import DEFAULT_MODEL, resolve_model
from amber_jax.runs.checks import check_text_source
from amber_jax.runs.common import (
  DTYPES,
  check_model_options,
  environment,
  prepare_eval,
  recorded_config,
)
from amber_jax.runs.markdown import markdown_table

METHODS = ("naive", "amber")  # the default methods (amber_jax.calibrate.methods names)
RESULTS_FORMAT = "amber_jax.zero_shot/1"
DENSE = "dense"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroShotConfig:
  """Everything a zero-shot run needs; validated on construction (before any loading)."""

  model: str = DEFAULT_MODEL
  tasks: tuple[str, ...] = BIGBENCH_TASKS  # packaged task names or paths to BIG-bench JSON files
  patterns: tuple[str, ...] = ("dense", "8:16", "2:4")
  methods: tuple[str, ...] = METHODS  # applied to every sparse pattern; dense is one row
  num_fewshot: int = 0
  limit: int | None = None  # the first `limit` examples per task; None: all
  subsample: int | None = None  # instead: a seeded random subset of this many per task
  batch_size: int = 8
  dtype: str = "float32"
  seed: int = 1234  # few-shot draws
  coverage: float = 0.55  # amber: minimum share of linear MACs sparsified
  text: str = DEFAULT_TEXT  # amber calibration text (known name or UTF-8 file)
  seq_len: int = 512
  num_windows: int = 8  # windows skipped (the perplexity windows), as run_prefill
  calib_windows: int = 8  # amber calibration windows, after those
  output: str = ""  # results JSON (resumed when it exists)
  cache_dir: str = ""
  # Sparse matmul implementation (amber_jax.core.backends; None: the default). Speed only: the
  # scores do not depend on it, so it is not part of an entry's settings.
  impl: str | None = None

  def __post_init__(self):
    check_eval_grid(self)
    if self.subsample is not None and self.subsample < 1:
      raise ValueError(f"subsample must be >= 1 (or None), got {self.subsample}")
    if self.subsample is not None and self.limit is not None:
      raise ValueError("pass limit (the first examples) or subsample (a random subset), not both")

  @staticmethod
  def pattern_name(pattern: str) -> str:
    """A pattern's canonical name: "dense", "N:M", or an unstructured target "50%"."""
    return target_name(pattern)

  def needs_calibration(self) -> bool:
    return needs_calibration(self.patterns, self.methods)

  def runs(self) -> list[tuple[tuple[str, str], AmberConfig]]:
    """((method, pattern), AmberConfig) of every row, dense first when it is asked for."""
    return plan_rows(self.patterns, self.methods, self.coverage, impl=self.impl)

  def settings(self, method: str) -> dict:
    """What an entry must have been made with to be reused."""
    s = {
      "model": self.model,
      "limit": self.limit,
      "subsample": self.subsample,
      "num_fewshot": self.num_fewshot,
      "dtype": self.dtype,
      "seed": self.seed,
    }
    if method_calibrates(method):
      s["calibration"] = calibration_settings(self)
    return s


def method_calibrates(method: str) -> bool:
  """Whether a row of ``method`` (a registry name; "dense" too) reads calibration text; an
  unknown name (an entry of a foreign file) counts as calibrating."""
  try:
    return resolve_method(method).needs_calibration
  except ValueError:
    return True


def calibration_settings(cfg) -> dict:
  """What a calibrated entry must have been made with (text, windows, coverage target)."""
  return {
    "text": cfg.text,
    "seq_len": cfg.seq_len,
    "num_windows": cfg.num_windows,
    "calib_windows": cfg.calib_windows,
    "coverage": cfg.coverage,
  }


def needs_calibration(patterns: Sequence[str], methods: Sequence[str]) -> bool:
  """Whether a grid of ``patterns`` x ``methods`` has a calibrated row (e.g. amber)."""
  sparse = any(parse_target(p) is not None for p in patterns)
  return sparse and any(resolve_method(m).needs_calibration for m in methods)


def check_eval_grid(cfg) -> None:
  """The checks the zero-shot and generation configs share (ValueError naming the field):
  tasks, patterns and methods (non-empty, known, no duplicates), few-shot count, limit,
  batch and window sizes, calibration windows for amber rows, dtype, cache and output."""
  if not cfg.tasks:
    raise ValueError("tasks must name at least one task")
  for t in cfg.tasks:
    if t not in BIGBENCH_TASKS and not Path(t).is_file():
      raise ValueError(
        f"task {t!r} is neither a packaged BIG-bench task ({', '.join(BIGBENCH_TASKS)}) "
        "nor an existing JSON file"
      )
  if not cfg.patterns:
    raise ValueError("patterns must name at least one pattern (or 'dense')")
  names = [ZeroShotConfig.pattern_name(p) for p in cfg.patterns]  # validates each pattern
  if len(set(names)) != len(names):
    raise ValueError(f"patterns has duplicates: {list(cfg.patterns)}")
  if not cfg.methods:
    raise ValueError("methods must name at least one method")
  names = []
  for m in cfg.methods:
    try:
      method = resolve_method(m)
    except ValueError as e:
      raise ValueError(f"method must be one of the registry's: {e}") from None
    if method.is_dense:
      raise ValueError("method 'dense' is not a method here: give --patterns=dense")
    names.append(method.name)
  if len(set(names)) != len(names):
    raise ValueError(f"methods has duplicates: {list(cfg.methods)}")
  if cfg.num_fewshot < 0:
    raise ValueError(f"num_fewshot must be >= 0, got {cfg.num_fewshot}")
  if cfg.limit is not None and cfg.limit < 1:
    raise ValueError(f"limit must be >= 1 (or None for all examples), got {cfg.limit}")
  for name in ("batch_size", "seq_len", "num_windows"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
  if needs_calibration(cfg.patterns, cfg.methods):
    if cfg.calib_windows < 1:
      calibrated = [m for m in cfg.methods if resolve_method(m).needs_calibration]
      raise ValueError(f"method {calibrated[0]} needs calib_windows >= 1")
    check_text_source(cfg.text, arg="text_file")  # the calibration text, read before loading
  check_model_options(cfg.dtype, cfg.cache_dir)
  cfg.runs()  # builds every AmberConfig: validates coverage and each method's score/policy
  if not cfg.output:
    raise ValueError("output must be given (the results JSON, resumed when it exists)")
  check_output_file(cfg.output, arg="output")


def plan_rows(
  patterns: Sequence[str], methods: Sequence[str], coverage: float, *, impl: str | None = None
) -> list[tuple[tuple[str, str], AmberConfig]]:
  """((method, pattern), AmberConfig) of every row: the dense row first when ``patterns`` asks
  for it (the generation runs compare every sparse answer with the dense one, so it must
  exist before them), then the sparse rows in the order of ``patterns``.

  Each method is a registry name (``amber_jax.calibrate.methods``; rows carry its canonical name):
  ``naive``: every linear input sparsified, score |x|; ``amber``: the auto policy with the
  robust score at ``coverage``. "dense" is one row whatever the methods. ``impl``: the
  sparse rows' matmul implementation (``amber_jax.core.backends``; None: the default).
  """
  rows = []
  for p in patterns:
    target = parse_target(p)
    if target is None:
      rows.insert(0, ((DENSE, DENSE), AmberConfig(pattern=None)))
      continue
    takes = "pattern" if isinstance(target, NMPattern) else "sparsity"
    for m in methods:
      method = resolve_method(m)
      if takes not in method.base.takes:
        continue  # e.g. teal at 2:4, amber at 50%: not a row of this grid
      if method.is_baseline:  # built by build_method (amber_jax.baselines), not an AmberConfig
        amber = AmberConfig(pattern=None, impl=impl)
      else:
        amber = method.amber_config(target, coverage=coverage, impl=impl)
      rows.append(((method.name, target_name(target)), amber))
  return rows


def build_row(
  setup, method: str, pattern: str, amber: AmberConfig, batch_size, dtype, show_progress
) -> BuiltMethod:
  """The params and plan of one (method, pattern) row (``amber_jax.calibrate.methods.
  build_method``: an N:M plan with the method's learned factors, pruned weights, or activation
  thresholds), calibrated on ``setup.calib_windows`` when it calibrates."""
  target = parse_target(pattern)
  m = resolve_method(DENSE if method == DENSE else method)
  calibrates = amber.needs_calibration or m.needs_calibration
  return build_method(
    setup.params,
    setup.config,
    m,
    pattern=target if isinstance(target, NMPattern) else None,
    sparsity=target if isinstance(target, float) else None,
    coverage=amber.coverage,
    calib_windows=setup.calib_windows if calibrates else None,
    batch_size=min(batch_size, 4),
    dtype=dtype,
    show_progress=show_progress,
    options={"impl": amber.impl} if m.kind == "nm" and amber.impl else None,
  )


def subsample_indices(task_name: str, n_examples: int, size: int | None, seed: int):
  """A seeded random subset of ``size`` example indices (sorted), the same for every model and
  run (the generator is seeded by ``seed`` and the task's name); None when ``size`` is None."""
  if size is None:
    return None
  if size >= n_examples:
    return list(range(n_examples))
  rng = np.random.default_rng([seed, zlib.crc32(task_name.encode("utf-8"))])
  return sorted(int(i) for i in rng.choice(n_examples, size=size, replace=False))


def entry_id(method: str, pattern: str, task: str) -> str:
  return f"{method}/{pattern}/{task}"


def load_results(
  path: str | os.PathLike,
  *,
  fmt: str = RESULTS_FORMAT,
  need: tuple[str, ...] = ("acc", "acc_norm", "n", "settings"),
) -> dict:
  """The entries of an existing results file ({} when it does not exist).

  Raises:
    ValueError: the file is unreadable, not JSON, not a results file of format ``fmt``, or an
      entry lacks one of ``need``.
  """
  path = Path(path)
  if not path.exists():
    return {}
  hint = "move it away or delete it to start over"
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"results file {path} is corrupt ({e}); {hint}") from e
  if not isinstance(data, dict) or data.get("format") != fmt:
    raise ValueError(f"results file {path} is not a {fmt} results file ({hint})")
  entries = data.get("results")
  if not isinstance(entries, dict):
    raise ValueError(f"results file {path} is corrupt: 'results' is not an object ({hint})")
  for key, e in entries.items():
    if not isinstance(e, dict) or any(k not in e for k in need):
      raise ValueError(f"results file {path} is corrupt: entry {key!r} lacks {need} ({hint})")
  return entries


def task_digest(task) -> str:
  """A short SHA-256 of a loaded task's content (examples, prompts, prefixes): an entry made
  on an edited task file, or on another file with the same task name, is not reused."""
  blob = json.dumps(dataclasses.asdict(task), sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def check_task_digests(entries: dict, tasks, path) -> None:
  """ValueError if an entry of one of ``tasks`` was made on different task content (entries
  written before digests were recorded carry none and are accepted)."""
  digests = {t.name: task_digest(t) for t in tasks}
  for key, entry in entries.items():
    made = entry.get("task_digest")
    now = digests.get(entry.get("task"))
    if made is not None and now is not None and made != now:
      raise ValueError(
        f"entry {key!r} in {path} was made on other content of task {entry['task']!r} (task "
        f"digest {made}, now {now}); use another --output or delete the file to rerun"
      )


def check_entry(key: str, entry: dict, expected: dict, path) -> None:
  got = entry["settings"]
  diffs = [
    f"{k}: file has {got.get(k)!r}, this run has {v!r}"
    for k, v in expected.items()
    if got.get(k) != v
  ]
  if diffs:
    raise ValueError(
      f"entry {key!r} in {path} was made with other settings ({'; '.join(diffs)}); "
      "use another --output or delete the file to rerun"
    )


def _load_tasks(cfg: ZeroShotConfig) -> list:
  tasks, seen = [], {}
  for t in cfg.tasks:
    task = load_bigbench_task(bigbench_task_path(t) if t in BIGBENCH_TASKS else t)
    if task.name in seen:
      raise ValueError(f"tasks {seen[task.name]!r} and {t!r} share the name {task.name!r}")
    seen[task.name] = t
    if cfg.num_fewshot > len(task.examples) - 1:
      raise ValueError(
        f"num_fewshot={cfg.num_fewshot} needs more than the {len(task.examples)} examples "
        f"of task {task.name!r}"
      )
    tasks.append(task)
  return tasks


def run_zero_shot(cfg: ZeroShotConfig, *, log=print, show_progress: bool = True) -> dict:
  """Evaluates every (method x pattern, task) pair not already in ``cfg.output``.

  The model is loaded once and each plan built once (only when one of its pairs is pending).
  After each pair the whole results file is rewritten atomically. Returns the file's contents:
  ``format``, ``results`` (id -> acc, acc_stderr, acc_norm, acc_norm_stderr, n, limit,
  num_fewshot, method, pattern, task, seconds, settings, and coverage/skip_layers of the plan),
  ``config``, ``versions``, ``device``.

  Raises:
    ValueError: a corrupt results file, an entry made with other settings, a bad task file, or a
      pattern that does not fit the model; all before the weights are loaded.
  """
  tasks = _load_tasks(cfg)
  runs = cfg.runs()
  entries = load_results(cfg.output)
  for key, entry in entries.items():
    check_entry(key, entry, cfg.settings(key.split("/", 1)[0]), cfg.output)
  check_task_digests(entries, tasks, cfg.output)
  wanted = [(row, amber, task) for row, amber in runs for task in tasks]
  total = len(wanted)
  pending = [w for w in wanted if entry_id(*w[0], w[2].name) not in entries]
  done = total - len(pending)
  if done:
    log(f"resuming {cfg.output}: {done} of {total} pairs already finished, skipped")
  result = {
    "format": RESULTS_FORMAT,
    "results": entries,
    "config": recorded_config(cfg),
    **environment(),
  }
  if not pending:
    log(f"nothing to do: all {total} pairs are in {cfg.output}")
    return result

  def validate(model_config):
    for _, amber in runs:
      amber.validate_for(model_config)

  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows if cfg.needs_calibration() else 0,
    dtype=cfg.dtype,
    validate=validate,
    show_progress=show_progress,
    log=log,
  )
  tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.cache_dir, log=lambda *a: None))
  dtype = DTYPES[cfg.dtype]
  result["model_config"] = dataclasses.asdict(setup.config)
  plans = {}
  for (method, pattern), amber, task in pending:
    if (method, pattern) not in plans:
      built = build_row(setup, method, pattern, amber, cfg.batch_size, dtype, show_progress)
      plans[(method, pattern)] = built
      if built.info is not None:
        log(
          f"plan {method}/{pattern}: {100 * built.coverage:.1f}% of linear MACs "
          f"sparsified, q/gate dense in layers {list(built.info.skip_layers) or 'none'}"
        )
      elif method != DENSE:
        log(f"{method}/{pattern}: {100 * built.removed:.1f}% of linear MACs removed")
    built = plans[(method, pattern)]
    start = time.perf_counter()
    metrics = evaluate_task(
      built.params,
      task,
      config=setup.config,
      tokenizer=tokenizer,
      plan=built.plan,
      num_fewshot=cfg.num_fewshot,
      limit=cfg.limit,
      indices=subsample_indices(task.name, len(task.examples), cfg.subsample, cfg.seed),
      batch_size=cfg.batch_size,
      dtype=dtype,
      seed=cfg.seed,
      show_progress=show_progress,
    )
    key = entry_id(method, pattern, task.name)
    entries[key] = {
      **metrics,
      "limit": cfg.limit,
      "subsample": cfg.subsample,
      "num_fewshot": cfg.num_fewshot,
      "method": method,
      "pattern": pattern,
      "task": task.name,
      "task_digest": task_digest(task),
      "coverage": built.coverage,
      "removed": built.removed,
      "skip_layers": [] if built.info is None else list(built.info.skip_layers),
      "seconds": time.perf_counter() - start,
      "settings": cfg.settings(method),
    }
    write_json_atomic(cfg.output, result)
    done += 1
    log(
      f"[{done}/{total}] {key}: acc {metrics['acc']:.3f} acc_norm {metrics['acc_norm']:.3f} "
      f"(n={metrics['n']}, {entries[key]['seconds']:.1f}s)"
    )
  return result


def _points(x: float) -> str:
  return f"{100 * x:.1f}"


def _paired_delta(entries: dict, row, dense, tasks) -> tuple[float, float] | None:
  """Change of the task-averaged acc_norm vs dense and its paired standard error.

  Needs per-example results of both rows on the same examples of every task (entries made by
  this version); the difference is taken example by example, so the error is that of the
  change, not of either accuracy. None when that is not available.
  """
  means, variances = [], []
  for t in tasks:
    a, b = entries.get(entry_id(*row, t)), entries.get(entry_id(*dense, t))
    if a is None or b is None or "correct_norm" not in a or "correct_norm" not in b:
      return None
    if len(a["correct_norm"]) != len(b["correct_norm"]) or a.get("subsample") != b.get("subsample"):
      return None
    d = np.asarray(a["correct_norm"], np.float64) - np.asarray(b["correct_norm"], np.float64)
    means.append(d.mean())
    variances.append(d.var(ddof=1) / len(d) if len(d) > 1 else math.nan)
  return float(np.mean(means)), float(math.sqrt(sum(variances)) / len(tasks))


def report_markdown(results: dict) -> str:
  """The paper-style table of a results file (or of run_zero_shot's return value).

  Rows: dense, then each (method, pattern) in the order first seen; columns: each task's
  acc_norm (in %), their average, and the average's change vs dense in points, with its paired
  standard error where per-example results exist ("-" where an entry is missing or there is no
  dense row). A last row gives dense's per-task standard errors.
  """
  entries = results.get("results", results)
  rows, tasks = [], []
  for e in entries.values():
    if (e["method"], e["pattern"]) not in rows:
      rows.append((e["method"], e["pattern"]))
    if e["task"] not in tasks:
      tasks.append(e["task"])
  rows.sort(key=lambda r: r != (DENSE, DENSE))  # stable: dense first, the rest as seen
  by_key = {(e["method"], e["pattern"], e["task"]): e["acc_norm"] for e in entries.values()}

  def average(row):
    vals = [by_key.get((*row, t)) for t in tasks]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)

  dense = (DENSE, DENSE)
  dense_avg = average(dense) if dense in rows else None
  body = []
  for row in rows:
    name = DENSE if row == dense else f"{row[1]} {row[0]}"
    cells = [_points(by_key[(*row, t)]) if (*row, t) in by_key else "-" for t in tasks]
    avg = average(row)
    delta = "-"
    if avg is not None and dense_avg is not None and not math.isnan(avg):
      delta = f"{100 * (avg - dense_avg):+.1f}"
      paired = _paired_delta(entries, row, dense, tasks) if row != dense else None
      if paired is not None:
        delta = f"{100 * paired[0]:+.1f} ± {100 * paired[1]:.1f}"
    body.append([name, *cells, "-" if avg is None else _points(avg), delta])
  if dense in rows:
    errs = [entries.get(entry_id(*dense, t), {}).get("acc_norm_stderr") for t in tasks]
    cells = ["-" if e is None else f"± {100 * e:.1f}" for e in errs]
    avg_err = None if None in errs else math.sqrt(sum(e * e for e in errs)) / len(errs)
    body.append(
      ["(dense stderr)", *cells, "-" if avg_err is None else f"± {100 * avg_err:.1f}", ""]
    )
  header = ["model", *tasks, "average", "vs dense (points)"]
  ns = sorted({(e["n"], e["num_fewshot"]) for e in entries.values()})
  note = ", ".join(f"{n} ({k}-shot)" for n, k in ns)
  subs = {e.get("subsample") for e in entries.values()}
  how = "all examples or the first `limit`"
  if subs != {None}:
    how = f"a seeded random subset of {', '.join(str(x) for x in sorted(subs - {None}))} per task"
  return (
    markdown_table(header, body) + f"\n\nacc_norm in %, BIG-bench multiple choice; {how}; "
    f"examples per task: {note}. ± is one standard error (the change's is paired, example by "
    "example against dense).\n"
  )
