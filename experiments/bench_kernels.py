"""Kernel benchmark: fused N:M matmul and W8A8 int8 matmul vs XLA, side by side in one run.

Command (GPU, the full prefill sweep: 10 methods x 6 shapes; on one H200 an --autotune run
with the 6 methods of 2026-11-28 covered the autotune and 26 of its 36 rows in 210 s, see
BENCHMARKS.md):

    python experiments/bench_kernels.py --output=bench_kernels.json

    python experiments/bench_kernels.py --autotune   # + block-size search

Quick CPU run (Pallas columns are left out: Pallas only interprets on CPU; --interpret
adds them, slowly):

    python experiments/bench_kernels.py --shapes=small --repeats=2

Shapes ``full``: prefill tokens M in {2048, 8192} x (K, N) in {(4096, 4096), (4096, 14336),
(14336, 4096)}; ``small``: M in {128, 512} x (K, N) in {(576, 1536), (1536, 576)}. bf16
activations and weights. For every shape it times each method in turn (the median over
--repeats samples after --warmup; a sample is --calls_per_sample back-to-back calls cycling
through --rotations distinct activations, then one ``block_until_ready``, divided by the calls;
the first call, with its compile, is timed apart):

* ``xla_dense``     ``jnp.dot(x, w)`` (fp32 accumulation, bf16 out): the baseline.
* ``xla_mask_dot``  ``sparsify(x, pattern)`` then the dot, one jit (the unfused path: the
                    masked activation goes through memory unless XLA fuses it).
* ``pallas_nm``     ``pallas_kernels.nm_matmul``: mask computed in the kernel (Triton on GPU).
* ``pallas_mask``   ``pallas_kernels.nm_mask`` alone: the mask as one memory-bound pass
                    (read x, write the masked x); its floor is those bytes at peak bandwidth.
* ``pallas_mask_dot`` ``nm_matmul_two_pass``: that pass, then XLA's dot.
* ``xla_int8``      ``lax.dot_general`` int8 x int8 -> int32, then the per-token x
                    per-channel rescale (quantized inputs made beforehand, untimed).
* ``pallas_int8``   ``pallas_kernels.int8_matmul`` on the same inputs (rescale fused).
* ``pallas_nm_int8`` ``nm_int8_matmul`` end to end: fused sparsify + per-token quantize pass
                    over x, then the int8 kernel.
* ``mgpu_int8``     the Mosaic GPU (Hopper wgmma) int8 kernel, ``int8_matmul(backend=
                    "mosaic_gpu", w_layout="nk")`` with the weight stored [N, K] beforehand.
* ``mgpu_nm_int8``  ``nm_int8_matmul`` with that kernel.

It prints the device and versions, then one table: shape, method, ms, TFLOP/s (dense-
equivalent 2*M*K*N; TOPS for int8; none for the mask pass alone), GB/s (the unavoidable HBM
bytes over the time), ratio to xla_dense, the floor (the larger of FLOPs at
peak and the unavoidable HBM bytes at peak bandwidth, with which one binds), achieved % of
that floor, the max abs error against the method's reference on the first --check_rows
rows (``nm_matmul_reference``, ``int8_matmul_reference``, ``nm_int8_matmul_reference``), the
first-call (compile) seconds and the block sizes. Peaks default to an H200: 989 TFLOP/s
dense bf16, 1979 TOPS dense int8, 4.8 TB/s (flags). A method that fails to compile prints
its error and the run goes on. --autotune first times 5 BlockSizes for each kernel named by
--autotune_kernels (the fused N:M kernel "nm", the Triton "int8" and the Mosaic GPU
"mgpu_int8") at the largest M of every (K, N) (15 extra compiles per kernel: about a minute
each on a GPU), uses the best in the table and prints entries for the TUNED_BLOCK_SIZES
tables.
--output writes all rows as JSON (temporary file + os.replace), rewritten after every row so
that a run stopped by a time limit keeps what it measured (``"complete": false`` until the end).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from _common import define_options, run
from absl import flags
from jax import lax

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import sparsify
from amber_jax.io.atomic import check_output_file, write_json_atomic
from pallas_kernels.common import BlockSizes, default_block_sizes
from pallas_kernels.int8_matmul import default_block_sizes as int8_default_block_sizes
from pallas_kernels.int8_matmul import (
  int8_matmul,
  int8_matmul_reference,
  nm_int8_matmul,
  nm_int8_matmul_reference,
  quantize_per_channel,
  quantize_per_token,
)
from pallas_kernels.nm_mask import nm_mask, nm_matmul_two_pass
from pallas_kernels.nm_matmul import nm_matmul, nm_matmul_reference

SHAPES = {
  "full": [
    (m, k, n) for m in (2048, 8192) for k, n in ((4096, 4096), (4096, 14336), (14336, 4096))
  ],
  "small": [(m, k, n) for m in (128, 512) for k, n in ((576, 1536), (1536, 576))],
}
METHODS = (
  "xla_dense",
  "xla_mask_dot",
  "pallas_nm",
  "pallas_mask",
  "pallas_mask_dot",
  "xla_int8",
  "pallas_int8",
  "pallas_nm_int8",
  "mgpu_int8",
  "mgpu_nm_int8",
)
_PALLAS = (
  "pallas_nm",
  "pallas_mask",
  "pallas_mask_dot",
  "pallas_int8",
  "pallas_nm_int8",
  "mgpu_int8",
  "mgpu_nm_int8",
)
_INT8 = ("xla_int8", "pallas_int8", "pallas_nm_int8", "mgpu_int8", "mgpu_nm_int8")
_MGPU = ("mgpu_int8", "mgpu_nm_int8")

# Autotune candidates (Triton). Each compiled for sm_90 with Triton 3.9 offline without
# spills at <= 208 KB of shared memory; the tables' defaults are among them (the 4th N:M and
# the 5th int8 candidate, the H200 autotune's winners).
NM_CANDIDATES = [
  BlockSizes(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
  BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
  BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3),
  BlockSizes(block_m=64, block_n=256, block_k=128, num_warps=8, num_stages=3),
  BlockSizes(block_m=128, block_n=64, block_k=128, num_warps=8, num_stages=3),
]
INT8_CANDIDATES = [
  BlockSizes(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
  BlockSizes(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4),
  BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
  BlockSizes(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
  BlockSizes(block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3),
]
# Mosaic GPU int8 (CTA tile; two compute warpgroups split block_n). Untimed so far: a
# candidate over the 227 KB of shared memory fails to compile and is skipped.
MGPU_INT8_CANDIDATES = [
  BlockSizes(block_m=128, block_n=256, block_k=128, num_stages=3),
  BlockSizes(block_m=128, block_n=256, block_k=128, num_stages=4),
  BlockSizes(block_m=128, block_n=128, block_k=256, num_stages=3),
  BlockSizes(block_m=256, block_n=128, block_k=128, num_stages=3),
  BlockSizes(block_m=64, block_n=256, block_k=256, num_stages=3),
]

_SHAPES = flags.DEFINE_enum("shapes", "full", sorted(SHAPES), "Shape set (small: quick CPU run).")
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern of the sparse methods.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Subset of {', '.join(METHODS)}.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per method (median) after warm-up.")
_CALLS = flags.DEFINE_integer(
  "calls_per_sample", 10, "Back-to-back calls per timed sample (one sync at the end)."
)
_ROTATIONS = flags.DEFINE_integer(
  "rotations", 4, "Distinct activations cycled through (4 x 16.8 MB at 2048 x 4096 > L2)."
)
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs after the first (compiling) call.")
_CHECK_ROWS = flags.DEFINE_integer("check_rows", 256, "Rows checked against the references.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 989.0, "Dense bf16 peak, TFLOP/s (H200).")
_PEAK_INT8_TOPS = flags.DEFINE_float("peak_int8_tops", 1979.0, "Dense int8 peak, TOPS (H200).")
_PEAK_TBPS = flags.DEFINE_float("peak_tbps", 4.8, "HBM bandwidth, TB/s (H200).")
_AUTOTUNE = flags.DEFINE_bool(
  "autotune",
  False,
  "First time the candidates of each --autotune_kernels kernel at the largest M of every "
  "(K, N) and use the best in the table.",
)
AUTOTUNE_KERNELS = ("nm", "int8", "mgpu_int8")
_AUTOTUNE_KERNELS = flags.DEFINE_list(
  "autotune_kernels", list(AUTOTUNE_KERNELS), "Kernels --autotune searches: nm, int8, mgpu_int8."
)
_AUTOTUNE_REPEATS = flags.DEFINE_integer("autotune_repeats", 3, "Timed runs per candidate.")
_INTERPRET = flags.DEFINE_bool(
  "interpret", False, "On CPU, run the Pallas methods in the interpreter (slow)."
)
_OUTPUT = define_options(
  "output", output=(None, "Write the results as JSON here (atomically, after every row).")
).flag("output")


def _median_time(fn, arg_sets, repeats: int, warmup: int, calls: int) -> tuple[float, float]:
  """(first-call seconds incl. compile, median over ``repeats`` samples of the seconds per call).

  A sample is ``calls`` back-to-back calls, cycling through ``arg_sets`` (argument tuples with
  distinct activations), then one sync, divided by ``calls``: the sync and dispatch gaps of a
  single timed call (tens of microseconds) would bias short kernels, and one activation reused
  call after call would sit in the 50 MB L2 of an H200 and time a memory-bound pass too fast.
  Calls run in order on one stream, so waiting for the last waits for all."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*arg_sets[0]))
  first = time.perf_counter() - t0
  for _ in range(warmup):
    for args in arg_sets:
      jax.block_until_ready(fn(*args))
  times = []
  calls = max(1, calls)
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    for i in range(calls):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return first, statistics.median(times)


