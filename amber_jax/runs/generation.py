"""Generative evaluation of dense and N:M-sparse plans: exact match and agreement with dense.

Each (method x pattern, task) pair is one entry of the results JSON (``"method/pattern/task"``),
written atomically after every pair and skipped when rerun, as in :mod:`amber_jax.runs.zero_shot`
(whose plan rows, settings checks and file handling this reuses). Prefill follows the plan;
decode is dense. The dense row runs first and stores its answers, so every sparse entry also
reports the share of its answers equal to the dense model's (``agreement``).
"""

from __future__ import annotations

import dataclasses
import math
import time

from amber_jax.data.bigbench import BIGBENCH_TASKS, bigbench_task_path
from amber_jax.data.texts import DEFAULT_TEXT
from amber_jax.eval.generative_tasks import (
  evaluate_generation,
  load_generative_task,
  special_token_ids,
)
from amber_jax.io.atomic import write_json_atomic
from amber_jax.io.loading import load_tokenizer
from amber_jax.io.sources import DEFAULT_MODEL, resolve_model
from amber_jax.runs.common import DTYPES, environment, prepare_eval, recorded_config
from amber_jax.runs.markdown import markdown_table
from amber_jax.runs.zero_shot import (
  DENSE,
  METHODS,
  build_row,
  calibration_settings,
  check_entry,
  check_eval_grid,
  check_task_digests,
  entry_id,
  load_results,
  method_calibrates,
  needs_calibration,
  plan_rows,
  task_digest,
)

RESULTS_FORMAT = "amber_jax.generation/1"
DEFAULT_TASKS = ("sports_understanding", "navigate", "date_understanding")
_NEED = ("exact_match", "n", "answers", "settings")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
  """A generative run; validated on construction (before any loading)."""

  model: str = DEFAULT_MODEL
  tasks: tuple[str, ...] = DEFAULT_TASKS  # packaged BIG-bench names or JSON files
  patterns: tuple[str, ...] = ("dense", "8:16", "2:4")
  methods: tuple[str, ...] = METHODS  # amber_jax.calibrate.methods names, per sparse pattern
  num_fewshot: int = 3  # solved examples before each question: they teach the answer format
  limit: int | None = 100
  max_new_tokens: int | None = None  # None: the longest accepted answer's tokens + 2, per task
  batch_size: int = 8
  dtype: str = "float32"
  seed: int = 1234
  coverage: float = 0.55
  text: str = DEFAULT_TEXT
  seq_len: int = 512
  num_windows: int = 8
  calib_windows: int = 8
  output: str = ""
  cache_dir: str = ""
  impl: str | None = None  # sparse matmul implementation (amber_jax.core.backends); speed only

  def __post_init__(self):
    check_eval_grid(self)
    if self.max_new_tokens is not None and self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1 (or None), got {self.max_new_tokens}")

  def needs_calibration(self) -> bool:
    return needs_calibration(self.patterns, self.methods)

  def runs(self):
    return plan_rows(self.patterns, self.methods, self.coverage, impl=self.impl)

  def settings(self, method: str) -> dict:
    s = {
      "model": self.model,
      "limit": self.limit,
      "num_fewshot": self.num_fewshot,
      "max_new_tokens": self.max_new_tokens,
      "dtype": self.dtype,
      "seed": self.seed,
    }
    if method_calibrates(method):
      s["calibration"] = calibration_settings(self)
    return s


