"""Prefill throughput: JAX dense vs N:M sparse vs HF transformers, side by side in one run.

Command (on CPU; the tables in BENCHMARKS.md, the second pinned to one core):

    python experiments/bench_prefill.py --markdown --repeats=3
    taskset -c 0 python experiments/bench_prefill.py --markdown --repeats=3

It loads SmolLM2-135M-Instruct (fetched and converted on first use, as in
experiments/prefill.py), tokenizes gensim's lee_background.cor, and for every
batch x seq_len of the grid (default 1,4 x 128,512) times the jitted prefill
(logits and KV cache) dense and with 8:16 (naive |x| score, every linear input)
and, when torch and transformers import, HF transformers' dense prefill of the
same weights on the same tokens (the params are written to a temporary HF
directory and loaded with AutoModelForCausalLM, float32, eval mode,
inference_mode, torch threads = the CPUs this process may use, which is what
XLA:CPU uses). Each is warmed up once, then run --repeats times interleaved;
medians. It prints the versions, the max abs difference between HF's logits and
ours on the first grid point (about 1e-4; logits reach 35), then one table:
batch, seq_len, GFLOP per prefill, dense ms, sparse ms, sparse/dense (1.4-1.6 on
CPU: the mask is extra work, the matmuls stay dense), HF ms, HF/dense (the
speedup of our dense prefill over HF), tokens/s, achieved GFLOP/s, and at the end
the peak RSS of the process (about 3.2 GB). Takes 3-5 minutes with --repeats=3 on
a shared 2-core machine (up to 7 with the default 5 when other jobs load it: torch's
2-thread runs slow down most under load; see BENCHMARKS.md).

On a GPU machine (JAX backend gpu) the HF column runs on CUDA when torch sees a
GPU and is skipped with a note otherwise (a CPU torch time would not compare):

    python experiments/bench_prefill.py --batch_sizes=1,8 --seq_lens=512,2048 \\
        --output=/tmp/bench_prefill_gpu.json

--matmul_precision=highest (default) makes JAX and torch both compute float32
matmuls in full float32 (JAX would otherwise use TF32 on recent GPUs and torch
would not); tf32 makes both use TF32. So that torch has room on a GPU, JAX's
preallocation is capped at half the device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
is set. --device_info prints the machine and JAX devices and exits.
"""

from __future__ import annotations

import datetime
import os

# Leave GPU memory for torch's HF column (set before JAX starts; an explicit setting wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

from _common import cpu_model_name, define_options, run, usable_cpus
from absl import flags

from amber_jax.bench.moe_bench import bench_moe, format_moe_table, scaled_moe_config
from amber_jax.bench.prefill_bench import (
  MATMUL_PRECISIONS,
  PrefillBenchConfig,
  bench_random_preset,
  format_random_preset_table,
  format_table,
  machine_info,
  peak_memory,
  run_prefill_bench,
)
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.model.presets import preset
from amber_jax.runs.checks import check_text_source, parse_ints

OPTS = define_options(
  "model",
  "dtype",
  "text_file",
  "output",
  "cache_dir",
  text_file=(None, "UTF-8 text for the token ids (default: gensim's lee_background.cor)."),
)
_MODEL, _DTYPE, _TEXT_FILE, _OUTPUT = (
  OPTS.flag(n) for n in ("model", "dtype", "text_file", "output")
)
_PATTERN = flags.DEFINE_string(
  "pattern", "8:16", "N:M pattern of the sparse column ('dense' drops the column)."
)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes (comma list).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["128", "512"], "Sequence lengths (comma list).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per column after a warm-up.")
_MATMUL_PRECISION = flags.DEFINE_enum(
  "matmul_precision",
  "highest",
  sorted(MATMUL_PRECISIONS),
  "float32 matmul precision for JAX and torch alike ('default': each library's own).",
)
_HF = flags.DEFINE_bool("hf", True, "Time HF transformers too (when torch imports).")
_TORCH_THREADS = flags.DEFINE_integer(
  "torch_threads",
  None,
  "torch intra-op threads (default: the CPUs this process may run on, as many as XLA:CPU uses).",
)
_RANDOM_INIT = flags.DEFINE_string(
  "random_init",
  None,
  "Benchmark random weights of a preset (smollm2-135m, llama-3.1-8b, qwen2-7b, qwen3-8b; "
  "qwen3-30b-a3b: the MoE table, see --moe_divisor) instead of "
  "loading --model: for machines that cannot fetch the checkpoint (no HF column).",
)
_IMPLS = flags.DEFINE_list(
  "impls",
  ["xla"],
  "With --random_init: sparse implementations to time (xla, xla-<mask method>, pallas, "
  "pallas_mask).",
)
_PEAK_TFLOPS = flags.DEFINE_float(
  "peak_tflops",
  None,
  "With --random_init: the device's dense peak in --dtype, TFLOP/s (989 for bf16 on an "
  "H200), to print each prefill's compute floor; unset: no floor (a CPU's is not known here).",
)
_MOE_DIVISOR = flags.DEFINE_integer(
  "moe_divisor",
  4,
  "With an MoE --random_init (qwen3-30b-a3b): divide d_model, heads and FFN widths by this "
  "(experts and active experts kept) to run on a CPU; 1: the published shape.",
)
_MOE_LAYERS = flags.DEFINE_integer(
  "moe_layers", 4, "With an MoE --random_init: the number of layers timed."
)
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown (BENCHMARKS.md).")
_DEVICE_INFO = flags.DEFINE_bool("device_info", False, "Print machine and JAX devices, then exit.")


