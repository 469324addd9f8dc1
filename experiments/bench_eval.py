"""Multiple-choice scoring speed on the real model: one request at a time vs batched vs packed.

Command (the numbers in BENCHMARKS.md):

    python experiments/bench_eval.py --markdown

Scores the first --limit questions of each --tasks task (dense model, float32) three ways, side by
side in one run, each timed after a full untimed pass that compiles its shapes, modes interleaved
over --repeats rounds (the best round is reported, so a busy machine hurts every mode alike):

* ``one-at-a-time``: batch 1, one row per (question, choice), as a simple loop would do;
* ``batched``: --batch_size rows per call, one row per choice, padded to bucketed lengths;
* ``batched+packed``: the same, with the choices of a question packed behind one shared context
  (the default of ``amber_jax.eval.multiple_choice``).

It prints examples (questions) per second, scored tokens per second and the speed-up over
one-at-a-time, and checks that the three modes give the same accuracy. About 4 minutes on 2 CPU
cores with the cached SmolLM2-135M.
"""

from __future__ import annotations

import time

from _common import cpu_model_name, define_options, run, usable_cpus
from absl import flags

OPTS = define_options(
  "model", "batch_size", "cache_dir", batch_size=(8, "Rows per call for the batched modes.")
)
_MODEL, _BATCH = OPTS.flag("model"), OPTS.flag("batch_size")
_TASKS = flags.DEFINE_list(
  "tasks",
  ["navigate", "date_understanding", "causal_judgment"],
  "Packaged BIG-bench tasks (one-token, multi-token and long-context choices by default).",
)
_LIMIT = flags.DEFINE_integer("limit", 32, "Questions per task.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed rounds per mode (best reported).")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print a markdown table.")

MODES = {  # name -> (batch size, pack)
  "one-at-a-time": lambda b: (1, False),
  "batched": lambda b: (b, False),
  "batched+packed": lambda b: (b, True),
}


def main(argv):
  del argv

  from amber_jax.data.bigbench import MCTask, bigbench_task_path, load_bigbench_task
  from amber_jax.eval.multiple_choice import evaluate_task
  from amber_jax.io.loading import load_model, load_tokenizer, to_device
  from amber_jax.io.sources import resolve_model
  from amber_jax.runs.checks import check_at_least, check_nonempty
  from amber_jax.runs.common import check_cache_dir

  for flag in (_LIMIT, _BATCH, _REPEATS):
    check_at_least(flag.value, 1, arg=f"--{flag.name}")
  check_nonempty(_TASKS.value, arg="--tasks", what="task")
  cache = OPTS.cache_dir
  check_cache_dir(cache)
  tasks = []  # read before the model loads: an unknown name is an error at once
  for name in _TASKS.value:
    try:
      task = load_bigbench_task(bigbench_task_path(name))
    except ValueError as e:
      raise ValueError(f"--tasks: {e}") from None
    tasks.append(MCTask(name, task.examples[: _LIMIT.value], task.task_prefix))
  source = resolve_model(_MODEL.value, cache)
  loaded = load_model(source, cache, show_progress=False)
  # On the device once: numpy params would be copied to it again on every call (538 MB here),
  # which would time the copy, and most in the mode making the most calls.
  params = to_device(loaded.params, "float32")
  tokenizer = load_tokenizer(source)
  n_questions = sum(len(t.examples) for t in tasks)
  n_tokens = sum(
    len(tokenizer.encode(ex.context + c).ids)
    for t in tasks
    for ex in t.examples
    for c in ex.continuations  # the choices with their delimiter, as scored
  )

  def run_mode(mode):
    batch, pack = MODES[mode](_BATCH.value)
    kw = dict(config=loaded.config, tokenizer=tokenizer, batch_size=batch, show_progress=False)
    return [evaluate_task(params, t, pack=pack, **kw) for t in tasks]

  results, best = {}, {}
  for mode in MODES:  # untimed pass: compiles every bucket shape of the mode
    print(f"compiling {mode} ...", flush=True)
    results[mode] = run_mode(mode)
  for r in range(_REPEATS.value):
    for mode in MODES:
      start = time.perf_counter()
      again = run_mode(mode)
      elapsed = time.perf_counter() - start
      best[mode] = min(best.get(mode, elapsed), elapsed)
      assert again == results[mode], f"{mode}: a second pass gave other scores"
      print(f"round {r + 1} {mode}: {elapsed:.1f} s", flush=True)
  for mode in MODES:
    for a, b in zip(results[mode], results["one-at-a-time"], strict=True):
      if abs(a["acc"] - b["acc"]) > 1e-9 or abs(a["acc_norm"] - b["acc_norm"]) > 1e-9:
        print(f"WARNING: {mode} changes an accuracy: {a} vs {b}")

  base = best["one-at-a-time"]
  header = f"{n_questions} questions ({', '.join(_TASKS.value)}; {_LIMIT.value} each), "
  header += f"{n_tokens} choice tokens unpacked; dense {_MODEL.value}, float32; "
  header += f"{usable_cpus()} CPUs ({cpu_model_name()}); best of {_REPEATS.value}"
  print(header)
  if _MARKDOWN.value:
    print("\n| mode | rows per call | s | questions/s | tokens/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
  for mode, t in best.items():
    batch, pack = MODES[mode](_BATCH.value)
    line = (mode, batch, t, n_questions / t, n_tokens / t, base / t)
    if _MARKDOWN.value:
      print("| {} | {} | {:.1f} | {:.2f} | {:.0f} | {:.2f}x |".format(*line))
    else:
      print("{:16s} batch {:2d}  {:7.1f} s  {:7.2f} q/s  {:7.0f} tok/s  {:5.2f}x".format(*line))


if __name__ == "__main__":
  run(main)
