"""Prefill throughput: JAX dense vs N:M sparse vs HF transformers, side by side in one run.

A prefill is ``amber_jax.model.prefill`` under ``jax.jit`` (config static): logits
[B, T, V] and the KV cache of every layer. For every (batch, seq_len) of the grid
the dense prefill (plan None), the sparse one (the given plan) and, when given,
HF transformers' ``model(input_ids, use_cache=True)`` on the same weights and the
same tokens are each called once to compile / warm up, then timed ``repeats``
times in interleaved order (dense, sparse, HF, then rotated by one each
repetition, so slow drifts of a shared machine hit every column alike), blocking
until the outputs are ready. Medians are reported.

FLOPs are counted, not measured (see ``prefill_flops``); achieved GFLOP/s divides
that count by the median time. The sparse prefill runs the same dense matmuls on
inputs with zeros (no sparse kernel yet), so its FLOP count is the dense one and
its GFLOP/s is dense-equivalent throughput.

Library code: everything comes in as arguments (no flags, environment or files
it was not given); ``experiments/bench_prefill.py`` is the command-line front.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.core.patterns import parse_pattern_or_dense
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import prefill
from amber_jax.plan.coverage import plan_coverage, site_macs
from amber_jax.plan.schema import SparsityPlan, make_plan

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# name -> (JAX default_matmul_precision, torch float32 matmul precision); None: leave as is.
# "default" keeps each library's own default: on GPUs JAX may then use TF32 for float32 dots
# while torch uses full float32, so the JAX-vs-HF ratio would not compare the same arithmetic.
MATMUL_PRECISIONS: dict[str, tuple[str | None, str | None]] = {
  "default": (None, None),
  "highest": ("highest", "highest"),
  "tf32": ("tensorfloat32", "high"),
}

FLOP_COUNTING = (
  "FLOPs per prefill = 2 x multiply-adds of: the 7 linear projections of every layer "
  "(sum of d_in*d_out per token, times B*T tokens), attention scores QK^T and values PV over the "
  "full T x T square as our masked implementation computes it (2 x 2*B*H*T*T*head_dim per layer; "
  "causal-only would be half), and the LM head (B*T*d_model*vocab). Not counted: norms, RoPE, "
  "softmax, SiLU, residual adds, the embedding gather and the N:M mask computation. The sparse "
  "prefill multiplies the zeros too, so its count is the dense one."
)

_PREFILL = jax.jit(prefill, static_argnames=("config", "max_len", "dtype"))


# ----------------------------------------------------------------------------------------------
# Counting.


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Floating-point operations (2 per multiply-add) of one prefill, by part."""

  linear: int
  attention: int
  lm_head: int

  @property
  def total(self) -> int:
    return self.linear + self.attention + self.lm_head

  def as_dict(self) -> dict[str, int]:
    return {
      "linear": self.linear,
      "attention": self.attention,
      "lm_head": self.lm_head,
      "total": self.total,
    }


def prefill_flops(config: LlamaConfig, batch: int, seq_len: int) -> FlopCount:
  """The FLOP count of one prefill of ``batch`` x ``seq_len`` tokens (see FLOP_COUNTING)."""
  if batch < 1 or seq_len < 1:
    raise ValueError(f"batch and seq_len must be >= 1, got {batch=}, {seq_len=}")
  tokens = batch * seq_len
  linear_macs_per_token = config.n_layers * sum(site_macs(config).values())
  # QK^T: [T, hd] x [hd, T] per head; PV: [T, T] x [T, hd] per head.
  attn_macs = config.n_layers * 2 * batch * config.n_heads * seq_len * seq_len * config.head_dim
  return FlopCount(
    linear=2 * linear_macs_per_token * tokens,
    attention=2 * attn_macs,
    lm_head=2 * tokens * config.d_model * config.vocab_size,
  )


def param_bytes(params) -> int:
  """Bytes of all parameter leaves (the least a prefill must read from memory)."""
  return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# Tokens and timing.


