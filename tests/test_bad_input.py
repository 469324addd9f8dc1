"""Bad input to the experiments is refused before work starts, as one line.

Each row runs a script as a user would (a subprocess) with one bad argument and checks: exit
status 1; stderr is exactly one line, ``error: ...``, that contains the expected text (the
argument and what is valid); no traceback; no weights were converted or loaded (the param
cache stays empty); nothing was written next to the inputs. Model-dependent checks use the
tiny HF fixture model (2 layers, d_model 64, context 1024), so no download happens.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "tiny-llama"
TINY = f"--model={FIXTURE}"
RESULTS = ROOT / "results"  # the repository's result files (report.py reads, never writes them)

# (script, arguments, text the one-line error must contain). In arguments, {tmp} is the
# test's temporary directory, {text} a readable text file in it, {file} a plain file in it,
# {bad_utf8} a file that is not UTF-8, {plan} a directory that is not a saved plan, {bad_gguf}
# a corrupt GGUF file.
CASES = [
  # prefill.py: numbers out of range
  ("prefill.py", ["--pattern=3:2"], "pattern N must satisfy 1 <= N < M, got 3:2"),
  ("prefill.py", ["--pattern=0:4"], "pattern N must satisfy 1 <= N < M"),
  ("prefill.py", ["--pattern=8"], "pattern must look like 'N:M'"),
  ("prefill.py", ["--seq_len=0"], "seq_len must be >= 1"),
  ("prefill.py", ["--num_windows=0"], "num_windows must be >= 1"),
  ("prefill.py", ["--batch_size=0"], "batch_size must be >= 1"),
  ("prefill.py", ["--calib_windows=-1"], "calib_windows must be >= 0"),
  ("prefill.py", ["--calib_windows=0"], "policy=auto needs calib_windows >= 1"),
  ("prefill.py", ["--gen_prompts=-1"], "gen_prompts must be >= 0"),
  ("prefill.py", ["--coverage=0"], "coverage must be in"),
  ("prefill.py", ["--coverage=1.5"], "coverage must be in"),
  ("prefill.py", ["--coverage=nan"], "coverage must be in"),
  ("prefill.py", ["--quant=w8a8", "--alpha=1.5"], "alpha must be in [0, 1], got 1.5"),
  ("prefill.py", ["--quant=w8a8", "--float_sites_auto=-1"], "float_sites_auto must be >= 0"),
  # unknown names and malformed lists
  ("prefill.py", ["--skip_layers=a,b", "--policy=paper"], "skip_layers must be comma-separated"),
  ("prefill.py", ["--skip_layers=1", "--policy=auto"], "skip_layers cannot be given"),
  ("prefill.py", ["--quant=w8a8", "--float_sites=down"], "--float_sites entries look like"),
  ("prefill.py", ["--quant=w8a8", "--float_sites=foo:3"], "projection must be one of q, k"),
  ("prefill.py", ["--float_sites=down:3"], "only apply with quant=w8a8"),
  ("prefill.py", ["--method=magic"], "unknown method 'magic'; valid: dense, naive, naive_rules"),
  ("prefill.py", ["--method=search", "--policy=auto"], "method='search' conflicts with policy="),
  ("prefill.py", ["--method=best", "--o_order=heads"], "conflicts with o_order='heads'"),
  ("prefill.py", ["--smooth=outstanding"], "only apply with quant=w8a8"),
  ("prefill.py", ["--policy=paper", "--coverage=0.6"], "coverage only applies with policy auto"),
  ("prefill.py", ["--policy=search", "--granularity=site"], "granularity only applies with"),
  ("prefill.py", ["--model=no-such-model"], "neither a known name"),
  ("prefill.py", ["--model={file}"], "a model file must be a .gguf file"),
  ("prefill.py", ["--model={bad_gguf}"], "(corrupt or truncated?)"),
  # model-dependent checks, before the weights load
  ("prefill.py", [TINY, "--seq_len=5000"], "seq_len must be in 1..1024 (the model's context)"),
  ("prefill.py", [TINY, "--pattern=8:24"], "M=24 must divide"),
  ("prefill.py", [TINY, "--policy=paper", "--skip_layers=7"], "skip layer 7 is out of range"),
  ("prefill.py", [TINY, "--coverage=0.9"], "coverage target 0.900 is unreachable"),
  ("prefill.py", [TINY, "--quant=w8a8", "--float_sites=down:5"], "valid layers 0..1"),
  # unreadable text
  ("prefill.py", [TINY, "--text_file={tmp}/missing.txt"], "does not exist (known texts:"),
  ("prefill.py", [TINY, "--text_file={tmp}"], "is a directory"),
  ("prefill.py", [TINY, "--text_file={bad_utf8}"], "is not valid UTF-8"),
  ("prefill.py", [TINY, "--text_file={text}"], "text too short"),
  # corrupt plan files
  ("prefill.py", [TINY, "--load_plan={tmp}/no-plan"], "no-plan does not exist"),
  ("prefill.py", [TINY, "--load_plan={plan}"], "has no plan_meta.json"),
  ("prefill.py", [TINY, "--load_plan={plan}", "--score=weight"], "load_plan restores"),
  # output paths that cannot be written
  ("prefill.py", ["--output={tmp}"], "is a directory; give a file path"),
  ("prefill.py", ["--output={file}/out.json"], "is a file"),
  ("prefill.py", ["--save_plan={plan}"], "exists and is a directory that is not one"),
  ("prefill.py", ["--save_plan={file}"], "exists and is a file"),
  ("prefill.py", ["--cache_dir={file}"], "is not a directory"),
  # zero_shot.py
  ("zero_shot.py", ["--output={tmp}/z.json", "--tasks=nope"], "task 'nope' is neither a packaged"),
  (
    "zero_shot.py",
    ["--output={tmp}/z.json", "--patterns=dense", "--coverage=0.6"],
    "--coverage only applies to amber rows",
  ),
  (
    "zero_shot.py",
    ["--output={tmp}/z.json", "--tasks=navigate", "--num_fewshot=99999"],
    "num_fewshot=99999 needs more than",
  ),
  (
    "zero_shot.py",
    ["--output={tmp}/z.json", "--text_file={tmp}/missing.txt"],
    "missing.txt' does not exist (known texts:",
  ),
  ("zero_shot.py", [TINY, "--output={tmp}/z.json", "--patterns=8:24"], "M=24 must divide"),
  ("zero_shot.py", ["--output={tmp}"], "output: '"),
  ("zero_shot.py", ["--output={file}"], "is corrupt"),
  ("zero_shot.py", ["--output={tmp}/z.json", "--results={bad_utf8}"], "--results: '"),
  ("zero_shot.py", ["--output={tmp}/z.json", "--report"], "--report needs an existing --output"),
  # generation.py
  ("generation.py", ["--output={tmp}/g.json", "--max_new_tokens=0"], "max_new_tokens must be >= 1"),
  (
    "generation.py",
    [TINY, "--output={tmp}/g.json", "--max_new_tokens=1000"],
    "exceeds the model's context of 1024 positions",
  ),
  ("generation.py", ["--output={tmp}/g.json", "--tasks={file}"], "not a readable JSON task file"),
  (
    "generation.py",
    ["--output={tmp}/g.json", "--patterns=dense", "--coverage=0.5"],
    "--coverage only applies to amber rows",
  ),
  ("generation.py", ["--output={tmp}/g.json", "--results={tmp}"], "--results: '"),
  # front.py
  ("front.py", ["--coverages=0.5,abc"], "--coverages must be a comma list of numbers, got 'abc'"),
  ("front.py", ["--methods=search+learned", "--coverages=0.4"], "goal_coverage=0.55 only"),
  ("front.py", ["--methods=naive"], "has no coverage target"),
  ("front.py", ["--text_file={bad_utf8}"], "latin1.txt' is not valid UTF-8"),
  ("front.py", [TINY, "--patterns=8:24"], "M=24 must divide"),
  ("front.py", ["--plot={file}/front.png"], "--plot: cannot write"),
  ("front.py", ["--from_json={file}"], "--from_json: '"),
  # sensitivity.py
  ("sensitivity.py", ["--pattern=dense"], "pattern must look like 'N:M'"),
  ("sensitivity.py", ["--calib_windows=0"], "calib_windows must be >= 1"),
  ("sensitivity.py", [TINY, "--seq_len=2000"], "seq_len must be in 1..1024"),
  ("sensitivity.py", [TINY, "--coverage=0.9"], "coverage target 0.900 is unreachable"),
  ("sensitivity.py", ["--heatmap={tmp}"], "--heatmap: '"),
  # amber_table.py
  ("amber_table.py", ["--patterns="], "patterns must name at least one entry"),
  ("amber_table.py", [TINY, "--patterns=8:24"], "M=24 must divide"),
  ("amber_table.py", [TINY, "--coverage=0.9"], "coverage target 0.900 is unreachable"),
  ("amber_table.py", ["--results={file}/R.md"], "--results: cannot write"),
  ("amber_table.py", ["--output={tmp}"], "--output: '"),
  # quant_table.py
  ("quant_table.py", ["--patterns=dense"], "pattern must look like 'N:M'"),
  ("quant_table.py", ["--num_windows=0"], "num_windows must be >= 1"),
  ("quant_table.py", [TINY, "--patterns=8:15"], "M=15 must divide"),
  ("quant_table.py", ["--results={tmp}"], "--results: '"),
  ("quant_table.py", ["--output={file}/q.json"], "--output: cannot write"),
  # corrections.py
  ("corrections.py", ["--calib_windows=0"], "calib_windows must be >= 1"),
  ("corrections.py", ["--corrections="], "corrections must name at least one entry"),
  ("corrections.py", ["--text_file={tmp}"], "text_file '"),
  ("corrections.py", [TINY, "--patterns=4:24"], "M=24 must divide"),
  ("corrections.py", ["--from_json={tmp}/missing.json"], "--from_json: '"),
  # learn_factors.py
  ("learn_factors.py", ["--learning_rate=-1"], "--learning_rate must be a finite number > 0"),
  ("learn_factors.py", ["--calib_windows=-1"], "--calib_windows must be >= 1"),
  ("learn_factors.py", ["--other_text={tmp}/missing.txt"], "--other_text '"),
  ("learn_factors.py", [TINY, "--other_text={text}"], "text too short"),
  ("learn_factors.py", [TINY, "--coverage=0.9"], "coverage target 0.900 is unreachable"),
  ("learn_factors.py", ["--save_plan={plan}"], "--save_plan: '"),
  # report.py (outputs in the test's directory, so a row that passed would write there)
  (
    "report.py",
    ["--zero_shot={tmp}", "--results={tmp}/R.md", "--plots_dir={tmp}/p"],
    "--zero_shot=",
  ),
  (
    "report.py",
    ["--front={tmp}/none.json", "--results={tmp}/R.md", "--plots_dir={tmp}/p"],
    "none.json does not exist",
  ),
  (
    "report.py",
    [f"--amber_table={RESULTS}/front.json", "--results={tmp}/R.md", "--plots_dir={tmp}/p"],
    "is not a complete amber_table results file",
  ),
  ("report.py", ["--results={bad_utf8}", "--plots_dir={tmp}/p"], "--results: '"),
  ("report.py", ["--results={tmp}/R.md", "--plots_dir={file}"], "--plots_dir: '"),
  # bench_eval.py
  ("bench_eval.py", ["--repeats=0"], "--repeats must be >= 1"),
  ("bench_eval.py", ["--tasks=navigate,nope"], "--tasks: unknown BIG-bench task 'nope'"),
  ("bench_eval.py", ["--model={bad_gguf}"], "(corrupt or truncated?)"),
  # bench_kernels.py, bench_masks.py
  ("bench_kernels.py", ["--calls_per_sample=0"], "--calls_per_sample must be >= 1"),
  ("bench_kernels.py", ["--peak_tbps=0"], "--peak_tbps must be a finite number > 0"),
  ("bench_kernels.py", ["--shapes=small", "--pattern=8:20"], "M=20 must divide the --shapes"),
  ("bench_kernels.py", ["--output={tmp}"], "--output: '"),
  ("bench_masks.py", ["--repeats=0"], "--repeats must be >= 1"),
  ("bench_masks.py", ["--shapes=small", "--pattern=3:5"], "M=5 must divide the --shapes=small K"),
  # bench_prefill.py
  ("bench_prefill.py", ["--torch_threads=0"], "--torch_threads must be >= 1"),
  ("bench_prefill.py", ["--impls=pallas"], "--impls applies only with --random_init"),
  ("bench_prefill.py", [TINY, "--seq_lens=2048"], "seq_lens must be <= 1024"),
  (
    "bench_prefill.py",
    ["--random_init=smollm2-135m", "--pattern=dense"],
    "pattern must be N:M with a random preset",
  ),
  ("bench_prefill.py", ["--random_init=smollm2-135m", "--impls=fast"], "impls entry 'fast'"),
  # bench_sharding.py
  ("bench_sharding.py", ["--meshes=2by4"], "--meshes entries must be DATAxMODEL"),
  ("bench_sharding.py", ["--batch=6", "--meshes=4x2"], "--batch=6 must be divisible"),
  ("bench_sharding.py", ["--plans=dense,sparse"], "--plans entry 'sparse' is not dense, w8a8"),
  ("bench_sharding.py", ["--random_init=tiny", "--plans=8:15"], "M=15 must divide"),
  ("bench_sharding.py", [TINY, "--meshes=1x8"], "--meshes entry 1x8: model=8"),
  # error_floor.py
  ("error_floor.py", ["--sites=q15"], "--sites entries must be projection:layer"),
  ("error_floor.py", ["--ranks=16,-4"], "--ranks entries must be >= 1, got -4"),
  ("error_floor.py", ["--tokens=600"], "--tokens must be in 1..512"),
  ("error_floor.py", [TINY, "--sites=q:5"], "--sites entry q:5: layer must be in 0..1"),
  ("error_floor.py", [TINY, "--sites=q:1", "--ranks=100"], "--ranks [100] exceed the q site's"),
]


def _ids(case):
  script, args, _ = case
  return f"{script} " + " ".join(a.replace(TINY, "tiny") for a in args)


def _uses_cache_dir(script: str) -> bool:
  return '"cache_dir"' in (ROOT / "experiments" / script).read_text(encoding="utf-8")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_clear_line_before_any_work(case, tmp_path):
  script, args, match = case
  (tmp_path / "short.txt").write_text("Only a few words here.", encoding="utf-8")
  (tmp_path / "file").write_text("not a directory", encoding="utf-8")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 100)
  (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
  (tmp_path / "not-a-plan").mkdir()
  (tmp_path / "not-a-plan" / "keep.txt").write_text("a user's file", encoding="utf-8")
  before = sorted(tmp_path.rglob("*"))
  values = dict(
    tmp=tmp_path,
    text=tmp_path / "short.txt",
    file=tmp_path / "file",
    bad_utf8=tmp_path / "latin1.txt",
    plan=tmp_path / "not-a-plan",
    bad_gguf=tmp_path / "bad.gguf",
  )
  argv = [a.format(**values) for a in args]
  cache = tmp_path / "cache"
  if _uses_cache_dir(script) and not any(a.startswith("--cache_dir=") for a in argv):
    argv.append(f"--cache_dir={cache}")
  proc = subprocess.run(
    [sys.executable, str(ROOT / "experiments" / script), *argv],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=tmp_path,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert match in lines[0], lines[0]
  assert not (cache / "params").exists(), "weights were converted before the error"
  after = sorted(p for p in tmp_path.rglob("*") if cache not in (p, *p.parents))
  assert after == before, "something was written"
  assert (tmp_path / "not-a-plan" / "keep.txt").is_file()
