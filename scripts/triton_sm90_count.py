"""Compile a Pallas Triton kernel for sm_90 without a GPU and count what it costs.

Lowers ``pallas_kernels.nm_mask`` (or the fused ``nm_matmul``) for the cuda platform, takes
the Triton IR out of the ``__gpu$xla.gpu.triton`` custom call, and compiles it with a pip
Triton into a cubin (its bundled ptxas), then prints registers, spill stack and SASS
instructions per thread and per activation entry. XLA bundles its own Triton, so this is a
proxy of what the GPU will run, good for comparing variants of a kernel.

Setup (once; pip Triton in its own environment, it pins its own dependencies):

    python3 -m venv /tmp/triton_venv && /tmp/triton_venv/bin/pip install triton

Run from the repository root with the project's environment:

    python scripts/triton_sm90_count.py --triton_python=/tmp/triton_venv/bin/python \\
        --kernel=nm_mask --patterns=2:4,4:8,8:16 --selections=pairwise,threshold

Measured 2026-11-29 (pip Triton 3.9, nm_mask, bf16 8192 x 4096, [64, 256] tiles, 8 warps;
SASS instructions per entry): 2:4 pairwise 20.5 / threshold 29.6; 4:8 33.1 / 28.9;
8:16 59 / 27.2; no spills. (With 4 warps the pairwise 8:16 version spilled 496 B.)
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

_TRITON_PYTHON = flags.DEFINE_string(
  "triton_python", None, "Python of an environment with pip Triton (see the docstring)."
)
_KERNEL = flags.DEFINE_enum("kernel", "nm_mask", ["nm_mask", "nm_matmul"], "Kernel to compile.")
_PATTERNS = flags.DEFINE_list("patterns", ["2:4", "8:16"], "N:M patterns.")
_SELECTIONS = flags.DEFINE_list(
  "selections", ["auto"], "Group selections (pallas_kernels.nm_matmul.GROUP_SELECTIONS)."
)
_SHAPE = flags.DEFINE_string("shape", "8192x4096x4096", "M x K x N (N: nm_matmul only).")

# Runs in the pip-Triton environment: compile MLIR text for sm_90, print the resource use.
_COMPILE = r"""
import json, subprocess, sys, triton
from pathlib import Path
from triton.backends.compiler import GPUTarget
src, out, warps, stages = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": stages})
out.mkdir(parents=True, exist_ok=True)
(out / "kernel.cubin").write_bytes(k.asm["cubin"])
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
res = subprocess.run([str(tool), "-res-usage", str(out / "kernel.cubin")], capture_output=True,
                     text=True).stdout
sass = subprocess.run([str(tool), "-sass", str(out / "kernel.cubin")], capture_output=True,
                      text=True).stdout
print(json.dumps({"res": res, "sass": sass}))
"""


def _triton_ir(fn, *args) -> tuple[bytes, int, int]:
  """Lower ``fn`` for cuda; return its one Triton custom call's IR, num_warps, num_stages."""
  from jax._src.lib.mlir import ir

  module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          name = (
            str(inner.operation.attributes["call_target_name"])
            if (inner.operation.name == "stablehlo.custom_call")
            else ""
          )
          if "triton" in name:
            calls.append(inner)
          walk(inner.operation)

  walk(module.operation)
  if len(calls) != 1:
    raise SystemExit(f"error: expected one Triton custom call, found {len(calls)}")
  config = ir.DictAttr(calls[0].operation.attributes["mhlo.backend_config"])
  values = {config[i].name: config[i].attr for i in range(len(config))}
  blob = ir.StringAttr(values["ir"]).value_bytes
  warps = int(str(values["num_warps"]).split(":")[0])
  stages = int(str(values["num_stages"]).split(":")[0])
  return blob, warps, stages


def _as_text(blob: bytes) -> str:
  """Triton IR bytecode -> MLIR text with jaxlib's Triton dialect (pip Triton cannot read
  the bytecode of another Triton version)."""
  from jax._src.lib.mlir import ir
  from jaxlib.triton import dialect

  ctx = ir.Context()
  dialect.register_dialect(ctx)
  ctx.allow_unregistered_dialects = True
  with ctx:
    return ir.Module.parse(blob).operation.get_asm()


def main(argv):
  del argv
  if not _TRITON_PYTHON.value:
    raise SystemExit("error: --triton_python is required (see the script's docstring)")
  import json

  import pallas_kernels  # noqa: F401 - registers the modules (the package shadows their names)

  nm_matmul_module = sys.modules["pallas_kernels.nm_matmul"]
  nm_mask_module = sys.modules["pallas_kernels.nm_mask"]
  m_tokens, k, n_out = (int(v) for v in _SHAPE.value.split("x"))
  x = jax.ShapeDtypeStruct((m_tokens, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((k, n_out), jnp.bfloat16)
  original = nm_matmul_module.keep_from_group_slices
  print(
    f"{'kernel':>9} {'pattern':>7} {'selection':>9} {'regs':>5} {'stack':>6} "
    f"{'SASS/thread':>11} {'per entry':>9}"
  )
  for pattern in _PATTERNS.value:
    for selection in _SELECTIONS.value:
      select = functools.partial(original, method=selection)
      # The kernels call the helper by its module-level name: swap it while lowering.
      nm_matmul_module.keep_from_group_slices = select
      nm_mask_module.keep_from_group_slices = select
      jax.clear_caches()  # the kernels' jitted wrappers would reuse the last trace
      try:
        if _KERNEL.value == "nm_mask":
          fn = functools.partial(nm_mask_module.nm_mask, pattern=pattern, backend="triton")
          blob, warps, stages = _triton_ir(fn, x)
          bs = nm_mask_module.default_mask_block_sizes(
            "triton", m_tokens, k, int(pattern.split(":")[1])
          )
          per_thread_entries = bs.block_m * bs.block_k / (warps * 32)
        else:
          fn = functools.partial(nm_matmul_module.nm_matmul, pattern=pattern, backend="triton")
          blob, warps, stages = _triton_ir(fn, x, w)
          per_thread_entries = float("nan")  # a K loop: per-entry counts do not apply
      finally:
        nm_matmul_module.keep_from_group_slices = original
        nm_mask_module.keep_from_group_slices = original
      with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ttir"
        src.write_text(_as_text(blob))
        run = subprocess.run(
          [_TRITON_PYTHON.value, "-c", _COMPILE, str(src), str(Path(tmp) / "out"), str(warps),
           str(stages)],
          capture_output=True, text=True,
        )  # fmt: skip
      if run.returncode:
        print(f"{_KERNEL.value:>9} {pattern:>7} {selection:>9} compile failed: {run.stderr[-500:]}")
        continue
      result = json.loads(run.stdout.strip().splitlines()[-1])
      regs = re.search(r"REG:(\d+)", result["res"])
      stack = re.search(r"STACK:(\d+)", result["res"])
      count = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", result["sass"], flags=re.M))
      print(
        f"{_KERNEL.value:>9} {pattern:>7} {selection:>9} {regs.group(1) if regs else '?':>5} "
        f"{stack.group(1) if stack else '?':>6} {count:>11} {count / per_thread_entries:>9.1f}"
      )


if __name__ == "__main__":
  app.run(main)
