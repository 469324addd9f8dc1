"""GGUF files of every supported family, written from the tiny HF fixtures as llama.cpp's
converter writes them (tests/gguf_fixtures.py), against the HF loader and HF transformers'
golden logits; the tokenizer rebuilt from the metadata against the fixture's tokenizer.json; bad
files. Needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_fixtures import FIXTURES, qwen2_style_tokenizer_json, write_gguf_from_hf
from tokenizers import Tokenizer

from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.io.gguf_loader import (
  SUPPORTED_ARCHITECTURES,
  load_gguf,
  load_gguf_tokenizer,
  read_gguf_config,
)
from amber_jax.io.hf import load_hf_checkpoint
from amber_jax.io.param_cache import config_from_dict, config_to_dict
from amber_jax.model.layers import rope_inv_freq
from amber_jax.model.llama import forward

# (fixture, GGUF architecture): what llama.cpp writes each HF model as (MistralForCausalLM as
# "llama"), plus the same Mistral weights as "mistral3" (Mistral Small 3.x's text decoder).
CASES = [
  ("tiny-llama", "llama"),
  ("tiny-mistral", "llama"),
  ("tiny-mistral", "mistral3"),
  ("tiny-qwen2", "qwen2"),
  ("tiny-qwen3", "qwen3"),
  ("tiny-qwen3-moe", "qwen3moe"),
]
IDS = [f"{name}-as-{arch}" for name, arch in CASES]
SENTENCES = [
  "Hello world, this is a test.",
  "It's 2024: we'll pay $1234.56 for 7 apples, don't you THINK'S ok?",
  "Line one\nLine two\n\n  indented\ttab   three spaces  ",
  "(parenthesised) [brackets] {braces} #hash @at ... !!!",
  "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 emoji",
  "decomposed: cafe\u0301 and composed: caf\u00e9",
  "special <|endoftext|> tokens <s> and </s> inline",
  "",
]


@functools.cache
def _hf(name: str):
  return load_hf_checkpoint(FIXTURES / name)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, str], pathlib.Path]:
  root = tmp_path_factory.mktemp("families")
  paths = {}
  for name, arch in CASES:
    paths[name, arch] = root / f"{name}-{arch}.gguf"
    write_gguf_from_hf(name, paths[name, arch], arch=arch)
  return paths


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_params_equal_the_hf_loaders(written, case):
  name, arch = case
  config, params = load_gguf(written[case])
  hf_config, hf_params = _hf(name)
  ours, theirs = _flat(params), _flat(hf_params)
  assert sorted(ours) == sorted(theirs)
  for key, value in ours.items():
    assert value.dtype == np.float32 and value.shape == theirs[key].shape, key
    np.testing.assert_array_equal(value, theirs[key], err_msg=key)  # bit for bit
  # The config too, but for what a GGUF cannot say: float32 metadata (eps), Mistral written as
  # "llama", and Llama-3 scaling as precomputed factors (checked through the frequencies).
  expected = dataclasses.replace(hf_config, norm_eps=float(np.float32(hf_config.norm_eps)))
  if name == "tiny-mistral" and arch == "llama":
    expected = dataclasses.replace(expected, architecture="llama")
  if hf_config.rope_scaling is not None:
    assert config.rope_freq_factors is not None and len(config.rope_freq_factors) == 8
    np.testing.assert_allclose(rope_inv_freq(config), rope_inv_freq(hf_config), rtol=1e-6)
    expected = dataclasses.replace(
      expected, rope_scaling=None, rope_freq_factors=config.rope_freq_factors
    )
  assert config == expected
  assert read_gguf_config(written[case]) == config


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_match_hf_transformers(written, case):
  config, params = load_gguf(written[case])
  golden = np.load(FIXTURES / case[0] / "golden.npz")
  logits = np.asarray(forward(params, jnp.asarray(golden["tokens"]), config=config))
  diff = np.abs(logits - golden["logits"])
  summary = f"{case[0]} as {case[1]}: |logits - HF| max {diff.max():.2e}, mean {diff.mean():.2e}"
  print(summary)
  assert logits.shape == golden["logits"].shape
  assert diff.max() < 1e-4, summary


def test_llama_cpp_default_original_context_would_change_the_logits(tmp_path):
  """tiny-llama's original context is 64; llama.cpp's converter reads it where HF configs do not
  put it and uses 8192 (every released Llama 3.1/3.2's value): the factors then differ, so the
  goldens really check the factors we write (see gguf_fixtures.llama3_rope_factors)."""
  cfg = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
  cfg["rope_parameters"]["original_max_position_embeddings"] = 8192
  from gguf_fixtures import llama3_rope_factors

  factors_8192 = llama3_rope_factors(cfg)
  path = tmp_path / "llama-8192.gguf"
  write_gguf_from_hf("tiny-llama", path, replace={"rope_freqs.weight": factors_8192})
  config, params = load_gguf(path)
  golden = np.load(FIXTURES / "tiny-llama" / "golden.npz")
  logits = np.asarray(forward(params, jnp.asarray(golden["tokens"]), config=config))
  assert np.abs(logits - golden["logits"]).max() > 1e-3


def test_quantized_expert_tensor_is_dequantized(tmp_path):
  path = tmp_path / "q8.gguf"
  qtype = gguf.GGMLQuantizationType.Q8_0
  name = "blk.1.ffn_down_exps.weight"
  written = write_gguf_from_hf("tiny-qwen3-moe", path, quantize={name: qtype})
  _, params = load_gguf(path)
  expected_ExDxF = gguf.quants.dequantize(gguf.quants.quantize(written[name], qtype), qtype)
  np.testing.assert_array_equal(params["layers"]["down"]["w"][1], expected_ExDxF.swapaxes(1, 2))
  assert 0 < np.abs(expected_ExDxF - written[name]).max() < 0.05  # lossy, but close


def test_progress_counts_every_tensor(written):
  seen = []
  load_gguf(written["tiny-llama", "llama"], progress=lambda done, total: seen.append((done, total)))
  n = 1 + 3 + 9 * 2  # rope_freqs, embed/norm/output, 9 per layer
  assert seen == [(i + 1, n) for i in range(n)]


@pytest.mark.parametrize("case", [("tiny-qwen3-moe", "qwen3moe"), ("tiny-llama", "llama")])
def test_configs_survive_the_param_cache(written, case):
  config = read_gguf_config(written[case])
  restored = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
  assert restored == config and hash(restored) == hash(config)


# ---------------------------------------------------------------------------------------------
# The tokenizer in the metadata.


@pytest.mark.parametrize("pre", ["smollm", "qwen2"])
def test_tokenizer_encodes_as_tokenizer_json(tmp_path, pre):
  """smollm: the fixtures' own tokenizer (single digits, then GPT-2's split); qwen2: the same
  vocab with Qwen2/Qwen3's tokenizer.json split and NFC normaliser."""
  src = FIXTURES / "tiny-qwen2" / "tokenizer.json"
  text = src.read_text() if pre == "smollm" else qwen2_style_tokenizer_json(src)
  (tmp_path / "tokenizer.json").write_text(text)
  reference = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  path = tmp_path / "tok.gguf"
  write_gguf_from_hf("tiny-qwen2", path, pre=pre, tokenizer_json=text)
  tokenizer = load_gguf_tokenizer(path)
  for s in SENTENCES:
    assert tokenizer.encode(s).ids == reference.encode(s).ids, s
    assert tokenizer.decode(tokenizer.encode(s).ids) == reference.decode(reference.encode(s).ids)
  # The two splits differ (Qwen2's keeps "(" with a word, lower-cases contractions, ...).
  other = Tokenizer.from_file(str(src)) if pre == "qwen2" else None
  if other is not None:
    assert any(other.encode(s).ids != reference.encode(s).ids for s in SENTENCES)


