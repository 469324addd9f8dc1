"""Sharded vs single-device prefill throughput side by side in one run, and time in collectives.

Commands (the tables in BENCHMARKS.md; 2-core CPU, 8 host devices emulated):

    python experiments/bench_sharding.py --random_init=tiny --meshes=2x4,4x2,8x1 --markdown
    python experiments/bench_sharding.py --model=smollm2-135m --meshes=2x3,6x1 --batch=6 \\
        --seq_len=128 --markdown

With ``--cpu_devices=N`` (default 8) the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu`` before JAX
starts, so one CPU pretends to be N devices; ``--cpu_devices=0`` uses the default backend's real
devices instead (a GPU machine with several GPUs). On the emulated devices all N share the
machine's cores: the numbers measure the overhead of the sharded program (collectives,
rendezvous, smaller per-device matmuls), not scaling.

For every plan (``--plans``: dense, 8:16 naive on every site, W8A8 with SmoothQuant calibrated on
the benchmark's own tokens) it jits ``amber_jax.model.prefill`` (logits and KV cache) once on one
device with unsharded params and once per mesh (``--meshes``, DATAxMODEL) with params, plan and
batch placed by ``amber_jax.plan.sharding``; each is compiled and warmed up, then timed
``--repeats`` times interleaved (order rotated every round); medians. It prints one table:
single-device and sharded ms and tokens/s, their ratio, the share of time in collectives, the
largest logit difference from the single-device prefill, and the same for a control without
sharding: the single-device ``forward`` (the same math compiled as another program) against the
single-device prefill. Dense plans agree to float rounding; N:M masks and int8 codes turn
rounding differences into other selections where a value sits within rounding of a tie or a
code boundary, and the row diverges from there, as much in the control as when sharded (see
tests/test_sharding.py).

The collective share is measured, not modelled: a few more sharded runs under
``jax.profiler.trace``; every trace event named after a collective HLO op (all-reduce,
all-gather, reduce-scatter, collective-permute, all-to-all, or an NCCL kernel on GPUs) is summed
over devices, divided by the number of devices and by the wall time of the traced runs. On the
emulated CPU devices a collective's duration includes waiting at its rendezvous for the other
devices' threads, which time-share 2 cores, so the share is synchronisation + communication,
an upper bound on pure communication. Tracing itself slows the runs a little.

Runtime: about 1 minute for the tiny model, 3-4 minutes for SmolLM2-135M on 2 cores (each
30-layer sharded program takes seconds to compile).
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model_name, define_options, run, usable_cpus
from absl import flags

_CPU_DEVICES = flags.DEFINE_integer(
  "cpu_devices",
  8,
  "Emulate this many CPU devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu before JAX starts); "
  "0: the default backend's real devices.",
)
OPTS = define_options("model", "seq_len", "output", "cache_dir", seq_len=(128, "Prefill length."))
_MODEL, _SEQ_LEN, _OUTPUT = (OPTS.flag(n) for n in ("model", "seq_len", "output"))
_RANDOM_INIT = flags.DEFINE_string(
  "random_init",
  None,
  "Random weights instead of --model: 'tiny' (4 layers, d_model 256, 8 heads / 4 KV heads, "
  "FFN 1024, vocab 8192) or a preset of amber_jax.model.presets.",
)
_MESHES = flags.DEFINE_list(
  "meshes", ["2x4"], "Meshes to time, DATAxMODEL each (e.g. 2x4,8x1); may use fewer devices."
)
_PLANS = flags.DEFINE_list("plans", ["dense", "8:16", "w8a8"], "dense, an N:M pattern, w8a8.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prefill batch size (divisible by every mesh's data).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per column after a warm-up.")
_PROFILE_RUNS = flags.DEFINE_integer(
  "profile_runs", 2, "Sharded runs traced for the collective share (0: skip the profiler)."
)
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown (BENCHMARKS.md).")

# Trace events of collective ops: HLO instruction names on CPU ("all-reduce.3",
# "all-gather-start"), NCCL kernel names on GPUs.
_COLLECTIVE = re.compile(
  r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)([.-]|$)"
  r"|nccl.*(AllReduce|AllGather|ReduceScatter|SendRecv|AllToAll)",
  re.IGNORECASE,
)


def _set_device_flags(n: int) -> None:
  """XLA reads XLA_FLAGS once, when its CPU client starts: this must run before JAX does."""
  if "jax" in sys.modules:  # imported already (e.g. by a plugin): fine unless it started
    from jax._src import xla_bridge

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
      raise ValueError("JAX started before --cpu_devices could take effect")
  flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join([*flags_, f"--xla_force_host_platform_device_count={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def _parse_mesh(text: str) -> tuple[int, int]:
  try:
    data, model = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--meshes entries must be DATAxMODEL (e.g. 2x4), got {text!r}") from None
  if data < 1 or model < 1:
    raise ValueError(f"--meshes entries need DATA >= 1 and MODEL >= 1, got {text!r}")
  return data, model


def _check_flags() -> tuple[list[tuple[int, int]], list[str]]:
  """What needs neither JAX nor the model (ValueError naming the flag): the meshes and plans."""
  from amber_jax.core.patterns import NMPattern
  from amber_jax.io.atomic import check_output_file

  for flag, least in ((_BATCH, 1), (_SEQ_LEN, 1), (_REPEATS, 1), (_CPU_DEVICES, 0)):
    if flag.value < least:
      raise ValueError(f"--{flag.name} must be >= {least}, got {flag.value}")
  if _PROFILE_RUNS.value < 0:
    raise ValueError(
      f"--profile_runs must be >= 0 (0 skips the profiler), got {_PROFILE_RUNS.value}"
    )
  meshes = [_parse_mesh(m) for m in _MESHES.value if m.strip()]
  if not meshes:
    raise ValueError("--meshes must name at least one mesh, DATAxMODEL (e.g. 2x4)")
  for data, model in meshes:
    if _BATCH.value % data:
      raise ValueError(
        f"--batch={_BATCH.value} must be divisible by the data size of every mesh; "
        f"--meshes entry {data}x{model} has data={data}"
      )
  plans = [p.strip() for p in _PLANS.value if p.strip()]
  if not plans:
    raise ValueError("--plans must name at least one of dense, w8a8 or an N:M pattern")
  for name in plans:
    if name not in ("dense", "w8a8"):
      try:
        NMPattern.parse(name)
      except ValueError as e:
        raise ValueError(f"--plans entry {name!r} is not dense, w8a8 or N:M: {e}") from None
  if _RANDOM_INIT.value and _RANDOM_INIT.value != "tiny":
    from amber_jax.model.presets import PRESETS

    if _RANDOM_INIT.value not in PRESETS:
      raise ValueError(
        f"--random_init must be tiny or a preset ({', '.join(PRESETS)}), got {_RANDOM_INIT.value!r}"
      )
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  return meshes, plans


def _tiny_config():
  from amber_jax.model import LlamaConfig

  return LlamaConfig(
    vocab_size=8192,
    d_model=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    head_dim=32,
    d_ff=1024,
    tie_embeddings=True,
  )


def _model_config(random_init: str | None, model: str, cache_dir: str):
  """(config, model source or None) before any weights load: a random preset's config or the
  model's (resolved, its config read)."""
  if random_init:
    from amber_jax.model.presets import preset

    return (_tiny_config() if random_init == "tiny" else preset(random_init)), None
  from amber_jax.io.sources import read_config, resolve_model
  from amber_jax.runs.common import check_cache_dir

  check_cache_dir(cache_dir)
  source = resolve_model(model, cache_dir)
  return read_config(source), source


