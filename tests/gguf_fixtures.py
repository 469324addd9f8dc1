"""GGUF files written from the tiny HF fixtures (tests/fixtures/hf/) as llama.cpp's converter
(``convert_hf_to_gguf.py``) writes them: not a test module (pytest collects only test_*.py).

What is mirrored, per family (llama.cpp's ``LlamaModel``, ``Qwen2Model``, ``Qwen3Model``,
``Qwen3MoeModel``, and ``Mistral3Model.Ministral3Model`` for "mistral3"):

- the architecture name (``MistralForCausalLM`` is written as "llama"),
- the metadata ``TextModel.set_gguf_parameters`` and the family add (vocab_size and
  rope.dimension_count for the llama family; key/value_length when config.json has head_dim;
  the expert count, experts used and expert width for qwen3moe),
- tensor names through gguf-py's ``TensorNameMap`` (the converter's own map), all F32,
- q/k rows (weights and biases) permuted by ``LlamaModel.permute`` for llama and mistral3 only,
- the hub's per-expert tensors stacked into [E, out, in] (``Qwen2MoeModel.modify_tensors``),
- ``rope_freqs`` for a Llama-3 ``rope_type`` (``LlamaModel.generate_extra_tensors``),
- the byte-level BPE vocab of ``tokenizer.json`` as ``get_vocab_base`` lists it: padded to
  vocab_size with ``[PAD{i}]`` (UNUSED), special added tokens CONTROL, bos/eos ids from
  config.json, ``tokenizer.ggml.pre`` given by the caller (the converter derives it from a hash
  of the tokenizer's output, which knows no name for this tiny tokenizer).

Knobs for bad-input tests: ``drop`` tensors, ``replace`` tensors, ``extra`` tensors, ``quantize``
some tensors, and ``metadata`` overrides (None deletes a key).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"

# HF architectures -> the GGUF architecture llama.cpp's converter writes.
HF_TO_GGUF_ARCH = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
  "Qwen3MoeForCausalLM": "qwen3moe",
}
INTERLEAVED_ROPE = ("llama", "mistral3")  # LlamaModel subclasses: undo_permute = True

# Qwen2/Qwen3's tokenizer.json pre-tokenizer and normalizer (the split llama.cpp calls "qwen2").
QWEN2_PRE_TOKENIZER = {
  "type": "Sequence",
  "pretokenizers": [
    {
      "type": "Split",
      "pattern": {
        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
      },
      "behavior": "Isolated",
      "invert": False,
    },
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
  ],
}


def qwen2_style_tokenizer_json(src: pathlib.Path) -> str:
  """The fixture's tokenizer.json with Qwen2's pre-tokenizer and NFC normaliser."""
  tok = json.loads(src.read_text())
  tok["normalizer"] = {"type": "NFC"}
  tok["pre_tokenizer"] = QWEN2_PRE_TOKENIZER
  return json.dumps(tok)


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
  """convert_hf_to_gguf.py's ``LlamaModel.permute`` (q: n_head twice; k: n_head, n_head_kv)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def rope_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """transformers-5 ``rope_parameters`` or transformers-4 ``rope_scaling`` (+ rope_theta)."""
  params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
  return params


def llama3_rope_factors(cfg: Mapping[str, Any]) -> np.ndarray:
  """``LlamaModel.generate_extra_tensors``: the rope_freqs of a Llama-3 RoPE config.

  The same float32 arithmetic, except the original context length: llama.cpp reads
  ``hparams["original_max_position_embeddings"]`` at the top level of config.json, where HF
  configs do not put it, so it always uses its default 8192 (which every released Llama 3.1/3.2
  has); we take it from the rope parameters, where HF's own scaling reads it (64 in tiny-llama).
  """
  rope = rope_params(cfg)
  base = rope["rope_theta"]
  dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
  freqs = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
  factor = rope.get("factor", 8.0)
  low_freq_factor = rope.get("low_freq_factor", 1.0)
  high_freq_factor = rope.get("high_freq_factor", 4.0)
  old_context_len = rope.get("original_max_position_embeddings", 8192)
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  factors = []
  for freq in freqs:
    wavelen = np.float32(2 * math.pi) / freq
    if wavelen < high_freq_wavelen:
      factors.append(1)
    elif wavelen > low_freq_wavelen:
      factors.append(factor)
    else:
      smooth = (np.float32(old_context_len) / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
      )
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(factors, np.float32)


def _hf_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
  tensors: dict[str, np.ndarray] = {}
  for f in sorted(hf_dir.glob("*.safetensors")):
    tensors.update(load_file(f))
  return tensors