def _max_abs_err(out, ref) -> float:
  return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


def _min_bytes(method: str, m: int, k: int, n: int) -> int:
  """HBM bytes the method cannot avoid: its operands read once and its output written once."""
  if method in _INT8:
    nbytes = m * k + k * n + 2 * m * n + 4 * (m + n)  # int8 in, bf16 out, fp32 scales
    if method in ("pallas_nm_int8", "mgpu_nm_int8"):
      nbytes += 2 * m * k + m * k  # the sparsify+quantize pass: read bf16 x, write int8 x
    return nbytes
  if method == "pallas_mask":
    return 4 * m * k  # read and write the bf16 activation
  nbytes = 2 * (m * k + k * n + m * n)
  if method == "pallas_mask_dot":
    nbytes += 4 * m * k  # the mask pass
  return nbytes


def _floor(method: str, m: int, k: int, n: int) -> tuple[float, str]:
  """Seconds at peak compute or peak bandwidth, whichever is larger, and which it is."""
  flops = 2.0 * m * k * n
  if method == "pallas_mask":
    compute = 0.0  # no matmul: a memory-bound pass
  elif method in _INT8:
    compute = flops / (_PEAK_INT8_TOPS.value * 1e12)
  else:
    compute = flops / (_PEAK_TFLOPS.value * 1e12)
  memory = _min_bytes(method, m, k, n) / (_PEAK_TBPS.value * 1e12)
  return (compute, "compute") if compute >= memory else (memory, "memory")