def token_batch(token_ids: np.ndarray, batch: int, seq_len: int) -> np.ndarray:
  """[batch, seq_len] int32 rows cut consecutively from the start of ``token_ids``.

  A stream shorter than batch * seq_len is repeated (throughput does not depend on which
  tokens are read, only that they are real text).
  """
  ids = np.asarray(token_ids, np.int32).reshape(-1)
  if ids.size == 0:
    raise ValueError("token_ids is empty")
  need = batch * seq_len
  if ids.size < need:
    ids = np.resize(ids, need)
  return ids[:need].reshape(batch, seq_len)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each function, ``repeats`` rounds, order rotated every round.

  Each function must block until its work is done (``jax.block_until_ready``, a CUDA sync).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  names = list(fns)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      start = time.perf_counter()
      out = fns[name]()
      times[name].append(time.perf_counter() - start)
      del out
  return times


# ----------------------------------------------------------------------------------------------
# HF transformers.


class HFUnavailable(RuntimeError):
  """The HF comparison cannot run here (the message says why)."""


@dataclasses.dataclass
class HFPrefill:
  """An HF transformers causal LM holding the same weights as our params, ready to prefill."""

  model: Any
  torch: Any
  device: str
  dtype: str
  info: dict[str, Any]

  def prepare(self, tokens_BxT: np.ndarray):
    """The token ids as a torch tensor on the model's device (done before timing)."""
    return self.torch.from_numpy(np.asarray(tokens_BxT, np.int64)).to(self.device)

  def run(self, input_ids):
    """One prefill that builds the KV cache; returns when the device is done."""
    with self.torch.inference_mode():
      out = self.model(input_ids=input_ids, use_cache=True)
    if self.device != "cpu":
      self.torch.cuda.synchronize()
    return out

  def logits(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] as numpy."""
    out = self.run(self.prepare(tokens_BxT))
    return out.logits.float().cpu().numpy()


def _versions(*packages: str) -> dict[str, str]:
  out = {}
  for pkg in packages:
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def load_hf_prefill(
  config: LlamaConfig,
  params,
  *,
  dtype: str = "float32",
  device: str = "auto",
  threads: int | None = None,
) -> HFPrefill:
  """Converts ``params`` to an HF directory (a temporary one) and loads it with transformers.

  Args:
    config, params: the model, as loaded by amber_jax (numpy or jax arrays).
    dtype: "float32" or "bfloat16", the torch dtype of the HF model.
    device: "cpu", "cuda", or "auto": the device JAX computes on (CUDA when JAX's backend is
      gpu; then a torch without CUDA raises HFUnavailable rather than timing a CPU run).
    threads: torch intra-op threads (set with torch.set_num_threads); None leaves torch's.

  Raises:
    HFUnavailable: torch or transformers do not import, or no matching torch device.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  try:
    import torch
    import transformers
  except ImportError as e:
    raise HFUnavailable(f"torch/transformers do not import ({e})") from e
  if device == "auto":
    backend = jax.default_backend()
    if backend == "cpu":
      device = "cpu"
    elif backend in ("gpu", "cuda", "rocm"):
      device = "cuda"
    else:
      raise HFUnavailable(f"no HF transformers counterpart for JAX backend {backend!r}")
  if device == "cuda" and not torch.cuda.is_available():
    raise HFUnavailable(
      f"JAX computes on {jax.default_backend()} but torch {torch.__version__} sees no CUDA "
      "device; an HF CPU time would not be comparable"
    )
  if device not in ("cpu", "cuda"):
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
  if threads is not None:
    torch.set_num_threads(threads)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  # transformers 5 renamed torch_dtype to dtype (4.x only knows torch_dtype).
  dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
  host_params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  with tempfile.TemporaryDirectory(prefix="amber_jax_hf_") as tmp:
    path = Path(tmp) / "model"
    from amber_jax.io.hf import save_hf_checkpoint

    save_hf_checkpoint(config, host_params, path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **{dtype_kw: torch_dtype})
  del host_params
  model = model.to(device).eval()
  info = {
    "status": "ran",
    "device": device if device == "cpu" else torch.cuda.get_device_name(0),
    "dtype": dtype,
    "threads": torch.get_num_threads(),
    "attn_implementation": getattr(model.config, "_attn_implementation", None),
    "model_class": type(model).__name__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
  }
  return HFPrefill(model=model, torch=torch, device=device, dtype=dtype, info=info)


