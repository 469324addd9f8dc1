"""The paper-style comparison: every method of the registry on equal terms, resumable.

Rows are methods (``amber_jax.calibrate.methods``: dense, naive, amber, the project's best
recipe, and the baselines wanda, sparsegpt, teal, cats), columns are targets:

* ``2:4``, ``4:8``, ``8:16``: N:M, for the N:M methods (activations) and the weight methods
  (weights, every linear);
* ``same_sites``: unstructured 50% on the sites that amber sparsifies at ``match_pattern``
  (weight methods: 50% of those sites' weights; TEAL: those sites' inputs at 50% on average
  per layer; CATS: the gated activation of the layers whose ``down`` amber sparsifies);
* ``same_removed``: unstructured at the share of linear multiply-adds that amber removes at
  ``match_pattern``, over every linear (CATS: its MLP sparsity chosen so that up and down lose
  that share of the model's multiply-adds).

Each (method, column) entry holds the perplexity of the main text's evaluation windows and of a
second text (never calibrated on), the BIG-bench multiple-choice results per task (per-example,
so the change against dense gets a paired standard error), the agreement of greedy generations
with dense, and the method's calibration time, coverage and removed share. Calibration always
uses the main text's windows after the evaluation windows. The results JSON is rewritten
atomically after each entry; a rerun with the same output skips finished entries (an entry made
with other settings is an error naming it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from amber_jax.calibrate.methods import (
  BEST,
  build_method,
  resolve_method,
)
from amber_jax.core.patterns import NMPattern
from amber_jax.data.bigbench import BIGBENCH_TASKS, bigbench_task_path, load_bigbench_task
from amber_jax.eval.agreement import generation_agreement
from amber_jax.eval.multiple_choice import evaluate_task
from amber_jax.eval.perplexity import perplexity
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.io.loading import load_tokenizer
from amber_jax.io.sources import resolve_model
from amber_jax.plan.coverage import site_macs
from amber_jax.runs.checks import check_text_source
from amber_jax.runs.common import (
  DTYPES,
  EvalRunOptions,
  check_model_options,
  environment,
  evaluation_texts,
  prepare_eval,
  recorded_config,
)
from amber_jax.runs.markdown import markdown_table
from amber_jax.runs.zero_shot import subsample_indices

RESULTS_FORMAT = "amber_jax.compare/1"
DEFAULT_METHODS = ("dense", "naive", "amber", "best", "wanda", "sparsegpt", "teal", "cats")
NM_COLUMNS = ("2:4", "4:8", "8:16")
MATCHED_COLUMNS = ("same_sites", "same_removed")
DENSE_COLUMN = "dense"
CATS_MAX_SPARSITY = 0.95  # a same_removed target CATS would need more for is left out


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig(EvalRunOptions):
  """A comparison run (validated on construction, before anything is loaded)."""

  transfer_text: str = "enwiki"  # the second text: evaluated, never calibrated on
  methods: tuple[str, ...] = DEFAULT_METHODS
  patterns: tuple[str, ...] = NM_COLUMNS
  matched: tuple[str, ...] = MATCHED_COLUMNS
  match_pattern: str = "8:16"  # the amber plan the matched columns copy
  coverage: float = 0.55  # the coverage target of the N:M methods with one
  tasks: tuple[str, ...] = BIGBENCH_TASKS
  subsample: int = 50  # BIG-bench examples per task (a seeded random subset)
  seed: int = 1234
  gen_prompts: int = 4  # generation agreement: prompts from the text after the windows
  gen_prompt_len: int = 64
  gen_tokens: int = 32
  teal_greedy_step: float = 0.05
  teal_greedy_windows: int = 1
  output: str = ""

  def __post_init__(self):
    check_model_options(self.dtype, self.cache_dir)
    check_text_source(self.text, arg="text")
    if self.transfer_text:
      check_text_source(self.transfer_text, arg="transfer_text")
    if not self.output:
      raise ValueError("output must be given (the results JSON; resumed when it exists)")
    check_output_file(self.output, arg="output")
    if not self.methods:
      raise ValueError("methods is empty")
    for m in self.methods:
      resolve_method(m)  # ValueError naming the valid methods
    for p in (*self.patterns, self.match_pattern):
      NMPattern.parse(p)
    unknown = sorted(set(self.matched) - set(MATCHED_COLUMNS))
    if unknown:
      raise ValueError(f"matched has unknown columns {unknown}; valid: {MATCHED_COLUMNS}")
    for name in ("seq_len", "num_windows", "calib_windows", "batch_size", "subsample"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.gen_prompts < 0 or self.gen_tokens < 1 or self.gen_prompt_len < 1:
      raise ValueError("gen_prompts must be >= 0, gen_tokens and gen_prompt_len >= 1")
    if not 0 < self.coverage <= 1:
      raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")

  def settings(self) -> dict:
    """What every entry must have been made with to be reused."""
    keys = (
      "model", "seq_len", "num_windows", "calib_windows", "dtype", "text", "transfer_text",
      "coverage", "match_pattern", "subsample", "seed", "gen_prompts", "gen_prompt_len",
      "gen_tokens", "teal_greedy_step", "teal_greedy_windows",
    )  # fmt: skip
    return {k: getattr(self, k) for k in keys} | {"tasks": list(self.tasks)}

  def cells(self) -> list[tuple[str, str]]:
    """(method canonical name, column) of every entry, in table order."""
    out = []
    for given in self.methods:
      m = resolve_method(given)
      if m.is_dense:
        out.append((m.name, DENSE_COLUMN))
        continue
      if "pattern" in m.base.takes:
        out += [(m.name, str(NMPattern.parse(p))) for p in self.patterns]
      if "sparsity" in m.base.takes:
        out += [(m.name, c) for c in self.matched]
    return list(dict.fromkeys(out))


def entry_key(method: str, column: str) -> str:
  return f"{method}/{column}"


def load_compare_results(path) -> dict:
  """The entries of a results file (empty when it does not exist); ValueError naming a file
  that is not one."""
  path = Path(path)
  if not path.exists():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ValueError(f"results file {os.fspath(path)!r} is unreadable: {e}") from None
  if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
    raise ValueError(f"{os.fspath(path)!r} is not a comparison results file ({RESULTS_FORMAT})")
  return dict(data.get("entries", {}))


def _matched_target(method, column: str, amber_entry: dict, config) -> dict:
  """build_method's (sparsity, sites) for a matched column, from the amber entry it copies."""
  sites = [tuple(s) for s in amber_entry["sites"]]
  if column == "same_sites":
    if method.name == "cats":
      return {"sparsity": 0.5, "sites": [(l, "gate") for l, s in sites if s == "down"]}
    return {"sparsity": 0.5, "sites": sites}
  removed = float(amber_entry["removed"])
  if method.name == "cats":
    macs = site_macs(config)
    mlp_share = (macs["up"] + macs["down"]) / sum(macs.values())
    return {"sparsity": removed / mlp_share, "sites": "all"}
  return {"sparsity": removed, "sites": "all"}


