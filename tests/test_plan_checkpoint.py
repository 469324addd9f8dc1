"""Plan checkpoints: exact round trips, corruption and mismatch errors, atomic saves, size."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_V64_CONFIG

from amber_jax.io.plan_checkpoint import (
  META_NAME,
  PlanCheckpointError,
  checkpoint_bytes,
  leaf_nbytes,
  load_plan,
  read_plan_metadata,
  save_plan,
)
from amber_jax.plan.schema import SparsityPlan, make_plan

# orbax leaves an asyncio callback behind when a restore fails; it is harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

PROJ = ("q", "k", "v", "o", "gate", "up", "down")
META = {
  "model": "tiny-llama",
  "fingerprint": {"path": "model.gguf", "size": 123},
  "config": {"d_model": 32, "n_layers": 3},
  "pattern": "2:4",
  "quant": {"weights": "int8", "activations": "int8", "scale": "per-channel"},
}


def _plan_tree(seed: int = 0, n_layers: int = 3) -> dict:
  """A calibrated-plan-like tree: per-projection entries stacked over layers, mixed dtypes."""
  rng = np.random.default_rng(seed)
  d_in, d_out = 32, 48
  return {
    "weights": {p: rng.integers(-128, 128, (n_layers, d_in, d_out), dtype=np.int8) for p in PROJ},
    "scales": {p: rng.random((n_layers, d_out), dtype=np.float32) for p in PROJ},
    "enabled": {p: rng.random(n_layers) < 0.5 for p in PROJ},
    "factors": {p: rng.standard_normal((n_layers, d_in)).astype(np.float32) for p in PROJ},
    "act_scale": np.float32(rng.random()),
    "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
    "layers": [rng.integers(0, 9, 4, dtype=np.int32), np.arange(3, dtype=np.int64)],
    "unused": np.zeros((0, 4), np.float32),  # orbax cannot store empty arrays; we can.
  }


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  got_l = jax.tree_util.tree_flatten_with_path(got)[0]
  want_l = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, g), (_, w) in zip(got_l, want_l, strict=True):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
    assert np.array_equal(g, w), jax.tree_util.keystr(path)
    # Bit-exact (also for NaNs and signed zeros): compare the bytes.
    assert g.tobytes() == w.tobytes(), jax.tree_util.keystr(path)


def _no_leftovers(parent: pathlib.Path, keep: set[str]):
  assert {p.name for p in parent.iterdir()} == keep


def test_round_trip_is_exact(tmp_path):
  tree = _plan_tree()
  path = tmp_path / "plan"
  save_plan(path, tree, metadata=META)
  got, meta = load_plan(path)
  _assert_trees_equal(got, tree)
  assert got["weights"]["q"].dtype == np.int8 and got["enabled"]["v"].dtype == np.bool_
  assert meta == META and read_plan_metadata(path) == META
  assert (path / META_NAME).is_file()
  _no_leftovers(tmp_path, {"plan"})
  recorded = json.loads((path / META_NAME).read_text())
  q = next(leaf for leaf in recorded["leaves"] if leaf["path"] == "['weights']['q']")
  assert q["dtype"] == "int8" and q["shape"] == [3, 32, 48] and len(q["sha256"]) == 64
  assert leaf_nbytes(path)["['weights']['q']"] == 3 * 32 * 48


def test_int8_is_int8_on_disk(tmp_path):
  """orbax's own metadata records int8 (no upcast on disk), and the data are 1 byte each."""
  path = tmp_path / "plan"
  save_plan(path, {"w": np.ones((4, 256, 256), np.int8)}, metadata={})
  arrays_meta = ocp.PyTreeCheckpointer().metadata((path / "arrays").resolve())
  tree_meta = getattr(arrays_meta, "item_metadata", arrays_meta)
  tree_meta = getattr(tree_meta, "tree", tree_meta)
  assert np.dtype(tree_meta["l00000"].dtype) == np.int8
  assert checkpoint_bytes(path) < 2 * 4 * 256 * 256