def _short_error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


class _Bench:
  def __init__(self, pattern: NMPattern, interpret: bool):
    self.pattern = pattern
    self.interpret = interpret

  def inputs(self, m: int, k: int, n: int, rotations: int = 1) -> list[dict]:
    """``rotations`` input sets with distinct activations (x, and its int8 x_q, x_s) sharing
    one weight; the first is the one checked against the references."""
    kw = jax.random.key(1)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / (k**0.5)).astype(jnp.bfloat16)
    w_q, w_s = jax.jit(quantize_per_channel)(w)
    # The Mosaic GPU kernel reads the weight K-major: stored so once, as a deployment would.
    w_q_nk = jax.jit(jnp.transpose)(w_q)
    sets = []
    for r in range(max(1, rotations)):
      x = jax.random.normal(jax.random.fold_in(jax.random.key(0), r), (m, k), jnp.bfloat16)
      x_q, x_s = jax.jit(quantize_per_token)(x)
      sets.append(dict(x=x, w=w, x_q=x_q, x_s=x_s, w_q=w_q, w_s=w_s, w_q_nk=w_q_nk))
    return sets

  def build(self, method: str, block_sizes: BlockSizes | None = None):
    """(jitted fn, names of its inputs)."""
    pat = self.pattern
    if method == "xla_dense":
      fn = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
      return jax.jit(fn), ("x", "w")
    if method == "xla_mask_dot":
      fn = lambda x, w: jnp.dot(sparsify(x, pat), w, preferred_element_type=jnp.float32).astype(
        x.dtype
      )
      return jax.jit(fn), ("x", "w")
    if method == "pallas_nm":
      fn = functools.partial(
        nm_matmul, pattern=pat, block_sizes=block_sizes, interpret=self.interpret
      )
      return jax.jit(fn), ("x", "w")
    if method == "pallas_mask":
      return jax.jit(functools.partial(nm_mask, pattern=pat, interpret=self.interpret)), ("x",)
    if method == "pallas_mask_dot":
      fn = functools.partial(nm_matmul_two_pass, pattern=pat, interpret=self.interpret)
      return jax.jit(fn), ("x", "w")
    if method == "mgpu_int8":
      fn = functools.partial(
        int8_matmul, out_dtype=jnp.bfloat16, block_sizes=block_sizes, interpret=self.interpret,
        backend="mosaic_gpu", w_layout="nk",
      )  # fmt: skip
      return jax.jit(fn), ("x_q", "w_q_nk", "x_s", "w_s")
    if method == "mgpu_nm_int8":
      fn = functools.partial(
        nm_int8_matmul, pattern=pat, block_sizes=block_sizes, interpret=self.interpret,
        backend="mosaic_gpu", w_layout="nk",
      )  # fmt: skip
      return jax.jit(fn), ("x", "w_q_nk", "w_s")
    if method == "xla_int8":

      def fn(x_q, w_q, x_s, w_s):
        acc = lax.dot_general(x_q, w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * x_s * w_s).astype(jnp.bfloat16)

      return jax.jit(fn), ("x_q", "w_q", "x_s", "w_s")
    if method == "pallas_int8":
      fn = functools.partial(
        int8_matmul, out_dtype=jnp.bfloat16, block_sizes=block_sizes, interpret=self.interpret
      )
      return jax.jit(fn), ("x_q", "w_q", "x_s", "w_s")
    if method == "pallas_nm_int8":
      fn = functools.partial(
        nm_int8_matmul, pattern=pat, block_sizes=block_sizes, interpret=self.interpret
      )
      return jax.jit(fn), ("x", "w_q", "w_s")
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")

  def check(self, method: str, out, data, rows: int) -> float | None:
    pat = self.pattern
    r = min(rows, out.shape[0])
    if method in ("xla_mask_dot", "pallas_nm", "pallas_mask_dot"):
      ref = nm_matmul_reference(data["x"][:r], data["w"], pattern=pat)
    elif method == "pallas_mask":
      ref = sparsify(data["x"][:r], pat)
    elif method in ("xla_int8", "pallas_int8", "mgpu_int8"):
      ref = int8_matmul_reference(
        data["x_q"][:r], data["w_q"], data["x_s"][:r], data["w_s"], out_dtype=jnp.bfloat16
      )
    elif method in ("pallas_nm_int8", "mgpu_nm_int8"):
      ref = nm_int8_matmul_reference(data["x"][:r], data["w_q"], data["w_s"], pattern=pat)
    else:
      return None
    return _max_abs_err(out[:r], ref)


