"""Result JSON files -> RESULTS.md tables and PNG plots, in one command.

    python experiments/report.py

renders, from the files in results/ (each optional: a missing default file is skipped, a
missing file given explicitly is an error):

* results/zero_shot_dense_full.json -> "Dense accuracy on every task" (acc, acc_norm ± stderr);
* results/zero_shot.json -> the paper-style zero-shot table and results/plots/accuracy_change.png;
* results/generation.json -> the generation table (exact match, agreement with dense);
* results/amber_table.json -> the score x policy x pattern perplexity table and
  results/plots/perplexity_vs_pattern.png;
* results/sensitivity.json -> results/plots/sensitivity_heatmap.png;
* results/front.json -> the coverage-quality front and ablation, results/plots/coverage_front.png
  and results/plots/learning_curves.png (KL per step of the learned rows).

The JSON files come from experiments/zero_shot.py, generation.py, amber_table.py --output,
sensitivity.py --output and front.py --output. Nothing is evaluated here; it takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

from _common import run
from absl import flags

from amber_jax.runs.report import check_report_outputs, write_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {
  "dense_full": "results/zero_shot_dense_full.json",
  "zero_shot": "results/zero_shot.json",
  "generation": "results/generation.json",
  "amber_table": "results/amber_table.json",
  "sensitivity": "results/sensitivity.json",
  "front": "results/front.json",
}
_FILES = {
  name: flags.DEFINE_string(name, None, f"Results JSON (default {path}, skipped if absent).")
  for name, path in DEFAULTS.items()
}
_RESULTS = flags.DEFINE_string(
  "results", None, "Markdown file to update (default: the repository's RESULTS.md; '' to print)."
)
_PLOTS = flags.DEFINE_string(
  "plots_dir", None, "Where the PNGs go (default: the repository's results/plots; '' for none)."
)


def main(argv):
  del argv
  files = {}
  for name, flag in _FILES.items():
    if flag.value is not None:
      if Path(flag.value).is_dir():
        raise ValueError(f"--{name}={flag.value} is a directory; give a results JSON file")
      if not Path(flag.value).is_file():
        raise ValueError(f"--{name}={flag.value} does not exist")
      files[name] = flag.value
    elif (ROOT / DEFAULTS[name]).is_file():
      files[name] = str(ROOT / DEFAULTS[name])
    else:
      print(f"skipped {name}: {DEFAULTS[name]} does not exist")
  # Outputs default to the repository, like the inputs, whatever the working directory.
  results_md = str(ROOT / "RESULTS.md") if _RESULTS.value is None else _RESULTS.value or None
  plots_dir = str(ROOT / "results" / "plots") if _PLOTS.value is None else _PLOTS.value or None
  check_report_outputs(results_md, plots_dir, args=("--results", "--plots_dir"))
  write_report(**files, results_md=results_md, plots_dir=plots_dir, log=print)


if __name__ == "__main__":
  run(main)