def test_round_trip_into_a_sparsity_plan(tmp_path):
  config = TINY_V64_CONFIG
  rng = np.random.default_rng(1)
  factors = {
    p: rng.random((2, d_in), dtype=np.float32) for p, (d_in, _) in config.linear_shapes().items()
  }
  plan = make_plan(config, "2:4", sites=[(0, "q"), (1, "down")], factors=factors)
  path = tmp_path / "plan"
  save_plan(path, plan, metadata={"pattern": str(plan.pattern)})
  got, _ = load_plan(path, like=make_plan(config, "2:4", sites=()))
  assert isinstance(got, SparsityPlan) and got.pattern == plan.pattern
  _assert_trees_equal(got, jax.tree.map(np.asarray, plan))
  assert got.enabled_sites() == [(0, "q"), (1, "down")]
  # Without `like`, the dataclass fields come back as dict keys.
  as_dict, _ = load_plan(path)
  assert set(as_dict) == {"enabled", "factors"}
  np.testing.assert_array_equal(as_dict["factors"]["up"], factors["up"])
  # A `like` of another structure is refused.
  with pytest.raises(PlanCheckpointError, match="another structure"):
    load_plan(path, like={"enabled": plan.enabled})


def test_expect_mismatch_names_key_and_both_values(tmp_path):
  path = tmp_path / "plan"
  save_plan(path, _plan_tree(), metadata=META)
  _, meta = load_plan(path, expect={"pattern": "2:4", "model": "tiny-llama"})
  assert meta["pattern"] == "2:4"
  with pytest.raises(PlanCheckpointError, match="made for pattern 2:4, this run uses 8:16") as e:
    load_plan(path, expect={"pattern": "8:16"})
  assert str(path) in str(e.value)
  with pytest.raises(
    PlanCheckpointError, match="made for model tiny-llama, this run uses other-model"
  ):
    load_plan(path, expect={"model": "other-model", "pattern": "2:4"})
  with pytest.raises(PlanCheckpointError, match="records no 'calib_tokens'"):
    load_plan(path, expect={"calib_tokens": 4096})
  # Values are compared as JSON: a tuple equals the stored list, a changed dict does not.
  save_plan(path, _plan_tree(), metadata={**META, "shape": (1, 2)})
  load_plan(path, expect={"shape": (1, 2), "config": META["config"]})
  with pytest.raises(PlanCheckpointError, match='"n_layers": 4'):
    load_plan(path, expect={"config": {**META["config"], "n_layers": 4}})


def test_missing_directory(tmp_path):
  with pytest.raises(PlanCheckpointError, match="does not exist") as e:
    load_plan(tmp_path / "nope")
  assert str(tmp_path / "nope") in str(e.value)