def _paired_change(entry: dict, dense: dict, tasks) -> tuple[float, float] | None:
  """Change of the task-averaged acc_norm vs dense and its paired standard error."""
  means, variances = [], []
  for t in tasks:
    a, b = entry["bigbench"].get(t), dense["bigbench"].get(t)
    if a is None or b is None or len(a["correct_norm"]) != len(b["correct_norm"]):
      return None
    d = np.asarray(a["correct_norm"], np.float64) - np.asarray(b["correct_norm"], np.float64)
    means.append(d.mean())
    variances.append(d.var(ddof=1) / len(d) if len(d) > 1 else math.nan)
  return float(np.mean(means)), float(math.sqrt(sum(variances)) / len(tasks))


def run_compare(cfg: CompareConfig, *, log=print, show_progress: bool = True) -> dict:
  """Evaluates every entry of ``cfg.cells()`` not already in ``cfg.output`` (see the module
  docstring); returns the results file's contents."""
  entries = load_compare_results(cfg.output)
  settings = cfg.settings()
  for key, entry in entries.items():
    if entry.get("settings") != settings:
      diff = sorted(
        k for k in set(settings) | set(entry.get("settings", {}))
        if settings.get(k) != entry.get("settings", {}).get(k)
      )  # fmt: skip
      raise ValueError(
        f"entry {key!r} of {cfg.output} was made with other settings ({', '.join(diff)}); use "
        "another output"
      )
  cells = cfg.cells()
  pending = [c for c in cells if entry_key(*c) not in entries]
  result = {
    "format": RESULTS_FORMAT,
    "entries": entries,
    "config": recorded_config(cfg),
    **environment(),
  }
  if not pending:
    log(f"nothing to do: all {len(cells)} entries are in {cfg.output}")
    return result
  if len(pending) < len(cells):
    log(f"resuming {cfg.output}: {len(cells) - len(pending)} of {len(cells)} entries finished")
  tasks = [
    load_bigbench_task(bigbench_task_path(t) if t in BIGBENCH_TASKS else t) for t in cfg.tasks
  ]
  setup = prepare_eval(
    model=cfg.model,
    text=cfg.text,
    cache_dir=cfg.cache_dir,
    seq_len=cfg.seq_len,
    num_windows=cfg.num_windows,
    calib_windows=cfg.calib_windows,
    dtype=cfg.dtype,
    show_progress=show_progress,
    log=log,
  )
  config, dtype = setup.config, DTYPES[cfg.dtype]
  tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.cache_dir, log=lambda *a: None))
  texts = evaluation_texts(setup, cfg, log=log)
  need = cfg.gen_prompts * cfg.gen_prompt_len
  if len(setup.rest_tokens) < need:
    raise ValueError(f"the text has {len(setup.rest_tokens)} tokens after the windows; need {need}")
  prompts = setup.rest_tokens[:need].reshape(cfg.gen_prompts, cfg.gen_prompt_len)
  result["model_config"] = dataclasses.asdict(config)

  def build(method_name: str, column: str):
    m = resolve_method(method_name)
    kwargs: dict = {}
    if column in MATCHED_COLUMNS:
      amber = entries.get(entry_key("amber", cfg.match_pattern)) or evaluate(
        "amber", cfg.match_pattern
      )
      kwargs = _matched_target(m, column, amber, config)
      if m.name == "cats" and kwargs["sparsity"] >= CATS_MAX_SPARSITY:
        return None, kwargs
    elif column != DENSE_COLUMN:
      kwargs["pattern"] = column
    options = {}
    if m.name == "teal":
      options = {"greedy_step": cfg.teal_greedy_step, "greedy_windows": cfg.teal_greedy_windows}
    built = build_method(
      setup.params,
      config,
      m,
      coverage=cfg.coverage,
      calib_windows=setup.calib_windows,
      batch_size=cfg.batch_size,
      dtype=dtype,
      show_progress=show_progress,
      options=options,
      **kwargs,
    )
    return built, kwargs

  def evaluate(method_name: str, column: str) -> dict:
    key = entry_key(method_name, column)
    start = time.perf_counter()
    built, target = build(method_name, column)
    if built is None:
      entry = {"method": method_name, "column": column, "skipped": (
        f"needs sparsity {target['sparsity']:.2f} >= {CATS_MAX_SPARSITY}"
      ), "settings": settings}  # fmt: skip
      entries[key] = entry
      write_json_atomic(cfg.output, result)
      return entry
    ppl = {
      name: perplexity(
        built.params, w, config=config, plan=built.plan, batch_size=cfg.batch_size, dtype=dtype,
        show_progress=show_progress, desc=f"{key} {name}",
      ).perplexity
      for name, w in texts.items()
    }  # fmt: skip
    bigbench = {}
    for task in tasks:
      metrics = evaluate_task(
        built.params,
        task,
        config=config,
        tokenizer=tokenizer,
        plan=built.plan,
        indices=subsample_indices(task.name, len(task.examples), cfg.subsample, cfg.seed),
        batch_size=cfg.batch_size,
        dtype=dtype,
        seed=cfg.seed,
        show_progress=False,
      )
      bigbench[task.name] = {k: metrics[k] for k in ("acc", "acc_norm", "n", "correct_norm")}
    generation = None
    if cfg.gen_prompts and not built.method.is_dense:
      gen = generation_agreement(
        setup.params,
        prompts,
        config=config,
        plan=built.plan,
        new_tokens=cfg.gen_tokens,
        dtype=dtype,
        sparse_params=built.params,
      )
      generation = {"agreement": gen.agreement, "prefix_agreement": gen.prefix_agreement}
    entry = {
      "method": method_name,
      "column": column,
      "pattern": built.pattern,
      "sparsity": built.sparsity,
      "coverage": built.coverage,
      "removed": built.removed,
      "calib_seconds": built.seconds,
      "perplexity": ppl,
      "bigbench": bigbench,
      "generation": generation,
      "record": built.record,
      "seconds": time.perf_counter() - start,
      "settings": settings,
    }
    if built.plan is not None and built.info is not None:
      entry["sites"] = [[l, s] for l, s in built.plan.enabled_sites()]
    if "sites" in target and target["sites"] != "all":
      entry["target_sites"] = len(target["sites"])
    entries[key] = entry
    write_json_atomic(cfg.output, result)
    first = next(iter(ppl))
    log(
      f"{key}: perplexity {ppl[first]:.2f} ({first}), removed {100 * built.removed:.1f}% of "
      f"linear MACs, calibration {built.seconds:.1f} s, entry {entry['seconds']:.0f} s"
    )
    return entry

  for method_name, column in pending:
    if entry_key(method_name, column) not in entries:  # a matched column may have built amber
      evaluate(method_name, column)
  return result


