"""How much of an N:M site's output error any mask or cheap compensation could remove.

    python experiments/error_floor.py --pattern=8:16

For a few sites (projection:layer) of the default model, on calibration tokens of the default text
(dense model inputs), prints the relative output error energy ||(x - S(x)) W||^2 / ||x W||^2:

* ``robust``: the robust score's mask (what the library does);
* ``mixed``: the robust score's mask with the groups formed over a random channel order
  (``amber_jax.plan.channel_order.mixed_order``, as ``o_order="mixed"`` uses for o), as a share of
  the robust error: for o the groups then mix attention heads;
* ``gram``: per group of M, a greedy mask that minimises the group's own output error using the
  Gram matrix of W's rows (x_D^T (W W^T)_DD x_D for the dropped set D): the best a per-channel
  score could hope for inside a group;
* ``rank r``: what is left after the best rank-r compensation of the dropped part, y += x_d A B
  with A B fitted to E[x_d^T x_d] (data-aware SVD) on one calibration window and measured on
  another, as a share of the robust error; it costs r * (d_in + d_out) extra multiply-adds per
  token (given as a share of the site's).

RESULTS.md ("front-notes") uses its numbers to explain why the issue-8 goals are out of reach at
coverage 0.55. About 2 minutes on 2 CPU cores (the Gram greedy is plain numpy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _common import CACHE_DIR_DEFAULT, default_cache_dir, run
from absl import flags

from amber_jax.calibrate.harness import record_only, site_records
from amber_jax.core.patterns import NMPattern
from amber_jax.core.scores import model_factors
from amber_jax.core.sparsity import sparsify
from amber_jax.data.texts import DEFAULT_TEXT
from amber_jax.io.sources import DEFAULT_MODEL
from amber_jax.plan.channel_order import mixed_order
from amber_jax.runs.checks import parse_ints
from amber_jax.runs.common import check_cache_dir, prepare_eval
from amber_jax.runs.markdown import markdown_table

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "Known model name, .gguf file or HF dir.")
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern.")
_SITES = flags.DEFINE_list(
  "sites",
  ["q:15", "o:3", "o:15", "o:25", "gate:3", "gate:15", "gate:25", "down:15", "down:25"],
  "projection:layer.",
)
_RANKS = flags.DEFINE_list("ranks", ["16", "32", "64", "128"], "Compensation ranks.")
_TOKENS = flags.DEFINE_integer(
  "tokens", 512, "Tokens per window: compensation fitted on one, all measured on another."
)
_GRAM_TOKENS = flags.DEFINE_integer("gram_tokens", 64, "Tokens for the (slow) Gram-greedy mask.")
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir",
  None,
  f"Cache directory (default: {CACHE_DIR_DEFAULT}).",
)


SEQ_LEN = 512  # tokens per calibration window


def _parse_site(spec: str) -> tuple[str, int]:
  proj, _, layer = spec.strip().partition(":")
  if not proj or not layer.isdigit():
    raise ValueError(f"--sites entries must be projection:layer, got {spec!r}")
  return proj, int(layer)


def _check_for_model(config, pattern: NMPattern, sites, ranks) -> None:
  """Before the weights load: the sites' layers exist, M divides their widths, and each rank
  is below the site's smaller dimension."""
  shapes = config.linear_shapes()
  for proj, layer in sites:
    config.sites.check_name(proj, where=f"--sites entry {proj}:{layer}: projection")
    if not 0 <= layer < config.n_layers:
      raise ValueError(
        f"--sites entry {proj}:{layer}: layer must be in 0..{config.n_layers - 1} "
        f"(the model has {config.n_layers} layers)"
      )
    d_in, d_out = shapes[proj]
    pattern.check_width(d_in, where=f"{proj}-projection input")
    too_big = [r for r in ranks if r > min(d_in, d_out)]
    if too_big:
      raise ValueError(
        f"--ranks {too_big} exceed the {proj} site's rank limit {min(d_in, d_out)} "
        f"(min of its {d_in} x {d_out} weight)"
      )


def gram_greedy_mask(x_TxD: np.ndarray, w_DxO: np.ndarray, pattern: NMPattern) -> np.ndarray:
  """Per token and group, drops M - N channels one at a time, each time the one that adds the
  least to the group's output error energy x_D^T (W W^T)_DD x_D. Returns the 0/1 keep mask."""
  gram = w_DxO @ w_DxO.T
  keep = np.ones_like(x_TxD)
  drop_count = pattern.m - pattern.n
  for t, x in enumerate(x_TxD):
    for start in range(0, x.shape[0], pattern.m):
      idx = np.arange(start, start + pattern.m)
      g = gram[np.ix_(idx, idx)] * np.outer(x[idx], x[idx])
      dropped: list[int] = []
      for _ in range(drop_count):
        rest = [j for j in range(pattern.m) if j not in dropped]
        cost = [g[np.ix_(dropped + [j], dropped + [j])].sum() for j in rest]
        dropped.append(rest[int(np.argmin(cost))])
      keep[t, idx[dropped]] = 0
  return keep


