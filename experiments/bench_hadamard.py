"""Cost of the online Hadamard of down's input next to down itself (amber_jax.bench.hadamard_bench).

    python experiments/bench_hadamard.py --output=results/hadamard_bench.json

Shapes (tokens x d_ff -> d_model): SmolLM2-135M (1536 -> 576), Llama-3.1-8B (14336 -> 4096,
--shapes=full only: 3.5 GB of float32 on the host) and Qwen3-30B-A3B's experts (768 -> 2048).
float32 on CPU, bfloat16 on accelerators. Prints ms per call and the ratio to down alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from _common import run
from absl import flags

from amber_jax.bench.hadamard_bench import run_hadamard_bench
from amber_jax.io.atomic import check_output_file, write_json_atomic

SHAPES = {
  "small": [(2048, 1536, 576), (2048, 768, 2048)],
  "full": [(2048, 1536, 576), (2048, 768, 2048), (4096, 14336, 4096)],
}
_SHAPES = flags.DEFINE_enum("shapes", "small", sorted(SHAPES), "Shape set.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per variant (median).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results path.")


def main(argv):
  del argv
  if _OUTPUT.value:
    check_output_file(_OUTPUT.value, arg="--output")
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, {jnp.dtype(dtype).name}")
  records = []
  for tokens, d_ff, d_model in SHAPES[_SHAPES.value]:
    b = run_hadamard_bench(
      tokens=tokens, d_ff=d_ff, d_model=d_model, dtype=dtype, repeats=_REPEATS.value
    )
    ratios = b.ratios()
    print(
      f"{tokens}x{d_ff}->{d_model}: "
      + ", ".join(f"{k} {v:.3f} ms ({ratios[k]:.2f}x)" for k, v in b.ms.items())
      + f"; transform ops/row {b.transform_ops_per_row} = "
      f"{b.transform_ops_per_row / b.down_macs_per_row:.1%} of down's MACs"
    )
    records.append(b.record())
  if _OUTPUT.value:
    write_json_atomic(
      _OUTPUT.value, {"backend": jax.default_backend(), "jax": jax.__version__, "rows": records}
    )


if __name__ == "__main__":
  run(main)
