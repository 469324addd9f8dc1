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

from _common import define_options, run
from absl import flags

from amber_jax.core.patterns import NMPattern
from amber_jax.runs.checks import parse_ints
from amber_jax.runs.error_floor import (
  DEFAULT_SITES,
  SEQ_LEN,
  ErrorFloorConfig,
  error_floor_markdown,
  parse_site,
  run_error_floor,
)

OPTS = define_options("model", "cache_dir")
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern.")
_SITES = flags.DEFINE_list("sites", list(DEFAULT_SITES), "projection:layer.")
_RANKS = flags.DEFINE_list("ranks", ["16", "32", "64", "128"], "Compensation ranks.")
_TOKENS = flags.DEFINE_integer(
  "tokens", 512, "Tokens per window: compensation fitted on one, all measured on another."
)
_GRAM_TOKENS = flags.DEFINE_integer("gram_tokens", 64, "Tokens for the (slow) Gram-greedy mask.")


def main(argv):
  del argv
  NMPattern.parse(_PATTERN.value)
  sites = tuple(parse_site(s) for s in _SITES.value if s.strip())
  if not sites:
    raise ValueError("--sites must name at least one projection:layer site")
  ranks = parse_ints(_RANKS.value, arg="--ranks", minimum=1)
  if not 1 <= _TOKENS.value <= SEQ_LEN:
    raise ValueError(
      f"--tokens must be in 1..{SEQ_LEN} (a calibration window), got {_TOKENS.value}"
    )
  if not 1 <= _GRAM_TOKENS.value <= _TOKENS.value:
    raise ValueError(
      f"--gram_tokens must be in 1..{_TOKENS.value} (--tokens), got {_GRAM_TOKENS.value}"
    )
  cfg = ErrorFloorConfig(
    **OPTS.fields(ErrorFloorConfig),
    pattern=_PATTERN.value,
    sites=sites,
    ranks=ranks,
    tokens=_TOKENS.value,
    gram_tokens=_GRAM_TOKENS.value,
  )
  print(error_floor_markdown(cfg, run_error_floor(cfg)))


if __name__ == "__main__":
  run(main)