# Flags that only one of the two benches reads: giving one to the other would be ignored.
_RANDOM_ONLY = (_IMPLS, _PEAK_TFLOPS)
_MODEL_ONLY = (_MODEL, _TEXT_FILE, _HF, _TORCH_THREADS, _MATMUL_PRECISION)


def _check_flags() -> None:
  """What needs no model, before JAX starts work (ValueError naming the flag)."""
  unused = _MODEL_ONLY if _RANDOM_INIT.value else _RANDOM_ONLY
  given = [f"--{f.name}" for f in unused if f.present]
  if given:
    where = "without" if _RANDOM_INIT.value else "only with"
    raise ValueError(
      f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} {where} --random_init"
    )
  if _TORCH_THREADS.value is not None and _TORCH_THREADS.value < 1:
    raise ValueError(f"--torch_threads must be >= 1, got {_TORCH_THREADS.value}")
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats must be >= 1, got {_REPEATS.value}")
  if _TEXT_FILE.value:
    check_text_source(_TEXT_FILE.value, arg="--text_file")
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")


def main(argv):
  del argv
  if not _DEVICE_INFO.value:
    _check_flags()
    batch_sizes = parse_ints(_BATCH_SIZES.value, arg="--batch_sizes", minimum=1)
    seq_lens = parse_ints(_SEQ_LENS.value, arg="--seq_lens", minimum=1)
  import jax

  machine = machine_info(cpu_model_name())
  print(
    f"device: {jax.devices()} (backend {machine['jax_backend']}, {machine['cpu_count']} CPUs, "
    f"{usable_cpus()} usable: {machine['cpu_model'] or machine['machine']})"
  )
  if _DEVICE_INFO.value:
    return
  if _RANDOM_INIT.value and preset(_RANDOM_INIT.value).moe is not None:
    config = scaled_moe_config(
      preset(_RANDOM_INIT.value), divisor=_MOE_DIVISOR.value, n_layers=_MOE_LAYERS.value
    )
    result = bench_moe(
      config,
      name=_RANDOM_INIT.value,
      batch_sizes=batch_sizes,
      seq_lens=seq_lens,
      pattern=_PATTERN.value if _PATTERN.value != "dense" else None,
      repeats=_REPEATS.value,
      dtype=_DTYPE.value,
    )
    result["machine"] = machine
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(format_moe_table(result))
    if _OUTPUT.value:
      write_json_atomic(_OUTPUT.value, result)
    return
  if _RANDOM_INIT.value:
    result = bench_random_preset(
      _RANDOM_INIT.value,
      pattern=_PATTERN.value,
      impls=_IMPLS.value,
      batch_sizes=batch_sizes,
      seq_lens=seq_lens,
      repeats=_REPEATS.value,
      dtype=_DTYPE.value,
      peak_tflops=_PEAK_TFLOPS.value,
    )
    result["machine"] = machine
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(format_random_preset_table(result))
    if _OUTPUT.value:
      write_json_atomic(_OUTPUT.value, result)
    return
  cfg = PrefillBenchConfig(
    model=_MODEL.value,
    pattern=_PATTERN.value,
    batch_sizes=batch_sizes,
    seq_lens=seq_lens,
    repeats=_REPEATS.value,
    dtype=_DTYPE.value,
    text=_TEXT_FILE.value or "lee_background",
    hf=_HF.value,
    torch_threads=_TORCH_THREADS.value or usable_cpus(),
    matmul_precision=_MATMUL_PRECISION.value,
    cache_dir=OPTS.cache_dir,
  )
  result = run_prefill_bench(cfg)
  result["machine"] = {**machine, "usable_cpus": usable_cpus()}
  result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  print()
  print(format_table(result, markdown=_MARKDOWN.value))
  result["memory"] = peak_memory()
  mem = result["memory"]
  print(
    f"\npeak RSS {mem['peak_rss_mb']:.0f} MB"
    + "".join(f", {k} {v:.0f}" for k, v in mem.items() if k != "peak_rss_mb")
  )
  if _OUTPUT.value:
    write_json_atomic(_OUTPUT.value, result)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  run(main)
