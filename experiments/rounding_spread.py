"""How far the main job's numbers move when only float rounding changes (another CPU's view).

Command:

    python experiments/rounding_spread.py --output=results/rounding_spread.json

Runs the main job (experiments/prefill.py: dense, the naive 8:16 baseline, Amber Pruner 8:16)
several times, each in a fresh process that changes only how the floats are rounded: the batch
size (1 vs 4 windows per pass), one intra-op thread instead of all, and XLA's CPU code capped
at AVX2, AVX or SSE4.2 (what a CPU without AVX-512, or without FMA, computes). N:M masks flip where
two scores are within rounding of each other, and every later layer sees the flip, so sparse
perplexities move while the dense one does not. Prints one row per variant and the spread
(max - min) / min of each number. Takes about 3 minutes per variant on 2 CPU cores (the model
must be cached: run experiments/prefill.py once first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import define_options, run
from absl import flags

from amber_jax.io.atomic import check_output_file, write_json_atomic

# name -> (extra prefill.py flags, extra XLA_FLAGS, one intra-op thread)
VARIANTS = {
  "default (batch 4)": ([], "", False),
  "batch 1": (["--batch_size=1"], "", False),
  "1 thread": ([], "", True),
  "ISA <= AVX2": ([], "--xla_cpu_max_isa=AVX2", False),
  "ISA <= AVX (no FMA)": ([], "--xla_cpu_max_isa=AVX", False),
  "ISA <= SSE4.2": ([], "--xla_cpu_max_isa=SSE4_2", False),
}

_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern of the main job.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run: {list(VARIANTS)}.")
OPTS = define_options(
  "output", "cache_dir", output=(None, "Write the rows and spreads as JSON here.")
)
_OUTPUT = OPTS.flag("output")

_NUMBERS = ("dense", "naive", "amber")


def _run_variant(name: str, pattern: str, cache_dir: str, out: Path) -> dict:
  args, xla_flags, one_thread = VARIANTS[name]
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
  cmd = [
    sys.executable,
    str(Path(__file__).resolve().parent / "prefill.py"),
    f"--pattern={pattern}",
    "--gen_prompts=0",
    f"--cache_dir={cache_dir}",
    f"--output={out}",
    *args,
  ]
  # One usable CPU: XLA:CPU sizes its intra-op thread pool from the affinity mask.
  preexec = (
    (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_thread else None
  )
  proc = subprocess.run(cmd, env=env, preexec_fn=preexec, capture_output=True, text=True)
  if proc.returncode != 0:
    raise ValueError(f"variant {name!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
  result = json.loads(out.read_text(encoding="utf-8"))
  return {
    "variant": name,
    "dense": result["dense"]["perplexity"],
    "naive": result["naive"]["perplexity"],
    "amber": result["sparse"]["perplexity"],
    "amber_coverage": result["coverage"],
    "amber_skip_layers": result["skip_layers"],
  }


def spreads(rows: list[dict]) -> dict[str, float]:
  """(max - min) / min of each number over the rows."""
  return {
    k: (max(r[k] for r in rows) - min(r[k] for r in rows)) / min(r[k] for r in rows)
    for k in _NUMBERS
  }


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise ValueError(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
  if not _VARIANTS.value:
    raise ValueError(f"--variants must name at least one of {', '.join(VARIANTS)}")
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  cache_dir = OPTS.cache_dir
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(_VARIANTS.value):
      row = _run_variant(name, _PATTERN.value, cache_dir, Path(tmp) / f"{i}.json")
      rows.append(row)
      print(
        f"{name:<20} dense {row['dense']:8.3f}  naive {row['naive']:8.3f}  amber "
        f"{row['amber']:8.3f}  coverage {100 * row['amber_coverage']:.1f}%  skip "
        f"{row['amber_skip_layers']}",
        flush=True,
      )
  spread = spreads(rows)
  print("spread (max - min) / min: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in spread.items()))
  if _OUTPUT.value:
    write_json_atomic(_OUTPUT.value, {"pattern": _PATTERN.value, "rows": rows, "spread": spread})
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  run(main)
