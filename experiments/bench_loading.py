"""Host memory of loading an HF checkpoint: peak RSS on first load and from the param cache.

    python experiments/bench_loading.py --output=results/bench_loading.json
    git worktree add /tmp/before <older commit> && \\
      python experiments/bench_loading.py --before=/tmp/before --output=...

Writes a synthetic checkpoint of ``--shape`` (a preset: random values, the real shapes; sharded
like the hub's) in each of ``--dtypes``, then loads it as the jobs do (``load_model`` in that
dtype, then the params onto the device) in fresh child processes: first load (conversion +
param cache write), then from the cache. Prints peak RSS, the load's own share (peak minus an
import-only child) over the checkpoint bytes, and what that ratio makes of a Llama-3.1-8B bf16
checkpoint. ``--before`` measures another checkout (e.g. a worktree of an older commit) with the
same driver, side by side. Needs about 3x the checkpoint in free disk under ``--work_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import tempfile

from _common import define_options, run
from absl import flags

from amber_jax.bench.loading_bench import measure_load, write_synthetic_hf_checkpoint
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.model.presets import preset

OPTS = define_options("output")
_SHAPE = flags.DEFINE_string("shape", "qwen2-0.5b", "The preset whose shapes are written.")
_UNTIE = flags.DEFINE_bool(
  "untie",
  True,
  "Write an lm_head beside the embedding (the 2.52 GB fp32 checkpoint of the issue's numbers).",
)
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "File dtype = load dtype.")
_BEFORE = flags.DEFINE_string("before", "", "Another checkout of the project to measure too.")
_WORK = flags.DEFINE_string(
  "work_dir", "", "Where checkpoints and caches go (default: a temp dir)."
)
_TARGET = flags.DEFINE_string("target", "llama-3.1-8b", "The preset the ratio is scaled to (bf16).")

GB = 1e9


def _param_bytes(config, itemsize: int) -> int:
  from amber_jax.io.hf import hf_tensor_shapes

  return sum(math.prod(s) for s in hf_tensor_shapes(config).values()) * itemsize


def main(argv):
  del argv
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  for d in _DTYPES.value:
    if d not in ("float32", "bfloat16"):
      raise ValueError(f"--dtypes: each must be float32 or bfloat16, got {d!r}")
  if _BEFORE.value and not (pathlib.Path(_BEFORE.value) / "amber_jax").is_dir():
    raise ValueError(f"--before must be a checkout of the project, got {_BEFORE.value!r}")
  config = preset(_SHAPE.value)
  if _UNTIE.value:
    config = dataclasses.replace(config, tie_embeddings=False)
  versions = [("after", None)] + ([("before", _BEFORE.value)] if _BEFORE.value else [])
  work = pathlib.Path(_WORK.value or tempfile.mkdtemp(prefix="bench_loading-"))
  rows = []
  try:
    for dtype in _DTYPES.value:
      model_dir = work / f"{_SHAPE.value}-{dtype}"
      ckpt_bytes = write_synthetic_hf_checkpoint(config, model_dir, dtype=dtype)
      print(f"wrote {model_dir.name}: {ckpt_bytes / GB:.2f} GB", flush=True)
      for version, root in versions:
        cache = work / f"cache-{version}"
        base = measure_load(model_dir, cache, dtype=dtype, phase="baseline", code_root=root)
        for phase in ("first", "cached"):
          m = measure_load(model_dir, cache, dtype=dtype, phase=phase, code_root=root)
          row = {
            "version": version,
            "dtype": dtype,
            "phase": phase,
            "checkpoint_gb": ckpt_bytes / GB,
            "peak_rss_gb": m.peak_rss_bytes / GB,
            "baseline_rss_gb": base.peak_rss_bytes / GB,
            "peak_over_checkpoint": m.peak_rss_bytes / ckpt_bytes,
            "load_over_checkpoint": (m.peak_rss_bytes - base.peak_rss_bytes) / ckpt_bytes,
            "seconds": m.seconds,
            "from_cache": m.from_cache,
            "params_dtype": m.dtype,
            "code": m.code,
          }
          rows.append(row)
          print(
            f"{version:6s} {dtype:8s} {phase:6s} peak {row['peak_rss_gb']:6.2f} GB "
            f"({row['peak_over_checkpoint']:.2f}x; load {row['load_over_checkpoint']:.2f}x) "
            f"{m.seconds:6.1f} s",
            flush=True,
          )
        shutil.rmtree(cache, ignore_errors=True)
      shutil.rmtree(model_dir, ignore_errors=True)
  finally:
    if not _WORK.value:
      shutil.rmtree(work, ignore_errors=True)
  target = preset(_TARGET.value)
  target_bytes = _param_bytes(target, 2)
  estimates = [
    {
      "version": r["version"],
      "phase": r["phase"],
      "target": _TARGET.value,
      "target_checkpoint_gb": target_bytes / GB,
      "estimated_peak_gb": (r["baseline_rss_gb"] * GB + r["load_over_checkpoint"] * target_bytes)
      / GB,
    }
    for r in rows
    if r["dtype"] == "bfloat16"
  ]
  print(f"\n{_TARGET.value} in bf16 ({target_bytes / GB:.2f} GB), peak by the measured ratio:")
  for e in estimates:
    print(f"  {e['version']:6s} {e['phase']:6s} {e['estimated_peak_gb']:6.1f} GB")
  if OPTS.output:
    payload = {
      "shape": _SHAPE.value,
      "untied": _UNTIE.value,
      "rows": rows,
      "estimates": estimates,
    }
    write_json_atomic(OPTS.output, payload)
    print(json.dumps({"written": OPTS.output}))


if __name__ == "__main__":
  run(main)