def run_generation(cfg: GenerationConfig, *, log=print, show_progress: bool = True) -> dict:
  """Evaluates every (method x pattern, task) pair not already in ``cfg.output``.

  Raises:
    ValueError: a corrupt results file, an entry made with other settings, a bad task file or a
      pattern that does not fit the model; all before the weights are loaded.
  """
  tasks = []
  for t in cfg.tasks:
    path = bigbench_task_path(t) if t in BIGBENCH_TASKS else t
    tasks.append(load_generative_task(path, num_fewshot=cfg.num_fewshot, seed=cfg.seed))
  if len({t.name for t in tasks}) != len(tasks):
    raise ValueError(f"tasks share a name: {[t.name for t in tasks]}")
  runs = cfg.runs()
  entries = load_results(cfg.output, fmt=RESULTS_FORMAT, need=_NEED)
  for key, entry in entries.items():
    check_entry(key, entry, cfg.settings(key.split("/", 1)[0]), cfg.output)
  check_task_digests(entries, tasks, cfg.output)
  wanted = [(row, amber, task) for row, amber in runs for task in tasks]
  pending = [w for w in wanted if entry_id(*w[0], w[2].name) not in entries]
  result = {
    "format": RESULTS_FORMAT,
    "results": entries,
    "config": recorded_config(cfg),
    **environment(),
  }
  done = len(wanted) - len(pending)
  if done:
    log(f"resuming {cfg.output}: {done} of {len(wanted)} pairs already finished, skipped")
  if not pending:
    return result
  sparse_amber = cfg.needs_calibration()
  max_new_tokens = {}  # task name -> tokens generated per answer

  def validate(model_config):
    """Before the weights load: every plan fits the model, and every prompt of the pending
    tasks plus its answer fits the model's context."""
    for _, amber in runs:
      amber.validate_for(model_config)
    tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.cache_dir, log=lambda *a: None))
    for task in {t.name: t for _, _, t in pending}.values():
      max_new_tokens[task.name] = max_new = _max_new_tokens(cfg, tokenizer, task)
      n = len(task.examples) if cfg.limit is None else min(cfg.limit, len(task.examples))
      longest = max(len(tokenizer.encode(ex.prompt).ids) for ex in task.examples[:n])
      if longest + max_new > model_config.seq_len_limit:
        what = "max_new_tokens" if cfg.max_new_tokens else "its longest answer's tokens + 2"
        raise ValueError(
          f"task {task.name!r}: a prompt of {longest} tokens + {max_new} new tokens "
          f"({what}) exceeds the model's context of {model_config.seq_len_limit} positions; "
          "lower max_new_tokens or num_fewshot"
        )

  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows if sparse_amber else 0,
    dtype=cfg.dtype,
    validate=validate,
    show_progress=show_progress,
    log=log,
  )
  source = resolve_model(cfg.model, cfg.cache_dir, log=lambda *a: None)
  tokenizer = load_tokenizer(source)
  eos_ids = special_token_ids(source.path)[1]  # answers are cut at the first of them
  dtype = DTYPES[cfg.dtype]
  plans = {}
  for (method, pattern), amber, task in pending:
    if (method, pattern) not in plans:
      plans[(method, pattern)] = build_row(
        setup, method, pattern, amber, cfg.batch_size, dtype, show_progress
      )
    built = plans[(method, pattern)]
    dense_entry = entries.get(entry_id(DENSE, DENSE, task.name))
    max_new = max_new_tokens[task.name]
    start = time.perf_counter()
    metrics = evaluate_generation(
      built.params,
      task,
      config=setup.config,
      tokenizer=tokenizer,
      plan=built.plan,
      limit=cfg.limit,
      max_new_tokens=max_new,
      batch_size=cfg.batch_size,
      dtype=dtype,
      reference=None if dense_entry is None else dense_entry["answers"],
      eos_token_ids=eos_ids,
      show_progress=show_progress,
    )
    key = entry_id(method, pattern, task.name)
    entries[key] = {
      **metrics,
      "max_new_tokens": max_new,
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
    agree = f", agreement with dense {metrics['agreement']:.3f}" if "agreement" in metrics else ""
    log(
      f"[{done}/{len(wanted)}] {key}: exact match {metrics['exact_match']:.3f}{agree} "
      f"(n={metrics['n']}, {entries[key]['seconds']:.1f}s)"
    )
  return result


def _max_new_tokens(cfg: GenerationConfig, tokenizer, task) -> int:
  """``cfg.max_new_tokens``, else the longest accepted answer's tokens + 2."""
  return cfg.max_new_tokens or 2 + max(
    len(tokenizer.encode(" " + a, add_special_tokens=False).ids)
    for ex in task.examples
    for a in ex.answers
  )


def generation_markdown(results: dict) -> str:
  """Table: rows = dense, then method x pattern; per task exact match (%) and, for sparse rows,
  the share of answers equal to the dense model's."""
  entries = results.get("results", results)
  rows, tasks = [], []
  for e in entries.values():
    if (e["method"], e["pattern"]) not in rows:
      rows.append((e["method"], e["pattern"]))
    if e["task"] not in tasks:
      tasks.append(e["task"])
  rows.sort(key=lambda r: r != (DENSE, DENSE))
  by_key = {(e["method"], e["pattern"], e["task"]): e for e in entries.values()}
  header = ["model"] + [f"{t} EM" for t in tasks] + [f"{t} = dense" for t in tasks]
  body = []
  for row in rows:
    cells = []
    for field in ("exact_match", "agreement"):
      for t in tasks:
        e = by_key.get((*row, t))
        v = None if e is None else e.get(field)
        if v is None or (isinstance(v, float) and math.isnan(v)):
          cells.append("-")
        elif field == "exact_match":
          cells.append(f"{100 * v:.1f} ± {100 * e['exact_match_stderr']:.1f}")
        else:
          cells.append(f"{100 * v:.1f}")
    body.append([DENSE if row == (DENSE, DENSE) else f"{row[1]} {row[0]}", *cells])
  ns = sorted({(e["n"], e["num_fewshot"]) for e in entries.values()})
  note = ", ".join(f"n={n} ({k}-shot)" for n, k in ns)
  return (
    markdown_table(header, body) + "\n\nEM: exact match of the greedy answer (sparse prefill, "
    "dense decode; cut at the first newline) in % ± stderr; '= dense': share of answers equal "
    f"to the dense model's, in %. Questions per task: {note}.\n"
  )