def test_qwen2_adds_no_bos_by_default(tmp_path):
  path = tmp_path / "qwen.gguf"
  write_gguf_from_hf("tiny-qwen3", path, pre="qwen2")  # bos_token_id 1, no add_bos_token flag
  tokenizer = load_gguf_tokenizer(path)
  assert tokenizer.post_processor is None
  assert 1 not in tokenizer.encode("hello world").ids
  write_gguf_from_hf("tiny-qwen3", path, pre="qwen2", add_bos=True)  # the flag decides
  assert load_gguf_tokenizer(path).encode("hello world").ids[0] == 1


# ---------------------------------------------------------------------------------------------
# Bad files.


def test_unknown_architecture_lists_the_supported(tmp_path):
  path = tmp_path / "gemma.gguf"
  w = gguf.GGUFWriter(path, "gemma3")
  w.add_block_count(2)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  assert SUPPORTED_ARCHITECTURES == ("llama", "mistral3", "qwen2", "qwen3", "qwen3moe")
  for load in (load_gguf, read_gguf_config):
    with pytest.raises(
      UnsupportedArchitectureError,
      match=r"'gemma3' is not supported; supported: llama, mistral3, qwen2, qwen3, qwen3moe",
    ):
      load(path)


def _write(tmp_path, name="tiny-qwen3-moe", **kw) -> pathlib.Path:
  path = tmp_path / "bad.gguf"
  write_gguf_from_hf(name, path, **kw)
  return path


def test_missing_expert_tensor_is_named(tmp_path):
  path = _write(tmp_path, drop=["blk.1.ffn_up_exps.weight"])
  with pytest.raises(ModelFileError, match=r"GGUF tensor 'blk.1.ffn_up_exps.weight' is missing"):
    load_gguf(path)


def test_missing_router_is_named(tmp_path):
  path = _write(tmp_path, drop=["blk.0.ffn_gate_inp.weight"])
  with pytest.raises(ModelFileError, match=r"'blk.0.ffn_gate_inp.weight' is missing"):
    load_gguf(path)