@contextlib.contextmanager
def _matmul_precision(name: str, hf: HFPrefill | None):
  """Applies MATMUL_PRECISIONS[name] to JAX (tracing) and torch, restoring torch afterwards."""
  jax_prec, torch_prec = MATMUL_PRECISIONS[name]
  old_torch = None
  if hf is not None and torch_prec is not None:
    old_torch = hf.torch.get_float32_matmul_precision()
    hf.torch.set_float32_matmul_precision(torch_prec)
  try:
    if jax_prec is None:
      yield
    else:
      with jax.default_matmul_precision(jax_prec):
        yield
  finally:
    if old_torch is not None:
      hf.torch.set_float32_matmul_precision(old_torch)


# ----------------------------------------------------------------------------------------------
# The benchmark.


def _stats(times_s: Sequence[float], tokens: int, flops: int, first_s: float) -> dict[str, Any]:
  med = statistics.median(times_s)
  return {
    "median_ms": 1e3 * med,
    "min_ms": 1e3 * min(times_s),
    "times_ms": [1e3 * t for t in times_s],
    "first_call_s": first_s,  # compile + one run (JAX); warm-up (HF)
    "tokens_per_s": tokens / med,
    "gflop_per_s": flops / med / 1e9,
  }


def bench_prefill(
  params,
  config: LlamaConfig,
  token_ids: np.ndarray,
  *,
  sparse_plan: SparsityPlan | None,
  batch_sizes: Sequence[int],
  seq_lens: Sequence[int],
  repeats: int = 5,
  dtype: str = "float32",
  hf: HFPrefill | None = None,
  hf_skip_reason: str = "not requested",
  matmul_precision: str = "default",
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Times dense, sparse (``sparse_plan``) and HF prefill over batch_sizes x seq_lens.

  Args:
    params: our params pytree (numpy or jax arrays), cast to ``dtype`` and put on the device.
    config: the model config (a static argument of the jitted prefill).
    token_ids: a 1-D stream of real token ids; each grid point reads its first B*T.
    sparse_plan: the plan of the sparse column (None: no sparse column).
    batch_sizes, seq_lens: the grid.
    repeats: timed calls per column and grid point, after one warm-up call.
    dtype: "float32" or "bfloat16", compute and parameter dtype.
    hf: an HFPrefill (see load_hf_prefill) for the HF column, or None.
    hf_skip_reason: recorded (and shown under the table) when ``hf`` is None.
    matmul_precision: a key of MATMUL_PRECISIONS.

  Returns:
    A JSON-ready dict: "rows" (one per grid point: flops, "dense"/"sparse"/"hf" timing stats
    or None, "sparse_over_dense" and "hf_over_dense" (the speedup of our dense prefill over
    HF) as ratios of medians, and the same as medians of per-round ratios, "*_paired"), "hf"
    (versions, device, threads; or status "skipped" with the reason), "logit_check" (HF vs our
    dense logits on the first grid point), the settings and FLOP_COUNTING.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(
      f"matmul_precision must be one of {sorted(MATMUL_PRECISIONS)}, got {matmul_precision!r}"
    )
  if not batch_sizes or not seq_lens or min(*batch_sizes, *seq_lens) < 1:
    raise ValueError(
      f"batch_sizes and seq_lens must be non-empty and >= 1: {batch_sizes=}, {seq_lens=}"
    )
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  jdtype = DTYPES[dtype]
  dev_params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jdtype), params))
  rows = []
  logit_check = None
  with _matmul_precision(matmul_precision, hf):
    for b in batch_sizes:
      for t in seq_lens:
        tokens_np = token_batch(token_ids, b, t)
        tokens = jax.device_put(jnp.asarray(tokens_np))
        fns: dict[str, Callable[[], Any]] = {
          "dense": lambda tokens=tokens: jax.block_until_ready(
            _PREFILL(dev_params, tokens, plan=None, config=config, dtype=jdtype)
          )
        }
        if sparse_plan is not None:
          fns["sparse"] = lambda tokens=tokens: jax.block_until_ready(
            _PREFILL(dev_params, tokens, plan=sparse_plan, config=config, dtype=jdtype)
          )
        if hf is not None:
          ids = hf.prepare(tokens_np)
          fns["hf"] = lambda ids=ids: hf.run(ids)
        first = {}
        for name, fn in fns.items():
          start = time.perf_counter()
          out = fn()
          first[name] = time.perf_counter() - start
          if name == "dense" and hf is not None and logit_check is None:
            ours = np.asarray(out[0], np.float32)
            theirs = hf.logits(tokens_np)
            diff = float(np.max(np.abs(ours - theirs)))
            logit_check = {
              "batch": b,
              "seq_len": t,
              "max_abs_diff": diff,
              "max_abs_logit": float(np.max(np.abs(ours))),
              "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
            }
            del ours, theirs
            log(
              f"HF vs our dense logits on batch {b} x {t}: max abs diff {diff:.3g} "
              f"(max |logit| {logit_check['max_abs_logit']:.3g})"
            )
          del out
        times = time_interleaved(fns, repeats)
        flops = prefill_flops(config, b, t)
        stats = {n: _stats(times[n], b * t, flops.total, first[n]) for n in fns}
        dense_ms = stats["dense"]["median_ms"]
        # Per-round ratios (the calls of one round run back to back): robust to slow drifts.
        paired = {
          n: statistics.median(a / d for a, d in zip(times[n], times["dense"], strict=True))
          for n in fns
          if n != "dense"
        }
        row = {
          "batch": b,
          "seq_len": t,
          "tokens": b * t,
          "flops": flops.as_dict(),
          "dense": stats["dense"],
          "sparse": stats.get("sparse"),
          "hf": stats.get("hf"),
          "sparse_over_dense": stats["sparse"]["median_ms"] / dense_ms
          if "sparse" in stats
          else None,
          "hf_over_dense": stats["hf"]["median_ms"] / dense_ms if "hf" in stats else None,
          "sparse_over_dense_paired": paired.get("sparse"),
          "hf_over_dense_paired": paired.get("hf"),
        }
        rows.append(row)
        log(
          f"batch {b} x seq_len {t}: "
          + ", ".join(f"{n} {s['median_ms']:.1f} ms" for n, s in stats.items())
        )
  pattern = None if sparse_plan is None else sparse_plan.pattern
  return {
    "pattern": None if pattern is None else str(pattern),
    "score": "|x| x factors (factors from the plan; all ones = naive |x|)",
    "sparse_sites": 0 if sparse_plan is None else len(sparse_plan.enabled_sites()),
    "total_sites": config.n_layers * len(config.sites),
    "coverage": 0.0 if sparse_plan is None else plan_coverage(config, sparse_plan).covered,
    "dtype": dtype,
    "repeats": repeats,
    "matmul_precision": matmul_precision,
    "flop_counting": FLOP_COUNTING,
    "param_bytes": param_bytes(dev_params),
    "jax": {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      **_versions("jax", "jaxlib"),
    },
    "hf": dict(hf.info) if hf is not None else {"status": "skipped", "reason": hf_skip_reason},
    "logit_check": logit_check,
    "rows": rows,
  }


