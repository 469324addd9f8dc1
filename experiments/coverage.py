"""Coverage of a policy on a model's configuration: no weights needed.

    python experiments/coverage.py --model=qwen3-30b-a3b --policy=paper --skip_layers=41,46,47
    python experiments/coverage.py --model=path/to/config.json --skip_layers=19,21,28,30,31

``--model`` is a preset (amber_jax.model.presets), an HF ``config.json``, an HF directory, a
GGUF file or a known model name. Prints the share of per-token linear multiply-adds whose
input is sparsified (LM head and router excluded; an MoE layer counts the experts a token
uses) and the share removed at ``--pattern``; ``--output`` writes them as JSON (``coverage``
is a fraction). Takes a second.
"""

from __future__ import annotations

import dataclasses

from _common import define_options, run
from absl import flags

from amber_jax.calibrate.policy import parse_layer_list
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.io.sources import read_model_config
from amber_jax.runs.coverage import STATIC_POLICIES, coverage_report, format_coverage

OPTS = define_options(
  "model",
  "cache_dir",
  "output",
  model=(
    "smollm2-135m",
    "A preset (llama-3.1-8b, qwen2-7b, qwen3-8b, qwen3-30b-a3b, ...), an HF config.json or "
    "directory, a .gguf file or a known model name.",
  ),
)
_POLICY = flags.DEFINE_enum("policy", "paper", list(STATIC_POLICIES), "Site policy.")
_SKIP = flags.DEFINE_string(
  "skip_layers", "", "Layers whose skippable sites (q, gate) stay dense, e.g. 41,46,47."
)
_PATTERN = flags.DEFINE_string("pattern", "8:16", "N:M pattern (for the removed share).")


def main(argv):
  del argv
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  config = read_model_config(OPTS.model, OPTS.cache_dir)
  report = coverage_report(
    config,
    model=OPTS.model,
    policy=_POLICY.value,
    skip_layers=parse_layer_list(_SKIP.value),
    pattern=_PATTERN.value,
  )
  print(format_coverage(report))
  if OPTS.output:
    write_json_atomic(OPTS.output, dataclasses.asdict(report))


if __name__ == "__main__":
  run(main)