def _load(random_init: str | None, config, source, cache_dir: str, batch: int, seq_len: int):
  """(config, float32 params, [batch, seq_len] tokens, model name)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from amber_jax.bench.prefill_bench import token_batch

  if random_init:
    from amber_jax.model.presets import init_random_params

    init = jax.jit(init_random_params, static_argnums=(0, 2))
    params = init(config, jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_len)).astype(np.int32)
    return config, params, tokens, f"random {random_init}"
  from amber_jax.data.texts import load_text
  from amber_jax.io.loading import load_model, load_tokenizer, to_device

  ids = load_tokenizer(source).encode(load_text("lee_background", cache_dir)).ids
  loaded = load_model(source, cache_dir, show_progress=False)
  params = to_device(loaded.params, jnp.float32)
  return loaded.config, params, token_batch(np.asarray(ids), batch, seq_len), _MODEL.value


def _make_plan(name: str, config, params, tokens):
  from amber_jax.calibrate.stats import collect_input_absmax
  from amber_jax.plan.quant_state import build_quant_state
  from amber_jax.plan.schema import make_plan

  if name == "dense":
    return None
  if name == "w8a8":
    absmax = collect_input_absmax(params, tokens, config=config, show_progress=False)
    quant, _ = build_quant_state(params, config, absmax, smooth="smoothquant")
    return make_plan(config, None).replace(quant=quant)
  return make_plan(config, name)


def collective_share(run, n_devices: int, runs: int) -> dict:
  """Traces ``runs`` calls of ``run`` (blocking) and sums the collective ops' event durations.

  Returns seconds per call: wall, in collectives per device (summed over devices / n_devices),
  and their ratio; the number of collective events per call and device.
  """
  import jax

  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    start = time.perf_counter()
    for _ in range(runs):
      run()
    wall = (time.perf_counter() - start) / runs
    jax.profiler.stop_trace()
    traces = sorted(Path(tmp).rglob("*.trace.json.gz"))
    if not traces:
      return {"wall_s": wall, "collective_s": None, "share": None, "events": None}
    with gzip.open(traces[-1], "rt") as f:
      events = json.load(f).get("traceEvents", [])
  durations = [
    e.get("dur", 0.0) * 1e-6
    for e in events
    if e.get("ph") == "X" and _COLLECTIVE.search(str(e.get("name", "")))
  ]
  per_device = sum(durations) / n_devices / runs
  return {
    "wall_s": wall,
    "collective_s": per_device,
    "share": per_device / wall,
    "events": len(durations) / n_devices / runs,
  }


def main(argv):
  del argv
  meshes, plan_names = _check_flags()
  if _CPU_DEVICES.value > 0:
    _set_device_flags(_CPU_DEVICES.value)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from amber_jax.bench.prefill_bench import machine_info, time_interleaved
  from amber_jax.io.atomic import write_json_atomic
  from amber_jax.model.llama import forward, prefill
  from amber_jax.plan import sharding as sh
  from amber_jax.plan.schema import make_plan
  from amber_jax.runs.common import check_seq_len_for

  machine = machine_info(cpu_model_name())
  devices = jax.devices()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(
    f"devices: {len(devices)} x {machine['device_kind']} (backend {machine['jax_backend']}, "
    f"{usable_cpus()} usable CPUs: {machine['cpu_model'] or machine['machine']}; "
    f"load average {load:.1f})"
  )
  batch, seq_len = _BATCH.value, _SEQ_LEN.value
  cache_dir = OPTS.cache_dir
  config, source = _model_config(_RANDOM_INIT.value, _MODEL.value, cache_dir)
  # Before any weights load or initialise: the length, every N:M plan and every mesh fit.
  check_seq_len_for(config, seq_len)
  for name in plan_names:
    if name not in ("dense", "w8a8"):
      try:
        make_plan(config, name)
      except ValueError as e:
        raise ValueError(f"--plans entry {name!r}: {e}") from None
  mesh_objs = {}
  for data, model in meshes:
    if data * model > len(devices):
      raise ValueError(
        f"--meshes entry {data}x{model} needs {data * model} devices, there are {len(devices)}"
        + (" (raise --cpu_devices)" if _CPU_DEVICES.value > 0 else "")
      )
    try:
      mesh_objs[(data, model)] = sh.make_mesh(
        data=data,
        model=model,
        devices=devices[: data * model],
        config=config,
        batch_size=batch,
      )
    except ValueError as e:
      raise ValueError(f"--meshes entry {data}x{model}: {e}") from None
  config, params, tokens, model_name = _load(
    _RANDOM_INIT.value, config, source, cache_dir, batch, seq_len
  )
  jit_prefill = jax.jit(prefill, static_argnames=("config", "max_len", "dtype"))
  jit_forward = jax.jit(forward, static_argnames=("config", "dtype"))
  s_params = {m: sh.shard_params(params, mesh, config=config) for m, mesh in mesh_objs.items()}
  s_tokens = {m: sh.shard_batch(tokens, mesh) for m, mesh in mesh_objs.items()}
  single_tokens = jnp.asarray(tokens)
  rows = []
  for plan_name in plan_names:
    plan = _make_plan(plan_name, config, params, tokens)
    fns, compile_s = {}, {}

    def single_fn(plan=plan):
      return jax.block_until_ready(jit_prefill(params, single_tokens, config=config, plan=plan))

    fns["single"] = single_fn
    for m, mesh in mesh_objs.items():
      s_plan = sh.shard_plan(plan, mesh, config=config)

      def sharded_fn(m=m, s_plan=s_plan):
        return jax.block_until_ready(
          jit_prefill(s_params[m], s_tokens[m], config=config, plan=s_plan)
        )

      fns[m] = sharded_fn
    outputs = {}
    for key, fn in fns.items():  # compile + warm up
      start = time.perf_counter()
      outputs[key] = np.asarray(fn()[0])
      compile_s[key] = time.perf_counter() - start
    # The control: the same math on the same device in another compiled program (forward
    # instead of prefill). N:M masks and int8 codes turn rounding differences into different
    # selections near ties; this shows how large that is without any sharding.
    control = np.asarray(jit_forward(params, single_tokens, config=config, plan=plan))
    control_diff = float(np.max(np.abs(control - outputs["single"])))
    times = time_interleaved(fns, _REPEATS.value)
    single_s = statistics.median(times["single"])
    for m in mesh_objs:
      sharded_s = statistics.median(times[m])
      share = (
        collective_share(fns[m], m[0] * m[1], _PROFILE_RUNS.value)
        if _PROFILE_RUNS.value > 0
        else {"share": None, "collective_s": None, "events": None, "wall_s": None}
      )
      rows.append(
        {
          "plan": plan_name,
          "mesh": f"{m[0]}x{m[1]}",
          "devices": m[0] * m[1],
          "single_ms": 1e3 * single_s,
          "sharded_ms": 1e3 * sharded_s,
          "single_tok_s": batch * seq_len / single_s,
          "sharded_tok_s": batch * seq_len / sharded_s,
          "sharded_over_single": sharded_s / single_s,
          "collective_share": share["share"],
          "collective_ms_per_device": None
          if share["collective_s"] is None
          else 1e3 * share["collective_s"],
          "collective_events_per_device": share["events"],
          "traced_wall_ms": None if share["wall_s"] is None else 1e3 * share["wall_s"],
          "max_logit_diff": float(np.max(np.abs(outputs[m] - outputs["single"]))),
          "control_logit_diff": control_diff,
          "compile_s": {"single": compile_s["single"], "sharded": compile_s[m]},
        }
      )
      print(f"{plan_name} {m[0]}x{m[1]}: {rows[-1]['sharded_over_single']:.2f}x", flush=True)
  result = {
    "model": model_name,
    "batch": batch,
    "seq_len": seq_len,
    "repeats": _REPEATS.value,
    "cpu_devices": _CPU_DEVICES.value,
    "rows": rows,
    "machine": {**machine, "usable_cpus": usable_cpus(), "load_average_1min": load},
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "versions": {"jax": jax.__version__},
  }
  print()
  print(format_table(result, markdown=_MARKDOWN.value))
  if _OUTPUT.value:
    write_json_atomic(_OUTPUT.value, result)
    print(f"wrote {_OUTPUT.value}")


def format_table(result: dict, *, markdown: bool = False) -> str:
  """One row per (plan, mesh): single vs sharded ms and tokens/s, collective share, logit diff."""
  head = [
    "plan",
    "mesh DxM",
    "single ms",
    "sharded ms",
    "single tok/s",
    "sharded tok/s",
    "sharded/single",
    "in collectives",
    "max dlogit",
    "1-device control",
  ]
  body = []
  for r in result["rows"]:
    share = r["collective_share"]
    body.append(
      [
        r["plan"],
        r["mesh"],
        f"{r['single_ms']:.1f}",
        f"{r['sharded_ms']:.1f}",
        f"{r['single_tok_s']:.0f}",
        f"{r['sharded_tok_s']:.0f}",
        f"{r['sharded_over_single']:.2f}x",
        "-" if share is None else f"{100 * share:.0f}%",
        f"{r['max_logit_diff']:.1e}",
        f"{r['control_logit_diff']:.1e}",
      ]
    )
  title = (
    f"{result['model']}, batch {result['batch']} x {result['seq_len']} tokens, median of "
    f"{result['repeats']}, jax {result['versions']['jax']}"
  )
  if markdown:
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * 8]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)
  widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
  fmt = "  ".join(f"{{:>{w}}}" for w in widths)
  return "\n".join([title, fmt.format(*head), *(fmt.format(*row) for row in body)])


if __name__ == "__main__":
  run(main)