# ----------------------------------------------------------------------------------------------
# The whole job, machine facts, and the table.


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillBenchConfig:
  """Everything run_prefill_bench needs; validated on construction (before any loading)."""

  model: str
  cache_dir: str
  pattern: str = "8:16"
  batch_sizes: tuple[int, ...] = (1, 4)
  seq_lens: tuple[int, ...] = (128, 512)
  repeats: int = 5
  dtype: str = "float32"
  text: str = "lee_background"
  hf: bool = True
  torch_threads: int | None = None
  matmul_precision: str = "highest"

  def __post_init__(self):
    parse_pattern_or_dense(self.pattern)
    if not self.batch_sizes or min(self.batch_sizes) < 1:
      raise ValueError(f"batch_sizes must be non-empty and >= 1, got {self.batch_sizes}")
    if not self.seq_lens or min(self.seq_lens) < 1:
      raise ValueError(f"seq_lens must be non-empty and >= 1, got {self.seq_lens}")
    if self.repeats < 1:
      raise ValueError(f"repeats must be >= 1, got {self.repeats}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(
        f"matmul_precision must be one of {sorted(MATMUL_PRECISIONS)}, "
        f"got {self.matmul_precision!r}"
      )
    if self.torch_threads is not None and self.torch_threads < 1:
      raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
    if not self.cache_dir:
      raise ValueError("cache_dir must be given (where the model and text are cached)")
    from amber_jax.runs.checks import check_text_source
    from amber_jax.runs.common import check_cache_dir

    check_cache_dir(self.cache_dir)
    check_text_source(self.text, arg="text")