@pytest.mark.parametrize("damage", ["remove", "truncate", "garbage", "empty"])
def test_damaged_metadata_file(tmp_path, damage):
  path = tmp_path / "plan"
  save_plan(path, _plan_tree(), metadata=META)
  meta_file = path / META_NAME
  text = meta_file.read_text()
  if damage == "remove":
    meta_file.unlink()
  elif damage == "truncate":
    meta_file.write_text(text[: len(text) // 2])
  elif damage == "garbage":
    meta_file.write_bytes(b"\xff\xfe\x00not json")
  else:
    meta_file.write_text("")
  with pytest.raises(PlanCheckpointError, match=META_NAME) as e:
    load_plan(path)
  assert str(path) in str(e.value)


def test_recorded_digest_or_dtype_change_is_caught(tmp_path):
  path = tmp_path / "plan"
  save_plan(path, _plan_tree(), metadata=META)
  meta = json.loads((path / META_NAME).read_text())
  good = json.dumps(meta)
  meta["leaves"][3]["sha256"] = "0" * 64
  (path / META_NAME).write_text(json.dumps(meta))
  with pytest.raises(PlanCheckpointError, match="SHA-256"):
    load_plan(path)
  meta = json.loads(good)
  (q,) = [leaf for leaf in meta["leaves"] if leaf["path"] == "['weights']['q']"]
  q["dtype"] = "float32"
  (path / META_NAME).write_text(json.dumps(meta))
  with pytest.raises(PlanCheckpointError, match="recorded as float32"):
    load_plan(path)


def _data_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The orbax files, ordered by folder and size (orbax names its data files by random hashes,
  and how it splits the data among them may vary from save to save)."""
  arrays = path / "arrays"
  files = [p for p in arrays.rglob("*") if p.is_file()]
  return sorted(files, key=lambda p: (str(p.parent.relative_to(arrays)), p.stat().st_size, p.name))


def _damage(target: pathlib.Path, damage: str) -> None:
  if damage == "delete":
    target.unlink()
  else:
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_array_files(tmp_path, damage):
  """Truncating or deleting any file orbax reads gives PlanCheckpointError, never wrong data.

  orbax does not read every file it writes (e.g. its commit marker), so damage to those may
  go unnoticed; then the restored plan must still be exact.
  """
  tree = _plan_tree()
  path = tmp_path / "plan"
  save_plan(path, tree, metadata=META)
  n_files, k = len(_data_files(path)), 0
  while k < n_files:
    save_plan(path, tree, metadata=META)
    files = _data_files(path)
    n_files = max(n_files, len(files))
    if k < len(files):
      _damage(files[k], damage)
      try:
        got, _ = load_plan(path)
      except PlanCheckpointError as e:
        assert str(path) in str(e)
      else:
        _assert_trees_equal(got, tree)
    k += 1
  # The largest file holds array data: damage to it is always caught.
  save_plan(path, tree, metadata=META)
  _damage(max(_data_files(path), key=lambda p: p.stat().st_size), damage)
  with pytest.raises(PlanCheckpointError) as e:
    load_plan(path)
  assert str(path) in str(e.value)


def test_overwritten_bytes_in_biggest_file_are_caught_by_the_digest(tmp_path):
  """Silent corruption (orbax restores without complaint) is caught by the per-leaf SHA-256."""
  path = tmp_path / "plan"
  save_plan(path, _plan_tree(), metadata=META)
  biggest = max(_data_files(path), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  mid = len(data) // 2
  data[mid : mid + 16] = bytes(b ^ 0x5A for b in data[mid : mid + 16])
  biggest.write_bytes(bytes(data))
  # orbax reads the (uncompressed) chunk back without noticing ...
  raw = ocp.PyTreeCheckpointer().restore((path / "arrays").resolve())
  saved = {f"l{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(_plan_tree()))}
  assert any(not np.array_equal(np.asarray(v), saved[k]) for k, v in raw.items())
  # ... and load_plan refuses it.
  with pytest.raises(PlanCheckpointError, match="SHA-256") as e:
    load_plan(path)
  assert str(path) in str(e.value)


def test_missing_array_directory(tmp_path):
  path = tmp_path / "plan"
  save_plan(path, _plan_tree(), metadata=META)
  for p in sorted((path / "arrays").rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  (path / "arrays").rmdir()
  with pytest.raises(PlanCheckpointError, match="array directory is missing"):
    load_plan(path)


def test_save_replaces_an_existing_checkpoint(tmp_path):
  path = tmp_path / "plan"
  save_plan(path, _plan_tree(0), metadata={"v": 1})
  save_plan(path, _plan_tree(1), metadata={"v": 2})
  got, meta = load_plan(path)
  _assert_trees_equal(got, _plan_tree(1))
  assert meta == {"v": 2}
  _no_leftovers(tmp_path, {"plan"})


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  path = tmp_path / "plan"
  old = _plan_tree(0)
  save_plan(path, old, metadata={"v": 1})
  real_save = ocp.PyTreeCheckpointer.save

  def save_then_fail(self, directory, *args, **kwargs):
    real_save(self, directory, *args, **kwargs)  # Writes the whole array checkpoint ...
    raise OSError("disk full")  # ... then fails before plan_meta.json and the rename.

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save_then_fail)
  with pytest.raises(OSError, match="disk full"):
    save_plan(path, _plan_tree(1), metadata={"v": 2})
  got, meta = load_plan(path)
  _assert_trees_equal(got, old)
  assert meta == {"v": 1}
  _no_leftovers(tmp_path, {"plan"})
  # With nothing there before, a failed save leaves nothing at all.
  with pytest.raises(OSError, match="disk full"):
    save_plan(tmp_path / "fresh", _plan_tree(1), metadata={})
  _no_leftovers(tmp_path, {"plan"})


def test_unserializable_metadata_writes_nothing(tmp_path):
  with pytest.raises(TypeError):
    save_plan(tmp_path / "plan", _plan_tree(), metadata={"bad": object()})
  assert not any(tmp_path.iterdir())


def test_int8_weights_take_at_most_27_percent_of_fp32_on_disk(tmp_path):
  """An int8 [L, 576, 1536] weight plus float32 per-channel scales vs the fp32 weight."""
  n_layers, d_in, d_out = 2, 576, 1536
  rng = np.random.default_rng(0)
  w32 = rng.standard_normal((n_layers, d_in, d_out)).astype(np.float32)
  scale = (np.abs(w32).max(axis=1) / 127).astype(np.float32)  # [L, d_out]
  w8 = np.clip(np.round(w32 / scale[:, None, :]), -127, 127).astype(np.int8)
  save_plan(tmp_path / "int8", {"w": w8, "scale": scale}, metadata={"quant": "int8"})
  save_plan(tmp_path / "fp32", {"w": w32}, metadata={"quant": "none"})
  int8_bytes = checkpoint_bytes(tmp_path / "int8")
  ratio_to_raw = int8_bytes / w32.nbytes
  ratio_to_saved = int8_bytes / checkpoint_bytes(tmp_path / "fp32")
  print(f"int8+scales on disk: {int8_bytes} B; {ratio_to_raw:.4f} of fp32 bytes, ")
  print(f"{ratio_to_saved:.4f} of the saved fp32 checkpoint")
  assert ratio_to_raw <= 0.27 and ratio_to_saved <= 0.27
  got, _ = load_plan(tmp_path / "int8")
  assert got["w"].dtype == np.int8 and np.array_equal(got["w"], w8)


# ----------------------------------------------------------------------------------------------
# Plans saved before the core redesign (scripts/make_plan_fixtures.py at 7df4621) still restore.


def test_plans_saved_by_the_previous_layout_restore_bit_for_bit():
  from pathlib import Path

  import jax
  import jax.numpy as jnp

  from amber_jax.calibrate.correction_fit import identity_correction
  from amber_jax.core.scores import model_factors
  from amber_jax.model import forward
  from amber_jax.model.presets import init_random_params
  from amber_jax.plan.channel_order import model_channel_order
  from amber_jax.plan.io import load_sparsity_plan
  from amber_jax.plan.quant_state import build_quant_state
  from amber_jax.plan.schema import make_plan

  fixtures = Path(__file__).parent / "fixtures" / "plans"
  cfg = TINY_V64_CONFIG
  params = init_random_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(3)
  # The same recipes as the script, built by today's code.
  plan = make_plan(
    cfg,
    "2:4",
    sites=[(0, "q"), (1, "gate"), (0, "down"), (1, "down"), (1, "o")],
    factors=model_factors(params, "robust"),
    channel_order=model_channel_order(cfg, "mixed"),
  )
  corr = jax.tree.map(
    lambda a: a + jnp.asarray(rng.uniform(0, 0.1, a.shape), a.dtype), identity_correction(cfg)
  )
  want_float = plan.replace(correction=corr)
  absmax = {
    s.name: rng.uniform(0.5, 3, (cfg.n_layers, s.d_in)).astype(np.float32) for s in cfg.sites
  }
  state, smoothed = build_quant_state(
    params, cfg, absmax, smooth="smoothquant", float_sites=[(1, "o")]
  )
  smoothed_layers = {"layers": {p: {"w": w} for p, w in smoothed.items()}}
  want_w8a8 = make_plan(
    cfg, "2:4", sites=[(0, "q"), (1, "down")], factors=model_factors(smoothed_layers, "robust")
  ).replace(quant=state)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
  for name, want in (("v1_float", want_float), ("v1_w8a8", want_w8a8)):
    got, metadata = load_sparsity_plan(fixtures / name, config=cfg)
    assert metadata["fixture"] == name[3:]
    leaves_got, tree_got = jax.tree.flatten(got)
    leaves_want, tree_want = jax.tree.flatten(want)
    assert tree_got == tree_want, name
    for a, b in zip(leaves_got, leaves_want, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
      np.asarray(forward(params, tokens, config=cfg, plan=got)),
      np.asarray(forward(params, tokens, config=cfg, plan=want)),
    )