def _stack_experts(tensors: dict[str, np.ndarray], n_layers: int, n_experts: int) -> None:
  """Qwen2MoeModel.modify_tensors: per-expert weights -> one [E, out, in] tensor per layer."""
  for i in range(n_layers):
    for w in ("down_proj", "gate_proj", "up_proj"):
      names = [f"model.layers.{i}.mlp.experts.{e}.{w}.weight" for e in range(n_experts)]
      if names[0] not in tensors:
        continue
      tensors[f"model.layers.{i}.mlp.experts.{w}.weight"] = np.stack(
        [tensors.pop(n) for n in names]
      )


def _vocab(tokenizer: Mapping[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
  """``TextModel.get_vocab_base``: tokens by id, padded, with llama.cpp's token types."""
  reverse = {i: t for t, i in tokenizer["model"]["vocab"].items()}
  added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
  reverse.update({i: a["content"] for i, a in added.items()})
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in reverse:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
    elif i in added:
      tokens.append(reverse[i])
      special = added[i].get("special", False)
      types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(reverse[i])
      types.append(gguf.TokenType.NORMAL)
  return tokens, types


def _value_type(value: Any) -> gguf.GGUFValueType:
  if isinstance(value, bool):
    return gguf.GGUFValueType.BOOL
  if isinstance(value, int):
    return gguf.GGUFValueType.UINT32
  if isinstance(value, float):
    return gguf.GGUFValueType.FLOAT32
  return gguf.GGUFValueType.STRING


def write_gguf_from_hf(
  name_or_dir: str | pathlib.Path,
  path: pathlib.Path,
  *,
  arch: str | None = None,
  pre: str = "smollm",
  tokenizer_json: str | None = None,
  add_bos: bool | None = None,
  drop: Sequence[str] = (),
  replace: Mapping[str, np.ndarray] | None = None,
  extra: Mapping[str, np.ndarray] | None = None,
  quantize: Mapping[str, gguf.GGMLQuantizationType] | None = None,
  metadata: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
  """Writes the HF checkpoint (a fixture name or a directory) as a GGUF at ``path``.

  ``arch``: the GGUF architecture (default: what the converter picks for config.json's
  architecture). ``tokenizer_json``: the tokenizer's JSON text (default: the directory's
  tokenizer.json). Returns the tensors written, by GGUF name (float32, before ``quantize``).
  """
  hf_dir = pathlib.Path(name_or_dir)
  if not hf_dir.is_dir():
    hf_dir = FIXTURES / str(name_or_dir)
  cfg = json.loads((hf_dir / "config.json").read_text())
  arch = arch or HF_TO_GGUF_ARCH[cfg["architectures"][0]]
  model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
  n_kv = cfg.get("num_key_value_heads") or n_head
  n_experts = cfg.get("num_local_experts", cfg.get("num_experts"))
  rope = rope_params(cfg)

  hf = _hf_tensors(hf_dir)
  if n_experts:
    _stack_experts(hf, n_layers, n_experts)
  tensor_map = gguf.get_tensor_name_map(model_arch, n_layers)
  out: dict[str, np.ndarray] = {}
  if arch in INTERLEAVED_ROPE and rope.get("rope_type", "").lower() == "llama3":
    out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(cfg)
  for name, data in hf.items():
    data = np.asarray(data, np.float32)
    if arch in INTERLEAVED_ROPE:
      if name.endswith(("q_proj.weight", "q_proj.bias")):
        data = llama_cpp_permute(data, n_head, n_head)
      if name.endswith(("k_proj.weight", "k_proj.bias")):
        data = llama_cpp_permute(data, n_head, n_kv)
    new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    assert new_name is not None, f"{arch}: no GGUF name for {name}"
    out[new_name] = data
  for name in drop:
    del out[name]
  out.update(replace or {})
  out.update(extra or {})

  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(n_layers)
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(n_head)
  w.add_head_count_kv(n_kv)
  w.add_rope_freq_base(rope["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  if n_experts is not None:
    w.add_expert_count(n_experts)
  if cfg.get("num_experts_per_tok") is not None:
    w.add_expert_used_count(cfg["num_experts_per_tok"])
  if cfg.get("head_dim") is not None:
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
  w.add_file_type(gguf.LlamaFileType.ALL_F32)
  if arch in INTERLEAVED_ROPE:
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
  if arch == "qwen3moe":
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])

  tokenizer = json.loads(tokenizer_json or (hf_dir / "tokenizer.json").read_text())
  tokens, types = _vocab(tokenizer, cfg["vocab_size"])
  merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  if cfg.get("bos_token_id") is not None:
    w.add_bos_token_id(cfg["bos_token_id"])
  if cfg.get("eos_token_id") is not None:
    w.add_eos_token_id(cfg["eos_token_id"])
  if add_bos is not None:
    w.add_add_bos_token(add_bos)
  for key, value in (metadata or {}).items():
    w.kv_data[0].pop(key, None)
    if value is not None:
      w.add_key_value(key, value, _value_type(value))

  for name, data in out.items():
    qtype = (quantize or {}).get(name)
    if qtype is None:
      w.add_tensor(name, data)
    else:
      w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return out