def _block_sizes_for(method: str, bench: _Bench, m: int, k: int, n: int, tuned: dict):
  if method == "pallas_nm":
    if ("nm", k, n) in tuned:
      return tuned[("nm", k, n)]
    backend = "mosaic_tpu" if jax.default_backend() == "tpu" else "triton"
    return default_block_sizes(backend, jnp.bfloat16, m, k, n, bench.pattern)
  if method in ("pallas_int8", "pallas_nm_int8"):
    if ("int8", k, n) in tuned:
      return tuned[("int8", k, n)]
    backend = "mosaic_tpu" if jax.default_backend() == "tpu" else "triton"
    return int8_default_block_sizes(backend, m, k, n)
  if method in _MGPU:
    if ("mgpu_int8", k, n) in tuned:
      return tuned[("mgpu_int8", k, n)]
    return int8_default_block_sizes("mosaic_gpu", m, k, n)
  return None


def _autotune(bench: _Bench, shapes, repeats: int, kernels) -> tuple[dict, list]:
  """Best candidate per (kernel, K, N), timed at the largest M of that (K, N) (the tables
  are not keyed by M); a candidate that fails to compile is reported and skipped."""
  largest = {}
  for m, k, n in shapes:
    largest[(k, n)] = max(m, largest.get((k, n), 0))
  shapes = [(m, k, n) for (k, n), m in largest.items()]
  totals: dict = {}
  log = []
  for kernel, method, cands in (
    ("nm", "pallas_nm", NM_CANDIDATES),
    ("int8", "pallas_int8", INT8_CANDIDATES),
    ("mgpu_int8", "mgpu_int8", MGPU_INT8_CANDIDATES),
  ):
    if kernel not in kernels:
      continue
    for m, k, n in shapes:
      data = bench.inputs(m, k, n, _ROTATIONS.value)
      for bs in cands:
        try:
          fn, names = bench.build(method, bs)
          arg_sets = [[d[a] for a in names] for d in data]
          _, t = _median_time(fn, arg_sets, repeats, 1, _CALLS.value)
          status = f"{t * 1e3:8.3f} ms"
        except Exception as e:  # noqa: BLE001 - report and go on
          t, status = float("inf"), f"failed: {_short_error(e)}"
        totals.setdefault((kernel, k, n), {}).setdefault(bs, 0.0)
        totals[(kernel, k, n)][bs] += t
        log.append(dict(kernel=kernel, m=m, k=k, n=n, block_sizes=dataclasses.asdict(bs), s=t))
        print(f"  autotune {kernel:4s} {m}x{k}x{n} {_bs_str(bs):28s} {status}", flush=True)
      del data
  best = {}
  for key, by_bs in totals.items():
    bs, t = min(by_bs.items(), key=lambda kv: kv[1])
    if t < float("inf"):
      best[key] = bs
  return best, log