def main(argv):
  del argv
  pattern = NMPattern.parse(_PATTERN.value)
  sites = [_parse_site(s) for s in _SITES.value if s.strip()]
  if not sites:
    raise ValueError("--sites must name at least one projection:layer site")
  ranks = list(parse_ints(_RANKS.value, arg="--ranks", minimum=1))
  if not 1 <= _TOKENS.value <= SEQ_LEN:
    raise ValueError(
      f"--tokens must be in 1..{SEQ_LEN} (a calibration window), got {_TOKENS.value}"
    )
  if not 1 <= _GRAM_TOKENS.value <= _TOKENS.value:
    raise ValueError(
      f"--gram_tokens must be in 1..{_TOKENS.value} (--tokens), got {_GRAM_TOKENS.value}"
    )
  cache_dir = _CACHE_DIR.value or default_cache_dir()
  check_cache_dir(cache_dir)
  setup = prepare_eval(
    model=_MODEL.value,
    text=DEFAULT_TEXT,
    cache_dir=cache_dir,
    seq_len=SEQ_LEN,
    num_windows=8,
    calib_windows=2,
    dtype="float32",
    validate=lambda config: _check_for_model(config, pattern, sites, ranks),
  )
  config, params = setup.config, setup.params
  factors = {p: jnp.asarray(v) for p, v in model_factors(params, "robust").items()}
  record = jax.jit(
    lambda p, t: site_records(p, t, config=config, hook=record_only(lambda x, w, row: x))
  )
  fit_inputs, test_inputs = (
    record(params, jnp.asarray(setup.calib_windows[i : i + 1, : _TOKENS.value])) for i in (0, 1)
  )

  def site_inputs(inputs, proj, layer):
    return np.asarray(inputs[proj][layer], np.float64).reshape(-1, inputs[proj].shape[-1])

  def dropped_part(x, proj, layer, order=None):
    kept = sparsify(jnp.asarray(x, jnp.float32), pattern, factors[proj][layer], channel_order=order)
    return x - np.asarray(kept)

  rows = []
  for proj, layer in sites:
    w = np.asarray(params["layers"][proj]["w"][layer], np.float64)
    x = site_inputs(test_inputs, proj, layer)
    x_d = dropped_part(x, proj, layer)
    robust_err = np.sum((x_d @ w) ** 2)
    robust = robust_err / np.sum((x @ w) ** 2)
    order = jnp.asarray(mixed_order(config.n_layers, x.shape[1])[layer])
    mixed_ratio = np.sum((dropped_part(x, proj, layer, order) @ w) ** 2) / robust_err
    sub = x[: _GRAM_TOKENS.value]
    gram_dropped = sub * (1 - gram_greedy_mask(sub, w, pattern))
    gram_ratio = np.sum((gram_dropped @ w) ** 2) / np.sum((dropped_part(sub, proj, layer) @ w) ** 2)
    # Data-aware low rank: whiten by the fit window's dropped-part covariance C = L L^T, keep the
    # top-r left singular vectors P_r of L^T W, compensate with W_r = L^-T P_r P_r^T L^T W.
    fit_d = dropped_part(site_inputs(fit_inputs, proj, layer), proj, layer)
    cov = fit_d.T @ fit_d / len(fit_d)
    evals, evecs = np.linalg.eigh(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    root = evecs * np.sqrt(evals)  # L
    inv_root_t = evecs / np.sqrt(evals)  # L^-T
    p_mat = np.linalg.svd(root.T @ w, full_matrices=False)[0]
    left = []
    for r in ranks:
      w_r = inv_root_t @ (p_mat[:, :r] @ (p_mat[:, :r].T @ (root.T @ w)))
      left.append(np.sum((x_d @ (w - w_r)) ** 2) / robust_err)
    extra = [r * sum(w.shape) / w.size for r in ranks]
    rows.append(
      [
        f"{proj}:{layer}",
        f"{robust:.4f}",
        f"{mixed_ratio:.3f}",
        f"{gram_ratio:.3f}",
        *[f"{lf:.2f} (+{e:.0%})" for lf, e in zip(left, extra, strict=True)],
      ]
    )
  print(
    f"{pattern}, {_TOKENS.value} held-out tokens: robust = relative output error energy of the "
    "robust mask; mixed = error with the groups over a random channel order / robust error; "
    f"gram = Gram-greedy error / robust error (first {_GRAM_TOKENS.value} tokens); "
    "rank r = error left after rank-r compensation fitted on another window / robust error "
    "(+ extra multiply-adds of the site)."
  )
  print(markdown_table(["site", "robust", "mixed", "gram", *[f"rank {r}" for r in ranks]], rows))


if __name__ == "__main__":
  run(main)