def run_prefill_bench(
  cfg: PrefillBenchConfig, *, log: Callable[[str], None] = print, show_progress: bool = True
) -> dict[str, Any]:
  """Loads cfg.model and its tokenizer, tokenizes cfg.text and runs bench_prefill.

  The HF column is attempted when cfg.hf (load_hf_prefill, device "auto"); when it cannot
  run, the reason is logged and recorded. Returns bench_prefill's dict plus "model",
  "model_config" and "tokens_in_text".
  """
  from amber_jax.data.texts import load_text
  from amber_jax.io.loading import load_model, load_tokenizer
  from amber_jax.io.sources import read_config, resolve_model

  pattern = parse_pattern_or_dense(cfg.pattern)
  source = resolve_model(cfg.model, cfg.cache_dir, log=log)
  model_config = read_config(source)
  if max(cfg.seq_lens) > model_config.seq_len_limit:
    raise ValueError(
      f"seq_lens must be <= {model_config.seq_len_limit} (the model's context), "
      f"got {max(cfg.seq_lens)}"
    )
  sparse_plan = make_plan(model_config, pattern) if pattern is not None else None
  tokenizer = load_tokenizer(source)
  text = load_text(cfg.text, cfg.cache_dir, log=log)
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  need = max(cfg.batch_sizes) * max(cfg.seq_lens)
  if ids.size < need:
    log(f"note: the text has {ids.size} tokens, fewer than {need}; rows repeat it")
  loaded = load_model(source, cfg.cache_dir, show_progress=show_progress, log=log)

  hf, reason = None, "disabled (hf=False)"
  if cfg.hf:
    try:
      hf = load_hf_prefill(loaded.config, loaded.params, dtype=cfg.dtype, threads=cfg.torch_threads)
      log(
        f"HF transformers column: torch {hf.info['torch']}, transformers "
        f"{hf.info['transformers']}, device {hf.info['device']}, {hf.info['threads']} threads, "
        f"attention {hf.info['attn_implementation']}"
      )
    except HFUnavailable as e:
      reason = str(e)
      log(f"HF transformers column skipped: {reason}")
  result = bench_prefill(
    loaded.params,
    loaded.config,
    ids,
    sparse_plan=sparse_plan,
    batch_sizes=cfg.batch_sizes,
    seq_lens=cfg.seq_lens,
    repeats=cfg.repeats,
    dtype=cfg.dtype,
    hf=hf,
    hf_skip_reason=reason,
    matmul_precision=cfg.matmul_precision,
    log=log,
  )
  return {
    "model": cfg.model,
    # Where the model is cached is not part of what was timed (and a path of one machine).
    "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"},
    "model_config": dataclasses.asdict(loaded.config),
    "tokens_in_text": int(ids.size),
    **result,
  }


