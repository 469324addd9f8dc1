"""Host memory of loading: peak RSS of a fresh process that loads an HF checkpoint onto the
device, on first load (conversion + param cache write) and from the param cache.

Each measurement is its own child process (``python -c``), so that the peak (the child's
``VmHWM``, the high-water mark of its resident set: what ``/usr/bin/time -v`` reports as maximum
resident set size) is the load's alone; a child that only imports the same modules gives the
baseline the table subtracts. ``code_root`` runs the same driver on another
checkout of the project (e.g. a ``git worktree`` of an older commit), for a before/after table.
The checkpoint is synthetic (random values of a real model's shapes), written tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import ml_dtypes
import numpy as np

from amber_jax.io.hf import CONFIG_FILE, INDEX_FILE, config_to_hf, hf_tensor_shapes
from amber_jax.model.config import LlamaConfig

_PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
FILE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def write_synthetic_hf_checkpoint(
  config: LlamaConfig,
  path: str | os.PathLike,
  *,
  dtype: str = "float32",
  shard_bytes: int = 2 * 2**30,
  seed: int = 0,
) -> int:
  """Writes an HF checkpoint directory of ``config``'s shapes (values N(0, 0.02), norms 1) in
  ``dtype``, sharded into files of at most ``shard_bytes`` with a ``model.safetensors.index.json``
  as the hub's are, one tensor in memory at a time. Atomic (a temporary directory renamed to
  ``path``). Returns the bytes of tensor data."""
  if dtype not in FILE_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(FILE_DTYPES)}, got {dtype!r}")
  np_dtype = np.dtype(FILE_DTYPES[dtype])
  path = pathlib.Path(path)
  shapes = hf_tensor_shapes(config)
  shards: list[list[str]] = [[]]
  size = 0
  for name, shape in shapes.items():
    n = int(np.prod(shape)) * np_dtype.itemsize
    if shards[-1] and size + n > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  rng = np.random.default_rng(seed)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  total = 0
  weight_map = {}
  try:
    for k, names in enumerate(shards):
      file = (
        "model.safetensors"
        if len(shards) == 1
        else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      )
      header, offset = {}, 0
      for name in names:
        n = int(np.prod(shapes[name])) * np_dtype.itemsize
        header[name] = {
          "dtype": _ST_NAMES[np_dtype],
          "shape": list(shapes[name]),
          "data_offsets": [offset, offset + n],
        }
        offset += n
        weight_map[name] = file
      blob = json.dumps(header).encode()
      blob += b" " * (-len(blob) % 8)
      with open(tmp / file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
          shape = shapes[name]
          if len(shape) == 1:
            arr = np.ones(shape, np_dtype)
          else:
            arr = (rng.standard_normal(shape, np.float32) * 0.02).astype(np_dtype)
          f.write(arr.tobytes())
          total += arr.nbytes
    if len(shards) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    hf_config = config_to_hf(config, {"torch_dtype": dtype})
    (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    if path.exists():
      shutil.rmtree(path)
    tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return total


# The child: loads the checkpoint as a job does (load_model, then the params onto the device),
# printing JSON. On an older checkout without load_model(dtype=) or to_device it falls back to
# what jobs did then: load float32, then jax.tree.map(jnp.asarray) into the compute dtype.
_DRIVER = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
from amber_jax.io import loading
from amber_jax.io.sources import resolve_model
model, cache_dir, dtype, phase = sys.argv[1:5]
def peak():
  # VmHWM, not ru_maxrss: after fork + exec, Linux's ru_maxrss still counts the parent's
  # resident set at the fork (the benchmark's own); VmHWM belongs to the new address space.
  try:
    for line in open("/proc/self/status"):
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if phase == "baseline":
  print(json.dumps({"seconds": 0.0, "peak_rss_bytes": peak()}))
  sys.exit(0)
t0 = time.perf_counter()
source = resolve_model(model, cache_dir, log=lambda *a: None)
quiet = dict(show_progress=False, log=lambda *a: None)
if hasattr(loading, "to_device"):
  loaded = loading.load_model(source, cache_dir, dtype=dtype, **quiet)
  params = loading.to_device(loaded.params, jnp.dtype(dtype))
else:
  loaded = loading.load_model(source, cache_dir, **quiet)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(dtype)), loaded.params)
jax.block_until_ready(params)
leaf = jax.tree.leaves(params)[0]
import amber_jax
print(json.dumps({"seconds": time.perf_counter() - t0, "from_cache": loaded.from_cache,
                  "dtype": str(leaf.dtype), "peak_rss_bytes": peak(),
                  "code": amber_jax.__file__}))
"""


@dataclasses.dataclass(frozen=True)
class LoadMeasurement:
  phase: str  # "baseline" (imports only), "first" (convert + cache write) or "cached"
  peak_rss_bytes: int
  seconds: float
  from_cache: bool | None
  dtype: str | None
  code: str | None  # the amber_jax the child imported


def measure_load(
  model_dir: str | os.PathLike,
  cache_dir: str | os.PathLike,
  *,
  dtype: str,
  phase: str,
  code_root: str | os.PathLike | None = None,
) -> LoadMeasurement:
  """Peak RSS of one child process loading ``model_dir`` in ``dtype`` (see the module doc).
  ``phase`` "first" empties ``cache_dir`` first; "cached" expects the entry written by "first".
  ``code_root``: the checkout whose ``amber_jax`` the child imports (default: this one)."""
  if phase not in ("baseline", "first", "cached"):
    raise ValueError(f"phase must be baseline, first or cached, got {phase!r}")
  if phase == "first":
    shutil.rmtree(cache_dir, ignore_errors=True)
  # The child imports amber_jax from ``root`` alone: first on PYTHONPATH, and its working
  # directory (which ``python -c`` puts before PYTHONPATH on sys.path).
  root = pathlib.Path(code_root) if code_root is not None else _PROJECT_ROOT
  env = {**os.environ, "PYTHONPATH": os.fspath(root)}
  argv = [sys.executable, "-c", _DRIVER, os.fspath(model_dir), os.fspath(cache_dir), dtype, phase]
  proc = subprocess.run(argv, env=env, cwd=root, capture_output=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"load child failed (rc {proc.returncode}): {proc.stderr.decode()[-2000:]}")
  result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
  return LoadMeasurement(
    phase=phase,
    peak_rss_bytes=result["peak_rss_bytes"],
    seconds=result["seconds"],
    from_cache=result.get("from_cache"),
    dtype=result.get("dtype"),
    code=result.get("code"),
  )