def compare_markdown(results: dict) -> str:
  """The comparison table: rows = methods, per column the perplexity on each text (change vs
  dense), the BIG-bench average acc_norm change with its paired standard error, and the share
  of generated tokens equal to dense; then the calibration cost of each method."""
  entries = results["entries"]
  cfg = results["config"]
  dense = entries.get(entry_key("dense", DENSE_COLUMN))
  if dense is None:
    raise ValueError("the results have no dense entry: nothing to compare against")
  texts = list(dense["perplexity"])
  tasks = list(dense["bigbench"])
  header = ["method", "target", "removed"]
  header += [f"ppl {t}" for t in texts] + ["BIG-bench Δ (points)", "gen = dense", "calib s"]
  rows = []
  # The default row order, then any other method in the order of the entries (a resumed file
  # may have been filled by runs of other --methods).
  method_order = [resolve_method(m).name for m in (*DEFAULT_METHODS, *cfg["methods"])]
  method_order += [e["method"] for e in entries.values() if e["method"] not in method_order]
  column_order = [DENSE_COLUMN, *NM_COLUMNS, *MATCHED_COLUMNS]

  def order(e):
    m = e["method"]
    rank = method_order.index(m) if m in method_order else len(method_order)
    col = column_order.index(e["column"]) if e["column"] in column_order else len(column_order)
    return rank, col

  for e in sorted(entries.values(), key=order):
    if "skipped" in e:
      rows.append([e["method"], e["column"], "-", *["-"] * len(texts), e["skipped"], "-", "-"])
      continue
    ppl = [
      f"{e['perplexity'][t]:.2f}"
      + (
        "" if e is dense else f" ({100 * (e['perplexity'][t] / dense['perplexity'][t] - 1):+.0f}%)"
      )
      for t in texts
    ]
    change = None if e is dense else _paired_change(e, dense, tasks)
    delta = "-" if change is None else f"{100 * change[0]:+.1f} ± {100 * change[1]:.1f}"
    gen = "-" if not e.get("generation") else f"{100 * e['generation']['agreement']:.0f}%"
    target = e["column"]
    if e["column"] in MATCHED_COLUMNS:
      target = f"{e['column']} ({100 * e['sparsity']:.0f}%)"
    rows.append(
      [
        e["method"],
        target,
        f"{100 * e['removed']:.1f}%",
        *ppl,
        delta,
        gen,
        f"{e['calib_seconds']:.0f}",
      ]
    )
  avg = np.mean([dense["bigbench"][t]["acc_norm"] for t in tasks])
  n = sum(dense["bigbench"][t]["n"] for t in tasks)
  note = (
    f"\n\n{cfg['model']}, {cfg['num_windows']} windows of {cfg['seq_len']} tokens per text; "
    f"calibration: {cfg['calib_windows']} windows of {cfg['text']} after the evaluation windows "
    f"({cfg['transfer_text'] or 'no second text'} never calibrated on). 'removed': share of the "
    "linear multiply-adds (LM head excluded) whose input or weight is zero at the target (N:M: "
    "coverage x (1 - N/M); weights: exact zero share). BIG-bench: acc_norm averaged over "
    f"{len(tasks)} tasks ({n} examples, a seeded subset of {cfg['subsample']} per task; dense "
    f"{100 * avg:.1f}%), change vs dense ± paired stderr. 'gen = dense': greedy tokens equal "
    f"to dense over {cfg['gen_prompts']} prompts x {cfg['gen_tokens']} tokens (weight methods: "
    f"pruned in decode too). Matched columns copy amber at {cfg['match_pattern']}: same_sites "
    "= 50% of amber's sites (CATS: the MLPs whose down amber sparsifies), same_removed = "
    "amber's removed share over every linear."
  )
  return markdown_table(header, rows) + note


def save_compare_plot(results: dict, path) -> Path:
  """Perplexity on the main text per method and target, dense as a line (``plots``)."""
  from amber_jax.runs.plots import save_method_comparison

  entries = [e for e in results["entries"].values() if "skipped" not in e]
  dense = results["entries"][entry_key("dense", DENSE_COLUMN)]
  text = next(iter(dense["perplexity"]))
  columns = [c for c in (*NM_COLUMNS, *MATCHED_COLUMNS) if any(e["column"] == c for e in entries)]
  values = {e["method"]: {} for e in entries if e["method"] != "dense"}
  for e in entries:
    if e["method"] != "dense":
      values[e["method"]][e["column"]] = e["perplexity"][text]
  return save_method_comparison(
    values,
    columns,
    dense["perplexity"][text],
    path,
    ylabel=f"perplexity on {text} (log scale)",
    title=f"{results['config']['model']}: methods on equal terms",
  )


__all__ = [
  "BEST",
  "CompareConfig",
  "compare_markdown",
  "load_compare_results",
  "run_compare",
  "save_compare_plot",
]