def machine_info(cpu_model: str = "") -> dict[str, Any]:
  """Platform, CPU count (and ``cpu_model``, read by the caller), JAX backend and devices."""
  devices = jax.devices()
  return {
    "platform": platform.platform(),
    "machine": platform.machine(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "cpu_model": cpu_model,
    "jax_backend": jax.default_backend(),
    "jax_devices": [str(d) for d in devices],
    "device_kind": devices[0].device_kind,
  }


def peak_memory() -> dict[str, float]:
  """Peak resident set size of this process (MB) and, where known, peak device memory (MB)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB.
  out = {"peak_rss_mb": rss_bytes / 2**20}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["jax_device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  torch = sys.modules.get("torch")  # Only if already imported.
  if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
    out["torch_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


def _fmt(x: float | None, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


TABLE_COLUMNS = (
  "batch",
  "seq_len",
  "GFLOP",
  "dense ms",
  "sparse ms",
  "sparse/dense",
  "HF ms",
  "HF/dense (speedup)",
  "dense tok/s",
  "sparse tok/s",
  "dense GFLOP/s",
  "HF GFLOP/s",
)


def table_rows(result: Mapping[str, Any]) -> list[list[str]]:
  """The table's cells, one list per grid point (columns: TABLE_COLUMNS)."""
  out = []
  for r in result["rows"]:
    sp, hf = r["sparse"] or {}, r["hf"] or {}
    out.append(
      [
        str(r["batch"]),
        str(r["seq_len"]),
        f"{r['flops']['total'] / 1e9:.1f}",
        f"{r['dense']['median_ms']:.1f}",
        _fmt(sp.get("median_ms"), ".1f"),
        _fmt(r["sparse_over_dense"], ".3f"),
        _fmt(hf.get("median_ms"), ".1f"),
        _fmt(r["hf_over_dense"], ".2f"),
        f"{r['dense']['tokens_per_s']:.0f}",
        _fmt(sp.get("tokens_per_s"), ".0f"),
        f"{r['dense']['gflop_per_s']:.1f}",
        _fmt(hf.get("gflop_per_s"), ".1f"),
      ]
    )
  return out


def format_table(result: Mapping[str, Any], *, markdown: bool = False) -> str:
  """One table (plain text or Markdown) and the notes that read it."""
  cells = table_rows(result)
  if markdown:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---:|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
  else:
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(TABLE_COLUMNS)]
    fmt_row = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
    header = fmt_row(TABLE_COLUMNS)
    lines = [header, "-" * len(header)] + [fmt_row(row) for row in cells]
  if result["pattern"] is None:
    sparse = "no sparse column (dense pattern)"
  else:
    sparse = (
      f"sparse = {result['pattern']} on {result['sparse_sites']}/{result['total_sites']} linear "
      "inputs, |x| score (dense matmuls on the zeroed inputs)"
    )
  notes = [
    f"median of {result['repeats']} interleaved repetitions after a warm-up call; "
    f"{result['dtype']}, matmul precision {result['matmul_precision']}; {sparse}",
  ]
  for key, name in (
    ("sparse_over_dense_paired", "sparse/dense"),
    ("hf_over_dense_paired", "HF/dense"),
  ):
    values = [r.get(key) for r in result["rows"]]
    if any(v is not None for v in values):
      notes.append(
        f"{name} as the median of per-round ratios (robust to load drifts), row by row: "
        + ", ".join(_fmt(v, ".3f") for v in values)
      )
  hf = result["hf"]
  if hf.get("status") == "ran":
    notes.append(
      f"HF = transformers {hf['transformers']} / torch {hf['torch']} {hf['model_class']} "
      f"(attention {hf['attn_implementation']}) on {hf['device']}, {hf['threads']} threads, "
      "model(input_ids, use_cache=True) under inference_mode"
    )
    lc = result.get("logit_check")
    if lc:
      notes.append(
        f"HF vs our dense logits, batch {lc['batch']} x {lc['seq_len']}: max abs diff "
        f"{lc['max_abs_diff']:.2g} (max |logit| {lc['max_abs_logit']:.3g}), argmax agreement "
        f"{100 * lc['argmax_agreement']:.2f}%"
      )
  else:
    notes.append(f"HF column skipped: {hf.get('reason')}")
  notes.append(result["flop_counting"])
  sep = "\n\n" if markdown else "\n"
  return "\n".join(lines) + sep + sep.join(notes)


# ----------------------------------------------------------------------------------------------
# Random weights of a preset, several sparse implementations (for accelerators, where the real
# checkpoint may not be reachable and the throughput does not depend on the weight values).