@pytest.mark.parametrize("used", [9, 0])
def test_expert_used_count_out_of_range(tmp_path, used):
  path = _write(tmp_path, metadata={"qwen3moe.expert_used_count": used})
  with pytest.raises(
    ModelFileError,
    match=rf"'qwen3moe.expert_used_count' = {used} must be in 1..'qwen3moe.expert_count' = 8",
  ):
    read_gguf_config(path)


def test_expert_count_missing(tmp_path):
  path = _write(tmp_path, metadata={"qwen3moe.expert_count": None})
  with pytest.raises(ModelFileError, match=r"'qwen3moe.expert_count' is None"):
    read_gguf_config(path)


def test_expert_width_disagrees_with_the_tensors(tmp_path):
  path = _write(tmp_path, metadata={"qwen3moe.expert_feed_forward_length": 16})
  with pytest.raises(
    ModelFileError,
    match=r"tensor layers/gate/w has shape \(2, 8, 64, 32\), expected \(2, 8, 64, 16\) .*"
    r"'blk.0.ffn_gate_exps.weight' is stored as \(8, 32, 64\)",
  ):
    load_gguf(path)


def test_q_norm_length_not_matching_head_dim(tmp_path):
  path = _write(tmp_path, "tiny-qwen3", replace={"blk.0.attn_q_norm.weight": np.ones(16, "f4")})
  with pytest.raises(
    ModelFileError,
    match=r"tensor layers/q_norm has shape \(2, 16\), expected \(2, 32\) .*"
    r"'blk.0.attn_q_norm.weight' is stored as \(16,\), expected \(32,\) \(head_dim 32: "
    r"'qwen3.attention.key_length'\)",
  ):
    load_gguf(path)


def test_qwen2_bias_missing(tmp_path):
  path = _write(tmp_path, "tiny-qwen2", drop=["blk.1.attn_k.bias"])
  with pytest.raises(ModelFileError, match=r"GGUF tensor 'blk.1.attn_k.bias' is missing"):
    load_gguf(path)


def test_unused_tensor_is_refused(tmp_path):
  path = _write(tmp_path, "tiny-qwen3", extra={"blk.0.attn_output.bias": np.zeros(64, "f4")})
  with pytest.raises(
    ModelFileError, match=r"1 tensor\(s\) a qwen3 model .* not use .*'blk.0.attn_output.bias'"
  ):
    load_gguf(path)


def test_rope_freqs_of_the_wrong_length(tmp_path):
  path = _write(tmp_path, "tiny-llama", replace={"rope_freqs.weight": np.ones(4, "f4")})
  with pytest.raises(ModelFileError, match=r"'rope_freqs.weight' has shape \(4,\), expected \(8,"):
    read_gguf_config(path)


def test_rope_freqs_outside_the_llama_family_is_refused(tmp_path):
  path = _write(tmp_path, "tiny-qwen2", extra={"rope_freqs.weight": np.ones(8, "f4")})
  with pytest.raises(ModelFileError, match=r"a qwen2 model .* not use .*'rope_freqs.weight'"):
    load_gguf(path)


def test_mixtral_style_llama_is_refused(tmp_path):
  path = _write(tmp_path, "tiny-llama", metadata={"llama.expert_count": 8})
  with pytest.raises(UnsupportedArchitectureError, match=r"experts .*Mixtral"):
    read_gguf_config(path)
  path = _write(tmp_path, "tiny-llama", extra={"blk.0.ffn_gate_inp.weight": np.ones((8, 64), "f4")})
  with pytest.raises(UnsupportedArchitectureError, match=r"'blk.0.ffn_gate_inp.weight': Mixtral"):
    load_gguf(path)


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("mistral3.attention.temperature_scale", 0.1, r"Llama-4 attention temperature"),
    ("mistral3.rope.scaling.type", "yarn", r"RoPE scaling type 'yarn'"),
    ("mistral3.rope.scaling.factor", 4.0, r"linear RoPE scaling"),
    ("mistral3.rope.dimension_count", 8, r"partial RoPE"),
  ],
)
def test_unsupported_mistral3_variants(tmp_path, key, value, match):
  path = _write(tmp_path, "tiny-mistral", arch="mistral3", metadata={key: value})
  with pytest.raises(UnsupportedArchitectureError, match=match):
    read_gguf_config(path)


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("qwen3moe.expert_shared_count", 1, r"shared experts"),
    ("qwen3moe.expert_gating_func", 2, r"expert gating function 2"),
    ("qwen3moe.expert_weights_scale", 2.5, r"scaled expert weights"),
  ],
)
def test_unsupported_moe_variants(tmp_path, key, value, match):
  path = _write(tmp_path, metadata={key: value})
  with pytest.raises(UnsupportedArchitectureError, match=match):
    read_gguf_config(path)


@pytest.mark.parametrize("flag", [None, True, False])
def test_norm_topk_prob(tmp_path, flag):
  """llama.cpp's qwen3moe always renormalises (no key written); an explicit key decides."""
  path = _write(tmp_path, metadata={"qwen3moe.expert_weights_norm": flag})
  assert read_gguf_config(path).moe.norm_topk_prob is (True if flag is None else flag)
