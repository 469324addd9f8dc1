"""The online Hadamard of down's input (``LlamaConfig.mlp_hidden_hadamard``): what it costs next to
the down projection it feeds, measured side by side in one run.

Timed per call, interleaved (``time_interleaved``), on the same [tokens, d_ff] input:

* ``down``: the dense down product x @ W [d_ff, d_model];
* ``hadamard``: ``hadamard_transform`` (the Paley factor as a p x p product, then log2 of the
  power-of-two factor butterfly stages);
* ``hadamard_dense``: the same transform as a dense d_ff x d_ff product (the reference; what a
  rotation costs without a fast algorithm);
* ``hadamard_down``: the transform followed by down (what the rotated model runs).

The floor: the fast transform's adds per row, d_ff * (p + log2(2^k)), against down's d_ff *
d_model multiply-adds; and the bytes it moves (read and write x once per butterfly stage in
this XLA form; a fused kernel would read and write it once).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.bench.prefill_bench import time_interleaved
from amber_jax.core.hadamard import hadamard_factors, hadamard_matrix, hadamard_transform


@dataclasses.dataclass(frozen=True)
class HadamardBench:
  """Median milliseconds per call of each variant, and the operation counts."""

  tokens: int
  d_ff: int
  d_model: int
  dtype: str
  ms: dict[str, float]
  transform_ops_per_row: int  # adds (and the Paley factor's multiply-adds)
  down_macs_per_row: int

  def ratios(self) -> dict[str, float]:
    """Each variant's time over down's alone."""
    return {k: v / self.ms["down"] for k, v in self.ms.items()}

  def record(self) -> dict:
    return {**dataclasses.asdict(self), "ratio_to_down": self.ratios()}


def run_hadamard_bench(
  *, tokens: int, d_ff: int, d_model: int, dtype=jnp.float32, repeats: int = 20, seed: int = 0
) -> HadamardBench:
  """Times the variants of the module docstring on random data (ValueError for a d_ff with no
  Hadamard matrix, or non-positive sizes)."""
  if min(tokens, d_ff, d_model, repeats) < 1:
    raise ValueError(
      f"tokens, d_ff, d_model and repeats must be >= 1, got {tokens}, {d_ff}, {d_model}, {repeats}"
    )
  p, two = hadamard_factors(d_ff)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(tokens, d_ff)), dtype)
  w = jnp.asarray(rng.normal(size=(d_ff, d_model)) / math.sqrt(d_ff), dtype)
  h = jnp.asarray(hadamard_matrix(d_ff) / math.sqrt(d_ff), dtype)
  fns = {
    "down": jax.jit(lambda x, w: x @ w),
    "hadamard": jax.jit(hadamard_transform),
    "hadamard_dense": jax.jit(lambda x, h: x @ h),
    "hadamard_down": jax.jit(lambda x, w: hadamard_transform(x) @ w),
  }
  args = {"down": (x, w), "hadamard": (x,), "hadamard_dense": (x, h), "hadamard_down": (x, w)}
  for name, fn in fns.items():  # compile outside the timing
    jax.block_until_ready(fn(*args[name]))
  calls = {n: (lambda n=n: jax.block_until_ready(fns[n](*args[n]))) for n in fns}
  times = time_interleaved(calls, repeats)
  return HadamardBench(
    tokens=tokens,
    d_ff=d_ff,
    d_model=d_model,
    dtype=jnp.dtype(dtype).name,
    ms={n: 1e3 * statistics.median(t) for n, t in times.items()},
    transform_ops_per_row=d_ff * (p + int(math.log2(two))),
    down_macs_per_row=d_ff * d_model,
  )
