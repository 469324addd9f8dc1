"""HF checkpoint directories: loading against HF transformers goldens, bad inputs, round trip.

The fixtures in tests/fixtures/hf/ and their golden logits come from scripts/make_hf_goldens.py
(HF transformers, fp32, eager attention); these tests need neither torch nor transformers, except
the one that hands a saved checkpoint back to transformers (skipped when it is not installed).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.io.hf import (
  config_from_hf,
  config_to_hf,
  load_hf_checkpoint,
  read_safetensors,
  save_hf_checkpoint,
)
from amber_jax.io.tokenizer import load_hf_tokenizer
from amber_jax.model import forward
from amber_jax.model.config import LlamaConfig, RopeScaling

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NAMES = ("tiny-llama", "tiny-qwen2", "tiny-mistral")

COMMON = dict(vocab_size=512, d_model=64, n_layers=2, d_ff=128)
EXPECTED = {
  "tiny-llama": LlamaConfig(
    **COMMON,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
    norm_eps=1e-5,
    tie_embeddings=False,
    qkv_bias=False,
    max_seq_len=1024,
    architecture="llama",
  ),
  "tiny-qwen2": LlamaConfig(
    **COMMON,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,  # Not in config.json: hidden_size / num_attention_heads.
    rope_theta=1e6,
    norm_eps=1e-6,
    tie_embeddings=True,
    qkv_bias=True,
    max_seq_len=512,
    architecture="qwen2",
  ),
  "tiny-mistral": LlamaConfig(
    **COMMON,
    n_heads=8,
    n_kv_heads=2,
    head_dim=16,  # From config.json; n_heads * head_dim = 128 != d_model.
    rope_theta=1e6,
    norm_eps=1e-5,
    tie_embeddings=False,
    qkv_bias=False,
    max_seq_len=256,
    architecture="mistral",
  ),
}


def _copy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def _edit_config(path: pathlib.Path, **changes) -> None:
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))


def _assert_trees_equal(a, b, where="params"):
  assert isinstance(a, dict) == isinstance(b, dict), where
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), where
    for k in a:
      _assert_trees_equal(a[k], b[k], f"{where}[{k!r}]")
  else:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


# ---------------------------------------------------------------------------------------------
# The fixtures against HF transformers.


@pytest.mark.parametrize("name", NAMES)
def test_config(name):
  config, _ = load_hf_checkpoint(FIXTURES / name)
  assert config == EXPECTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_params_layout(name):
  config, params = load_hf_checkpoint(FIXTURES / name)
  n, d, f, v = config.n_layers, config.d_model, config.d_ff, config.vocab_size
  assert params["embed"].shape == (v, d)
  assert params["final_norm"].shape == (d,)
  assert ("lm_head" in params) == (not config.tie_embeddings)
  if not config.tie_embeddings:
    assert params["lm_head"].shape == (d, v)
  layers = params["layers"]
  assert layers["attn_norm"].shape == layers["mlp_norm"].shape == (n, d)
  for proj, (d_in, d_out) in config.linear_shapes().items():
    assert layers[proj]["w"].shape == (n, d_in, d_out), proj
    assert ("b" in layers[proj]) == (config.qkv_bias and proj in "qkv"), proj
    if "b" in layers[proj]:
      assert layers[proj]["b"].shape == (n, d_out)
      assert np.abs(layers[proj]["b"]).max() > 0.1  # The fixture's biases are not HF's zeros.
  assert layers["gate"]["w"].shape == (n, d, f)
  for leaf in [params["embed"], layers["q"]["w"], layers["attn_norm"]]:
    assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32


def test_llama_fixture_is_sharded():
  shards = sorted(p.name for p in (FIXTURES / "tiny-llama").glob("model-*-of-*.safetensors"))
  assert len(shards) >= 2
  assert not (FIXTURES / "tiny-llama" / "model.safetensors").exists()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_transformers(name):
  config, params = load_hf_checkpoint(FIXTURES / name)
  golden = np.load(FIXTURES / name / "golden.npz")
  tokens = golden["tokens"]
  assert tokens.shape == (2, 12) and tokens.dtype == np.int32
  logits = np.asarray(forward(params, jnp.asarray(tokens), config=config))
  assert logits.shape == golden["logits"].shape == (2, 12, config.vocab_size)
  assert logits.dtype == np.float32
  err = np.abs(logits - golden["logits"]).max()
  print(f"{name}: max abs logit error vs HF transformers {err:.2e}")
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_loads(name):
  config, _ = load_hf_checkpoint(FIXTURES / name)
  for where in (FIXTURES / name, FIXTURES / name / "tokenizer.json", str(FIXTURES / name)):
    tok = load_hf_tokenizer(where)
    assert 256 < tok.get_vocab_size() <= config.vocab_size
  text = "The quick brown fox, 2025."
  ids = tok.encode(text).ids
  assert all(0 <= i < config.vocab_size for i in ids)
  assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# config.json variants.


def test_transformers4_style_config_reads_the_same():
  """Llama-3 configs on the hub use rope_theta + rope_scaling, not rope_parameters."""
  cfg = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope
  assert config_from_hf(cfg) == EXPECTED["tiny-llama"]
  cfg["rope_scaling"] = None
  assert config_from_hf(cfg) == dataclasses.replace(EXPECTED["tiny-llama"], rope_scaling=None)
  del cfg["rope_scaling"], cfg["rope_theta"]
  assert config_from_hf(cfg).rope_theta == 10000.0


def test_defaults_kv_heads_and_head_dim():
  cfg = dict(
    model_type="mistral",
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=96,
    head_dim=None,
  )
  config = config_from_hf(cfg)
  assert (config.n_kv_heads, config.head_dim) == (4, 16)


@pytest.mark.parametrize(
  "changes, match",
  [
    (dict(model_type="gpt2"), r"'gpt2'.*llama, mistral, qwen2"),
    (dict(model_type=None), r"None.*llama, mistral, qwen2"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"'yarn'.*'default', 'llama3'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), r"'linear'"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(attention_bias=True), r"attention_bias"),
    (dict(quantization_config={"quant_method": "gptq"}), r"'gptq'"),
  ],
)
def test_unsupported_config(changes, match):
  cfg = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
  cfg.update(changes)
  with pytest.raises(UnsupportedArchitectureError, match=match):
    config_from_hf(cfg)


def test_config_missing_field():
  cfg = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
  del cfg["hidden_size"]
  with pytest.raises(ModelFileError, match="'hidden_size'"):
    config_from_hf(cfg)


# Sliding-window attention: recorded (as transformers reads it) and enforced by check_seq_len.


def _fixture_config(name: str) -> dict:
  return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize(
  "name, changes, window",
  [
    ("tiny-mistral", {}, None),  # The fixture: "sliding_window": null.
    ("tiny-mistral", dict(sliding_window=4096), 4096),  # Mistral-7B-v0.1.
    ("tiny-mistral", dict(sliding_window=8), 8),
    ("tiny-mistral", dict(sliding_window=None), None),  # Mistral v0.2+.
    ("tiny-mistral", dict(sliding_window="absent"), 4096),  # MistralConfig's default.
    ("tiny-llama", dict(sliding_window=8), None),  # LlamaForCausalLM has no window.
    ("tiny-qwen2", {}, None),  # use_sliding_window false.
    ("tiny-qwen2", dict(sliding_window=8), None),  # Still off: Qwen2.5 configs look like this.
    ("tiny-qwen2", dict(use_sliding_window=True, sliding_window=8), None),  # all full layers
    (
      "tiny-qwen2",
      dict(
        use_sliding_window=True,
        sliding_window=8,
        layer_types=["full_attention", "sliding_attention"],
      ),
      8,
    ),
    ("tiny-qwen2", dict(use_sliding_window=True, sliding_window=8, layer_types="absent"), None),
    (
      "tiny-qwen2",
      dict(use_sliding_window=True, sliding_window=8, layer_types="absent", max_window_layers=1),
      8,
    ),
    (
      "tiny-qwen2",
      dict(
        use_sliding_window=True, sliding_window="absent", layer_types="absent", max_window_layers=0
      ),
      4096,
    ),
  ],
)
def test_sliding_window_is_recorded(name, changes, window):
  cfg = _fixture_config(name)
  for key, value in changes.items():
    if value == "absent":
      cfg.pop(key, None)
    else:
      cfg[key] = value
  assert config_from_hf(cfg).sliding_window == window


@pytest.mark.parametrize("window", [0, -4, "4096", 4096.5, True])
def test_bad_sliding_window(window):
  cfg = _fixture_config("tiny-mistral")
  cfg["sliding_window"] = window
  with pytest.raises(ModelFileError, match=rf"sliding_window={window!r} is not valid.*positive"):
    config_from_hf(cfg)


def test_mistral_sliding_window_limits_the_sequence_length(tmp_path):
  """A Mistral-v0.1-style checkpoint: longer sequences than the window must not run silently."""
  path = _copy("tiny-mistral", tmp_path)
  _edit_config(path, sliding_window=8)
  config, _ = load_hf_checkpoint(path)
  assert config == dataclasses.replace(EXPECTED["tiny-mistral"], sliding_window=8)
  for t in (0, 1, 8):
    config.check_seq_len(t)
  with pytest.raises(ValueError, match=r"t=9 exceeds the mistral model's attention window "):
    config.check_seq_len(9)
  with pytest.raises(ValueError, match=r"sliding_window=8.*valid: 0 <= t <= 8"):
    config.check_seq_len(12)
  assert config.seq_len_limit == 8
  assert dataclasses.replace(config, sliding_window=4096).seq_len_limit == 256
  # Without a window only max_seq_len (256) bounds it.
  full = EXPECTED["tiny-mistral"]
  assert full.seq_len_limit == 256
  full.check_seq_len(256)
  with pytest.raises(ValueError, match=r"t=257 exceeds the mistral model's max_seq_len=256"):
    full.check_seq_len(257)


@pytest.mark.parametrize(
  "t, error, match",
  [
    (-1, ValueError, r"sequence length t must be >= 0, got -1"),
    (2.0, TypeError, r"sequence length t must be an int, got float 2.0"),
    (True, TypeError, r"sequence length t must be an int, got bool True"),
    ("8", TypeError, r"must be an int, got str '8'"),
  ],
)
def test_check_seq_len_bad_argument(t, error, match):
  with pytest.raises(error, match=match):
    EXPECTED["tiny-mistral"].check_seq_len(t)


def test_check_seq_len_accepts_numpy_integers():
  EXPECTED["tiny-mistral"].check_seq_len(np.int64(12))
  with pytest.raises(ValueError, match="t=300"):
    EXPECTED["tiny-mistral"].check_seq_len(np.int32(300))


@pytest.mark.parametrize("window", [0, -1, 2.5, True, "8"])
def test_llama_config_rejects_a_bad_sliding_window(window):
  with pytest.raises(ValueError, match=r"sliding_window must be None \(full attention\) or an in"):
    dataclasses.replace(EXPECTED["tiny-mistral"], sliding_window=window)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-qwen2"])
def test_round_trip_keeps_the_sliding_window(tmp_path, name):
  config, params = load_hf_checkpoint(FIXTURES / name)
  config = dataclasses.replace(config, sliding_window=8)
  assert config_from_hf(config_to_hf(config)) == config
  out = save_hf_checkpoint(config, params, tmp_path / "saved")
  config2, params2 = load_hf_checkpoint(out)
  assert config2 == config  # Mistral stays Mistral: a Llama config cannot hold a window.
  _assert_trees_equal(params, params2)


# ---------------------------------------------------------------------------------------------
# Bad directories and files.


def test_missing_directory(tmp_path):
  missing = tmp_path / "no-such-model"
  with pytest.raises(ModelFileError, match="no-such-model"):
    load_hf_checkpoint(missing)
  with pytest.raises(ModelFileError, match="no-such-model"):
    load_hf_tokenizer(missing)


def test_missing_config(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  (path / "config.json").unlink()
  with pytest.raises(ModelFileError, match="config.json"):
    load_hf_checkpoint(path)


def test_corrupt_config(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  (path / "config.json").write_text('{"model_type": "mistral", ')
  with pytest.raises(ModelFileError, match="config.json"):
    load_hf_checkpoint(path)


def test_no_weights(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  (path / "model.safetensors").unlink()
  (path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(ModelFileError, match=r"model\.safetensors.*pytorch_model\.bin"):
    load_hf_checkpoint(path)


def test_missing_shard(tmp_path):
  path = _copy("tiny-llama", tmp_path)
  shard = sorted(path.glob("model-*-of-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(ModelFileError, match=shard.name) as info:
    load_hf_checkpoint(path)
  assert "missing" in str(info.value)


def test_index_names_tensor_absent_from_shard(tmp_path):
  path = _copy("tiny-llama", tmp_path)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  key = next(k for k, v in index["weight_map"].items() if v == shards[0])
  index["weight_map"][key] = shards[1]
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ModelFileError, match=f"{key}.*{shards[1]}"):
    load_hf_checkpoint(path)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-llama"])
@pytest.mark.parametrize("keep", [0.5, 0.999, 30 / 544104, 4 / 544104])
def test_truncated_safetensors(tmp_path, name, keep):
  path = _copy(name, tmp_path)
  file = sorted(path.glob("*.safetensors"))[-1]
  data = file.read_bytes()
  file.write_bytes(data[: int(len(data) * keep)])
  with pytest.raises(ModelFileError, match=file.name) as info:
    load_hf_checkpoint(path)
  assert "truncated" in str(info.value)


def test_corrupt_safetensors_header(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  file = path / "model.safetensors"
  data = bytearray(file.read_bytes())
  data[8:16] = b"\x00garbage"
  file.write_bytes(bytes(data))
  with pytest.raises(ModelFileError, match="model.safetensors"):
    load_hf_checkpoint(path)


def test_shape_disagrees_with_config(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  _edit_config(path, intermediate_size=256)
  with pytest.raises(ModelFileError, match=r"gate_proj.*\(128, 64\).*\(256, 64\)"):
    load_hf_checkpoint(path)


def test_missing_lm_head_when_untied(tmp_path):
  path = _copy("tiny-qwen2", tmp_path)
  _edit_config(path, tie_word_embeddings=False)
  with pytest.raises(ModelFileError, match="'lm_head.weight' is missing"):
    load_hf_checkpoint(path)


def test_unsupported_model_type_directory(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  _edit_config(path, model_type="gpt2")
  with pytest.raises(UnsupportedArchitectureError, match=r"config\.json.*'gpt2'") as info:
    load_hf_checkpoint(path)
  assert "llama, mistral, qwen2" in str(info.value)


def test_unused_tensors_are_an_error(tmp_path):
  """A Llama checkpoint with q/k/v biases must not silently lose them."""
  path = _copy("tiny-qwen2", tmp_path)
  _edit_config(path, model_type="llama")
  with pytest.raises(ModelFileError, match=r"does not use.*q_proj\.bias"):
    load_hf_checkpoint(path)


def test_corrupt_tokenizer(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  (path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ModelFileError, match="tokenizer.json"):
    load_hf_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Safetensors reader.


def _write_safetensors(file: pathlib.Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
  header, blobs, offset = {}, [], 0
  for name, (st_dtype, arr) in tensors.items():
    raw = np.ascontiguousarray(arr).tobytes()
    header[name] = {
      "dtype": st_dtype,
      "shape": list(arr.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    blobs.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  file.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_reads_bfloat16_and_float16(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
  b = rng.standard_normal((7,)).astype(np.float16)
  file = tmp_path / "x.safetensors"
  _write_safetensors(file, {"a": ("BF16", a), "b": ("F16", b)})
  out = read_safetensors(file)
  assert out["a"].dtype == ml_dtypes.bfloat16 and out["b"].dtype == np.float16
  np.testing.assert_array_equal(out["a"].astype(np.float32), a.astype(np.float32))
  np.testing.assert_array_equal(out["b"], b)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  path = _copy("tiny-mistral", tmp_path)
  tensors = read_safetensors(path / "model.safetensors")
  bf16 = {k: ("BF16", v.astype(ml_dtypes.bfloat16)) for k, v in tensors.items()}
  del tensors
  _write_safetensors(path / "model.safetensors", bf16)
  config, params = load_hf_checkpoint(path)
  _, ref = load_hf_checkpoint(FIXTURES / "tiny-mistral")
  assert params["layers"]["q"]["w"].dtype == np.float32
  np.testing.assert_allclose(params["layers"]["q"]["w"], ref["layers"]["q"]["w"], rtol=1e-2)


def test_safetensors_with_unknown_dtype(tmp_path):
  file = tmp_path / "x.safetensors"
  _write_safetensors(file, {"a": ("F7", np.zeros(4, np.float32))})
  with pytest.raises(ModelFileError, match=r"x\.safetensors.*'a'"):
    read_safetensors(file)


# ---------------------------------------------------------------------------------------------
# save_hf_checkpoint.


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_fixture(tmp_path, name):
  config, params = load_hf_checkpoint(FIXTURES / name)
  tok = load_hf_tokenizer(FIXTURES / name)
  out = save_hf_checkpoint(config, params, tmp_path / "saved", tokenizer_json=tok)
  assert sorted(p.name for p in out.iterdir()) == [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
  ]
  config2, params2 = load_hf_checkpoint(out)
  # Mistral is written in the (identical) Llama format.
  assert config2 == dataclasses.replace(config, architecture=config2.architecture)
  assert config2.architecture == ("qwen2" if config.qkv_bias else "llama")
  _assert_trees_equal(params, params2)
  assert load_hf_tokenizer(out).to_str() == tok.to_str()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # No temporary left over.


def _random_params(config: LlamaConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  n, d, v = config.n_layers, config.d_model, config.vocab_size
  layers = {"attn_norm": rng.standard_normal((n, d)), "mlp_norm": rng.standard_normal((n, d))}
  for proj, (d_in, d_out) in config.linear_shapes().items():
    layers[proj] = {"w": rng.standard_normal((n, d_in, d_out))}
    if config.qkv_bias and proj in "qkv":
      layers[proj]["b"] = rng.standard_normal((n, d_out))
  params = {
    "embed": rng.standard_normal((v, d)),
    "layers": layers,
    "final_norm": rng.standard_normal(d),
  }
  if not config.tie_embeddings:
    params["lm_head"] = rng.standard_normal((d, v))
  cast = lambda t: (
    {k: cast(x) for k, x in t.items()} if isinstance(t, dict) else t.astype(np.float32)
  )
  return cast(params)


@pytest.mark.parametrize("tie, bias, scaling", [(True, False, True), (False, True, False)])
def test_round_trip_random(tmp_path, tie, bias, scaling):
  config = LlamaConfig(
    vocab_size=40,
    d_model=24,
    n_layers=3,
    n_heads=6,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    rope_theta=5e5,
    rope_scaling=RopeScaling(original_max_position_embeddings=128) if scaling else None,
    norm_eps=1e-6,
    tie_embeddings=tie,
    qkv_bias=bias,
    max_seq_len=4096,
    architecture="qwen2" if bias else "llama",
  )
  params = _random_params(config)
  jax_params = {**params, "embed": jnp.asarray(params["embed"])}  # jax arrays are accepted too.
  out = save_hf_checkpoint(config, jax_params, tmp_path / "m", extra_config={"eos_token_id": 7})
  assert json.loads((out / "config.json").read_text())["eos_token_id"] == 7
  config2, params2 = load_hf_checkpoint(out)
  assert config2 == config
  _assert_trees_equal(params, params2)
  assert config_from_hf(config_to_hf(config)) == config


def test_save_refuses_to_overwrite(tmp_path):
  config, params = load_hf_checkpoint(FIXTURES / "tiny-mistral")
  target = tmp_path / "m"
  target.mkdir()
  (target / "keep").write_text("x")
  with pytest.raises(FileExistsError, match="overwrite"):
    save_hf_checkpoint(config, params, target)
  assert (target / "keep").exists()
  save_hf_checkpoint(config, params, target, overwrite=True)
  assert not (target / "keep").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_rejects_bad_params_without_writing(tmp_path):
  config, params = load_hf_checkpoint(FIXTURES / "tiny-mistral")
  params["layers"]["up"]["w"] = params["layers"]["up"]["w"][:, :, :5]
  with pytest.raises(ValueError, match=r"params\['layers'\]\['up'\]\['w'\] has shape"):
    save_hf_checkpoint(config, params, tmp_path / "m")
  del params["layers"]["up"]
  with pytest.raises(ValueError, match=r"lacks 'up'"):
    save_hf_checkpoint(config, params, tmp_path / "m")
  with pytest.raises(ValueError, match="tokenizer_json"):
    save_hf_checkpoint(config, params, tmp_path / "m", tokenizer_json="not/a/json/file")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_saved_checkpoint_loads_in_transformers(tmp_path, name):
  """The saved directory reproduces the golden logits in HF transformers itself."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, params = load_hf_checkpoint(FIXTURES / name)
  out = save_hf_checkpoint(config, params, tmp_path / "saved")
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  model = model.float().eval()
  golden = np.load(FIXTURES / name / "golden.npz")
  with torch.no_grad():
    logits = model(torch.from_numpy(golden["tokens"]).long()).logits.numpy()
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_saved_windowed_mistral_loads_in_transformers(tmp_path):
  """A Mistral config with a window is written as one transformers reads with that window."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, params = load_hf_checkpoint(FIXTURES / "tiny-mistral")
  golden = np.load(FIXTURES / "tiny-mistral" / "golden.npz")
  t = golden["tokens"].shape[1]
  config = dataclasses.replace(config, sliding_window=t)  # Windowed, exact for the golden's T.
  config.check_seq_len(t)
  out = save_hf_checkpoint(config, params, tmp_path / "saved")
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == t
  with torch.no_grad():
    logits = model.float().eval()(torch.from_numpy(golden["tokens"]).long()).logits.numpy()
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-5, rtol=0)
