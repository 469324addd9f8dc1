"""The notebooks of colab/, executed top to bottom on tiny settings (nbformat + nbclient).

Each notebook has a code cell tagged ``parameters``; the test inserts a cell after it that
overrides those values (papermill style), runs every cell in a fresh IPython kernel of this
Python (``sys.executable``, with the checkout on ``PYTHONPATH``), and reads back the JSON that
the cell tagged ``summary`` prints: every notebook asserts its own checks in a late cell, and
the test checks the values it reports. The real-model notebooks get the model cache of the
``cache_dir`` fixture. About 2 minutes for all four on two CPU cores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
KERNEL_NAME = "amber-jax-pytest"
CELL_TIMEOUT_S = 600

# Tiny settings for CI: (overrides, needs the real model).
NOTEBOOKS = {
  "quickstart.ipynb": (
    dict(SEQ_LEN=128, NUM_WINDOWS=2, CALIB_WINDOWS=2, BATCH_SIZE=2, SHOW_PROGRESS=False),
    True,
  ),
  "outstanding_sparse.ipynb": (
    dict(SEQ_LEN=128, NUM_WINDOWS=2, CALIB_WINDOWS=2, BATCH_SIZE=2, SHOW_PROGRESS=False),
    True,
  ),
  "own_flax_model.ipynb": (dict(TOKENS=32, D_IN=256, D_HIDDEN=512, D_OUT=128), False),
  "kernels.ipynb": (dict(SHAPE=(64, 1024, 256)), False),
}


def test_every_notebook_is_covered():
  assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_committed_clean(name):
  """No outputs committed, and the cells the test and Colab users rely on are there."""
  nb = nbformat.read(COLAB / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert not cell.outputs and cell.execution_count is None, f"{name}: clear the outputs"
  assert "REPO_URL" in code[0].source and "install" in code[0].metadata.get("tags", [])
  for tag in ("parameters", "summary"):
    assert sum(tag in c.metadata.get("tags", []) for c in code) == 1, f"{name}: one {tag} cell"
  params = _parameters_cell(nb)
  for key in NOTEBOOKS[name][0]:
    assert f"{key} = " in params.source, f"{name}: the parameters cell has no {key}"


def _parameters_cell(nb):
  return next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def _inject(nb, overrides: dict) -> None:
  index = nb.cells.index(_parameters_cell(nb))
  source = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(
    f"{k} = {v!r}" for k, v in overrides.items()
  )
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)


def _summary(nb) -> dict:
  cell = next(c for c in nb.cells if "summary" in c.metadata.get("tags", []))
  text = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
  return json.loads(text)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
  """A kernelspec that runs this Python, whatever kernels the machine has registered."""
  root = tmp_path_factory.mktemp("kernels")
  spec = root / KERNEL_NAME
  spec.mkdir()
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(
    json.dumps({"argv": argv, "display_name": "amber_jax tests", "language": "python"})
  )
  return root


def _execute(name: str, overrides: dict, kernel_dir: Path) -> tuple[dict, object]:
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  nb = nbformat.read(COLAB / name, as_version=4)
  _inject(nb, overrides)
  km = AsyncKernelManager(
    kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
  )
  client = nbclient.NotebookClient(
    nb,
    km=km,
    kernel_name=KERNEL_NAME,
    timeout=CELL_TIMEOUT_S,
    startup_timeout=120,
    resources={"metadata": {"path": str(COLAB)}},  # the kernel's working directory
  )
  # The kernel imports amber_jax from this checkout (CI has it installed as well).
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env.setdefault("MPLBACKEND", "agg")
  client.execute(env=env, cleanup_kc=True)  # shut the kernel down: we made its manager
  return _summary(nb), nb


@pytest.mark.slow
@pytest.mark.real_model
def test_quickstart(kernel_dir, cache_dir):
  overrides, _ = NOTEBOOKS["quickstart.ipynb"]
  s, _ = _execute("quickstart.ipynb", {**overrides, "CACHE_DIR": str(cache_dir)}, kernel_dir)
  print(f"quickstart: {s}")
  assert s["tokens"] == 2 * 128 and not s["reference_checked"]
  # The first 2 windows of 128 tokens of lee_background (the 8 x 512 value is 33.31).
  assert s["dense"] == pytest.approx(44.05, abs=0.05)
  assert s["dense"] < s["amber"] < s["naive"]
  assert s["amber_coverage"] >= 0.55


@pytest.mark.slow
@pytest.mark.real_model
def test_outstanding_sparse(kernel_dir, cache_dir):
  overrides, _ = NOTEBOOKS["outstanding_sparse.ipynb"]
  s, _ = _execute(
    "outstanding_sparse.ipynb", {**overrides, "CACHE_DIR": str(cache_dir)}, kernel_dir
  )
  print(f"outstanding_sparse: {s}")
  ppl = s["perplexity"]
  assert ppl["dense"] == pytest.approx(44.05, abs=0.05)
  assert ppl["w8a8 smoothquant"] != ppl["dense"]
  assert ppl["w8a8 smoothquant"] == pytest.approx(ppl["dense"], rel=0.05)
  assert ppl["w8a8 outstanding"] < 1.10 * ppl["dense"]
  for order in ("sparsify first", "quantize first"):
    assert ppl["amber"] < ppl[f"outstanding-sparse {order}"] < 1.15 * ppl["amber"]
  assert s["restored_equal"] and s["restored_perplexity"] == ppl[s["saved"]]
  assert s["checkpoint_vs_fp32_linear"] <= 0.27


@pytest.mark.slow
def test_own_flax_model(kernel_dir):
  s, _ = _execute("own_flax_model.ipynb", NOTEBOOKS["own_flax_model.ipynb"][0], kernel_dir)
  print(f"own_flax_model: {s}")
  assert s["exact_n"] and s["density"] == 0.5
  assert s["linen_max_err_vs_manual"] < 1e-4 and s["nnx_max_err_vs_manual"] < 1e-4
  assert s["pattern_none_equals_dense"]
  assert s["linen_rel_err_vs_dense"] > 1e-3  # sparsity really happened


@pytest.mark.slow
def test_kernels(kernel_dir):
  s, _ = _execute("kernels.ipynb", NOTEBOOKS["kernels.ipynb"][0], kernel_dir)
  print(f"kernels: {s}")
  assert s["exact_n"] and s["mask_pass_equals_sparsify"]
  assert all(s["within_tolerance"].values())
  err = s["max_err"]
  expected = {f"nm_matmul {d}" for d in ("float32", "bfloat16", "float32 factors")}
  expected |= {"nm_matmul_two_pass", "int8_matmul", "nm_int8_matmul"}
  if s["interpret"]:  # the Mosaic GPU int8 kernel runs in the GPU interpreter on CPU
    expected.add("int8_matmul mosaic_gpu")
  assert expected <= set(err)
  if s["interpret"]:  # CPU: the interpreter sums in the reference's order
    assert err["nm_matmul float32"] < 1e-5 and err["nm_matmul float32 factors"] < 1e-5
    assert err["int8_matmul"] == 0 and err["nm_int8_matmul"] == 0
    assert err["int8_matmul mosaic_gpu"] == 0
    assert s["timing_ms"] is None
  else:
    assert s["timing_ms"] and "pallas nm_matmul" in s["timing_ms"]