def _bs_str(bs: BlockSizes | None) -> str:
  if bs is None:
    return "-"
  return f"{bs.block_m}x{bs.block_n}x{bs.block_k} w{bs.num_warps} s{bs.num_stages}"


def _versions() -> dict:
  out = {"python": platform.python_version(), "jax": jax.__version__}
  try:
    import jaxlib

    out["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    import triton

    out["triton"] = triton.__version__
  except ImportError:
    pass
  return out


def _check_flags(pattern: NMPattern) -> list[str]:
  """Every flag checked before any timing (ValueError naming it); returns the methods."""
  methods = [m for m in _METHODS.value if m]
  if not methods:
    raise ValueError(f"--methods must name at least one of {', '.join(METHODS)}")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise ValueError(f"unknown --methods {bad}; valid: {', '.join(METHODS)}")
  bad = [k for k in _AUTOTUNE_KERNELS.value if k not in AUTOTUNE_KERNELS]
  if bad:
    raise ValueError(f"unknown --autotune_kernels {bad}; valid: {', '.join(AUTOTUNE_KERNELS)}")
  for flag, least in (
    (_REPEATS, 1), (_CALLS, 1), (_ROTATIONS, 1), (_WARMUP, 0), (_CHECK_ROWS, 1),
    (_AUTOTUNE_REPEATS, 1),
  ):  # fmt: skip
    if flag.value < least:
      raise ValueError(f"--{flag.name} must be >= {least}, got {flag.value}")
  for flag in (_PEAK_TFLOPS, _PEAK_INT8_TOPS, _PEAK_TBPS):
    if not (flag.value > 0 and math.isfinite(flag.value)):
      raise ValueError(f"--{flag.name} must be a finite number > 0, got {flag.value}")
  for _, k, _ in SHAPES[_SHAPES.value]:  # N:M groups run along K
    pattern.check_width(k, where=f"--shapes={_SHAPES.value} K")
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  return methods


def main(argv):
  del argv
  pattern = NMPattern.parse(_PATTERN.value)
  methods = _check_flags(pattern)
  backend = jax.default_backend()
  devices = jax.devices()
  versions = _versions()
  print(f"device: {devices[0].device_kind} x{len(devices)} (backend {backend}); {versions}")
  on_cpu = backend == "cpu"
  interpret = on_cpu and _INTERPRET.value
  if on_cpu and not interpret:
    left_out = [m for m in methods if m in _PALLAS]
    methods = [m for m in methods if m not in _PALLAS]
    if left_out:
      print(f"cpu: Pallas only interprets here; left out {left_out} (--interpret adds them)")
  bench = _Bench(pattern, interpret)
  shapes = SHAPES[_SHAPES.value]
  peaks = f"{_PEAK_TFLOPS.value} TFLOP/s bf16, {_PEAK_INT8_TOPS.value} TOPS int8, "
  print(f"pattern {pattern}; peaks {peaks}{_PEAK_TBPS.value} TB/s; repeats {_REPEATS.value}")

  tuned, tune_log, rows = {}, [], []

  def save(complete: bool) -> None:
    """--output, rewritten (atomically) after the autotune and after every row, so a run cut
    short by a time limit still leaves what it measured; ``complete`` marks a finished run."""
    if not _OUTPUT.value:
      return
    result = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      complete=complete,
      device=devices[0].device_kind,
      backend=backend,
      versions=versions,
      pattern=str(pattern),
      peaks=dict(tflops=_PEAK_TFLOPS.value, int8_tops=_PEAK_INT8_TOPS.value, tbps=_PEAK_TBPS.value),
      repeats=_REPEATS.value,
      rows=rows,
      autotune=dict(
        log=tune_log,
        best={f"{kk}:{k}x{n}": dataclasses.asdict(bs) for (kk, k, n), bs in tuned.items()},
      ),
    )
    write_json_atomic(_OUTPUT.value, result)

  if _AUTOTUNE.value and (not on_cpu or interpret):
    print("autotune:")
    tuned, tune_log = _autotune(bench, shapes, _AUTOTUNE_REPEATS.value, _AUTOTUNE_KERNELS.value)
    save(complete=False)

  header = (
    f"{'M x K x N':>20s} {'method':>15s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'vs dense':>8s} "
    f"{'floor ms':>9s} {'bound':>7s} {'%floor':>7s} {'max_err':>9s} {'compile s':>9s}  blocks"
  )
  print(header)
  for m, k, n in shapes:
    data_sets = bench.inputs(m, k, n, _ROTATIONS.value)
    data = data_sets[0]
    dense_s = None
    for method in methods:
      shape_s = f"{m}x{k}x{n}"
      floor_s, bound = _floor(method, m, k, n)
      bs = _block_sizes_for(method, bench, m, k, n, tuned)
      row = dict(m=m, k=k, n=n, method=method, floor_ms=floor_s * 1e3, bound=bound)
      row["block_sizes"] = None if bs is None else dataclasses.asdict(bs)
      try:
        fn, names = bench.build(method, bs)
        args = [data[a] for a in names]
        arg_sets = [[d[a] for a in names] for d in data_sets]
        first_s, t = _median_time(fn, arg_sets, _REPEATS.value, _WARMUP.value, _CALLS.value)
        err = bench.check(method, fn(*args), data, _CHECK_ROWS.value)
      except Exception as e:  # noqa: BLE001 - report and go on with the other methods
        row["error"] = _short_error(e)
        rows.append(row)
        save(complete=False)
        print(f"{shape_s:>20s} {method:>15s} FAILED {row['error']}", flush=True)
        traceback.print_exc(limit=3, file=sys.stderr)
        continue
      if method == "xla_dense":
        dense_s = t
      flops = 2.0 * m * k * n
      row.update(
        ms=t * 1e3,
        # The mask pass does no matmul: its rate is bandwidth (gbps), not FLOP/s.
        tflops=None if method == "pallas_mask" else flops / t / 1e12,
        gbps=_min_bytes(method, m, k, n) / t / 1e9,
        vs_dense=None if dense_s is None else t / dense_s,
        pct_floor=100.0 * floor_s / t,
        max_abs_err=err,
        compile_s=first_s,
      )
      rows.append(row)
      save(complete=False)
      vs = "-" if row["vs_dense"] is None else f"{row['vs_dense']:.2f}x"
      tflops_s = "-" if row["tflops"] is None else f"{row['tflops']:.1f}"
      err_s = "-" if err is None else f"{err:.2e}"
      print(
        f"{shape_s:>20s} {method:>15s} {t * 1e3:9.3f} {tflops_s:>8s} {row['gbps']:7.0f} {vs:>8s} "
        f"{floor_s * 1e3:9.4f} {bound:>7s} {row['pct_floor']:6.1f}% {err_s:>9s} "
        f"{first_s:9.2f}  {_bs_str(bs)}",
        flush=True,
      )
    del data, data_sets

  if tuned:
    print("\nautotuned block sizes (paste into the TUNED_BLOCK_SIZES tables; key ranges cover")
    print("exactly the benchmarked (K, N)):")
    for (kernel, k, n), bs in sorted(tuned.items()):
      table = "nm_matmul" if kernel == "nm" else "int8_matmul"
      dtype = "bfloat16" if kernel == "nm" else "int8"
      backend_name = "MOSAIC_GPU" if kernel == "mgpu_int8" else "TRITON"
      print(f"  {table}: ({backend_name}, {dtype!r}, ({k}, {k + 1}), ({n}, {n + 1})): {bs!r},")

  save(complete=True)
  if _OUTPUT.value:
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  run(main)