def bench_random_preset(
  preset_name: str,
  *,
  pattern: str,
  impls: Sequence[str],
  batch_sizes: Sequence[int],
  seq_lens: Sequence[int],
  repeats: int = 5,
  dtype: str = "bfloat16",
  peak_tflops: float | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Dense vs one sparse column per ``impl`` ("xla", "pallas") on random weights of a preset.

  Every linear input is sparsified (the "all" policy, naive |x| score). Returns rows with the
  median ms of each column, its ratio to dense, tokens/s and achieved TFLOP/s of dense; with
  ``peak_tflops`` (the device's dense peak in ``dtype``) also the compute floor of a prefill
  (its counted FLOPs at that peak) and the share of it dense reaches.
  """
  if peak_tflops is not None and not (peak_tflops > 0 and math.isfinite(peak_tflops)):
    raise ValueError(f"peak_tflops must be > 0 (TFLOP/s) or None, got {peak_tflops!r}")
  # Everything is checked before the (large) random weights are made.
  if parse_pattern_or_dense(pattern) is None:
    raise ValueError(
      f"pattern must be N:M with a random preset (dense is always timed), got {pattern!r}"
    )
  if not impls:
    raise ValueError("impls must name at least one sparse implementation (e.g. xla, pallas)")
  if not batch_sizes or min(batch_sizes) < 1:
    raise ValueError(f"batch_sizes must be non-empty and >= 1, got {tuple(batch_sizes)}")
  if not seq_lens or min(seq_lens) < 1:
    raise ValueError(f"seq_lens must be non-empty and >= 1, got {tuple(seq_lens)}")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  from amber_jax.model.presets import init_random_params, preset

  config = preset(preset_name)
  if max(seq_lens) > config.seq_len_limit:
    raise ValueError(
      f"seq_lens must be <= {config.seq_len_limit} (the {preset_name} context), got {max(seq_lens)}"
    )
  jdtype = DTYPES[dtype]
  # "xla-sortnet" = impl xla with the sortnet mask algorithm; "pallas" = the fused kernel.
  plans = {}
  for name in impls:
    try:
      plans[f"sparse_{name}"] = make_plan(
        config, pattern, impl=name.partition("-")[0], mask_method=name.partition("-")[2] or "auto"
      )
    except ValueError as e:
      raise ValueError(f"impls entry {name!r}: {e}") from None
  params = init_random_params(config, jax.random.key(0), dtype=jdtype)
  rng = np.random.default_rng(0)
  rows = []
  for b in batch_sizes:
    for t in seq_lens:
      tokens = jax.device_put(jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32))
      fns = {
        "dense": lambda tokens=tokens: jax.block_until_ready(
          _PREFILL(params, tokens, plan=None, config=config, dtype=jdtype)
        )
      }
      for name, plan in plans.items():
        fns[name] = lambda tokens=tokens, plan=plan: jax.block_until_ready(
          _PREFILL(params, tokens, plan=plan, config=config, dtype=jdtype)
        )
      first = {}
      for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
      times = time_interleaved(fns, repeats)
      flops = prefill_flops(config, b, t).total
      med = {n: statistics.median(v) for n, v in times.items()}
      row = {
        "batch": b,
        "seq_len": t,
        "tokens": b * t,
        "flops": flops,
        "median_ms": {n: 1e3 * v for n, v in med.items()},
        "first_call_s": first,
        "over_dense": {n: med[n] / med["dense"] for n in fns if n != "dense"},
        "dense_tflop_per_s": flops / med["dense"] / 1e12,
      }
      if peak_tflops is not None:
        row["floor_ms"] = 1e3 * flops / (peak_tflops * 1e12)
        row["dense_pct_of_floor"] = 100.0 * row["floor_ms"] / row["median_ms"]["dense"]
      rows.append(row)
      log(
        f"{preset_name} batch {b} x {t}: "
        + ", ".join(f"{n} {1e3 * v:.2f} ms" for n, v in med.items())
      )
  return {
    "preset": preset_name,
    "pattern": pattern,
    "impls": list(impls),
    "dtype": dtype,
    "repeats": repeats,
    "peak_tflops": peak_tflops,
    "param_bytes": param_bytes(params),
    "jax": {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      **_versions("jax", "jaxlib"),
    },
    "rows": rows,
  }


def format_random_preset_table(result: Mapping[str, Any]) -> str:
  names = ["dense", *[f"sparse_{i}" for i in result["impls"]]]
  header = (
    ["batch", "seq_len"]
    + [f"{n} ms" for n in names]
    + [f"{n}/dense" for n in names[1:]]
    + ["dense TFLOP/s"]
    + (["floor ms", "dense % of floor"] if result.get("peak_tflops") else [])
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
  for r in result["rows"]:
    cells = [str(r["batch"]), str(r["seq_len"])]
    cells += [f"{r['median_ms'][n]:.2f}" for n in names]
    cells += [f"{r['over_dense'][n]:.3f}" for n in names[1:]]
    cells += [f"{r['dense_tflop_per_s']:.1f}"]
    if result.get("peak_tflops"):
      cells += [f"{r['floor_ms']:.2f}", f"{r['dense_pct_of_floor']:.1f}%"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
