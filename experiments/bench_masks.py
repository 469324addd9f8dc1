"""Cost of the exact N:M mask in plain XLA, by algorithm, next to the dense dot (any backend).

    python experiments/bench_masks.py --pattern=8:16

For each shape (tokens x K times K x N, bf16 on accelerators) it times: the dense
dot; mask + dot for each algorithm of amber_jax.core.sparsity (pairwise ranks, lax.top_k,
a Batcher sorting network giving the N-th largest score as a threshold); and a
threshold-only lower bound (one compare per entry, not an exact N:M mask). All exact
variants are checked to give the same mask. Prints ms and the ratio to the dense dot.
About a minute on a GPU; use --shapes=small on CPU.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import run
from absl import flags

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import MASK_METHODS, nm_mask, nm_scores

SHAPES = {
  "full": [(8192, 4096, 4096), (8192, 14336, 4096), (2048, 4096, 14336)],
  "small": [(2048, 576, 576), (2048, 1536, 576)],
}
_SHAPES = flags.DEFINE_enum("shapes", "full", sorted(SHAPES), "Shape set.")
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs (median).")


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def main(argv):
  del argv
  pattern = NMPattern.parse(_PATTERN.value)
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats must be >= 1, got {_REPEATS.value}")
  for _, k, _ in SHAPES[_SHAPES.value]:  # the mask groups M consecutive of the K channels
    pattern.check_width(k, where=f"--shapes={_SHAPES.value} K")
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  print(
    f"backend {jax.default_backend()} {jax.devices()}, jax {jax.__version__}, {pattern}, "
    f"{jnp.dtype(dtype).name}"
  )
  for m, k, n in SHAPES[_SHAPES.value]:
    x = jax.random.normal(jax.random.key(0), (m, k), dtype)
    w = jax.random.normal(jax.random.key(1), (k, n), dtype)
    dense = _time(jax.jit(lambda x, w: x @ w), x, w, repeats=_REPEATS.value)
    masks = {}
    line = [f"{m}x{k}x{n}: dense {dense:.3f} ms"]
    for method in MASK_METHODS:

      def masked_dot(x, w, method=method):
        keep = nm_mask(nm_scores(x), pattern, method=method)
        return jnp.where(keep, x, jnp.zeros((), x.dtype)) @ w

      ms = _time(jax.jit(masked_dot), x, w, repeats=_REPEATS.value)
      masks[method] = np.asarray(
        jax.jit(lambda x, method=method: nm_mask(nm_scores(x), pattern, method=method))(x)
      )
      line.append(f"{method} {ms:.3f} ms ({ms / dense:.2f}x)")

    def threshold_only(x, w):
      s = nm_scores(x).reshape(x.shape[0], x.shape[1] // pattern.m, pattern.m)
      keep = (s > jnp.mean(s, axis=-1, keepdims=True)).reshape(x.shape)
      return jnp.where(keep, x, jnp.zeros((), x.dtype)) @ w

    ms = _time(jax.jit(threshold_only), x, w, repeats=_REPEATS.value)
    line.append(f"threshold-only bound {ms:.3f} ms ({ms / dense:.2f}x)")
    ref = masks[MASK_METHODS[0]]
    agree = all(np.array_equal(ref, v) for v in masks.values())
    print("  ".join(line) + f"  masks identical: {agree}")


if __name__ == "__main__":
  run(main)
