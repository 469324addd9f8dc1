"""Hugging Face checkpoint directories (config.json + safetensors) <-> (LlamaConfig, params).

Reads the directories that `save_pretrained` writes for `LlamaForCausalLM` (Llama 2/3/3.1/3.2,
SmolLM2), `MistralForCausalLM` and `Qwen2ForCausalLM`: `config.json`, then either one
`model.safetensors` or the shards named by `model.safetensors.index.json`. Both config styles are
read: transformers 4 (`rope_theta` + `rope_scaling`) and transformers 5 (`rope_parameters`).

Supported: grouped-query attention, `head_dim` given in the config or hidden_size / heads, tied
or untied embeddings, Qwen2's q/k/v biases, RoPE without scaling or with Llama-3 scaling
(`rope_type` "llama3"); every other RoPE type, activation, bias or quantization raises
`UnsupportedArchitectureError`.

Not implemented: sliding-window attention. Mistral v0.1 configs set `sliding_window` 4096 and Qwen2
configs may set `use_sliding_window`; the model attends fully causally, which is exact only for
sequences no longer than the window. The window is recorded in `LlamaConfig.sliding_window` (read
as transformers reads it, see `_sliding_window`), and `LlamaConfig.check_seq_len` refuses longer
sequences. Mistral v0.2+ (`sliding_window` null) and most Qwen2 configs use full attention.

Safetensors files are parsed here (8-byte header length, JSON header, raw little-endian data)
and memory-mapped, so bfloat16 and float16 checkpoints load without torch; every tensor's
offsets are checked against its dtype, shape and the file size, so a truncated or corrupt file
raises `ModelFileError` naming the file.

Weights are returned as [d_in, d_out] (the transpose of HF's `weight`), layers stacked along a
leading axis, as float32 numpy arrays (see `amber_jax.model`). HF q/k rows are used as-is: the
model uses HF's rotate-half RoPE convention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.model.config import LlamaConfig, MixtureOfExperts, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
_QWEN = ("qwen2", "qwen3", "qwen3_moe")  # the families whose window follows use_sliding_window
SUPPORTED_ROPE_TYPES = ("default", "llama3")

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

_HF_PROJ = {
  "q": "self_attn.q_proj",
  "k": "self_attn.k_proj",
  "v": "self_attn.v_proj",
  "o": "self_attn.o_proj",
  "gate": "mlp.gate_proj",
  "up": "mlp.up_proj",
  "down": "mlp.down_proj",
}
_HF_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_HF_HEAD_NORM = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}  # Qwen3
_HF_EXPERT = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # Qwen3-MoE
_HF_ROUTER = "mlp.gate"
_BIASED = ("q", "k", "v")  # Qwen2.

_ST_DTYPES = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024  # The safetensors format's own limit.


# ----------------------------------------------------------------------------------------------
# Config.


def _required(config_dict: Mapping[str, Any], key: str) -> Any:
  value = config_dict.get(key)
  if value is None:
    raise ModelFileError(f"HF config lacks the required field {key!r}")
  return value


def _rope(config_dict: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from transformers-4 or transformers-5 style fields."""
  params = config_dict.get("rope_parameters")  # transformers >= 5
  if params is None:
    params = config_dict.get("rope_scaling")  # transformers 4
  params = dict(params or {})
  if "full_attention" in params and isinstance(params["full_attention"], Mapping):
    params = dict(params["full_attention"])  # transformers-5 per-layer-type form.
  theta = params.get("rope_theta", config_dict.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedArchitectureError(
      f"RoPE scaling rope_type={rope_type!r} is not supported; valid: {SUPPORTED_ROPE_TYPES}"
    )
  factor = float(config_dict.get("partial_rotary_factor") or params.get("partial_rotary_factor", 1))
  if factor != 1.0:
    raise UnsupportedArchitectureError(f"partial_rotary_factor={factor} is not supported (only 1)")
  if rope_type == "default":
    return float(theta), None
  try:
    scaling = RopeScaling(
      factor=float(params["factor"]),
      low_freq_factor=float(params["low_freq_factor"]),
      high_freq_factor=float(params["high_freq_factor"]),
      original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
  except KeyError as e:
    raise ModelFileError(f"HF config: llama3 rope scaling lacks the field {e.args[0]!r}") from e
  return float(theta), scaling


# transformers' MistralConfig / Qwen2Config default when config.json has no `sliding_window`.
_HF_DEFAULT_SLIDING_WINDOW = 4096
_HF_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2Config's default.


def _sliding_window(config_dict: Mapping[str, Any], model_type: str, n_layers: int) -> int | None:
  """The attention window transformers applies to some layer of this config, else None.

  Llama: none (LlamaForCausalLM has no window). Mistral: `sliding_window` on every layer (null:
  none; absent: MistralConfig's default 4096). Qwen2: `sliding_window` only with
  `use_sliding_window`, on the layers `layer_types` marks "sliding_attention" or, without
  `layer_types`, from layer `max_window_layers` on. A window on any layer is recorded: the model
  attends fully causally on all layers, which is exact only up to the window.
  """
  if model_type == "llama":
    return None
  window = config_dict.get("sliding_window", _HF_DEFAULT_SLIDING_WINDOW)
  if model_type in _QWEN:
    if not config_dict.get("use_sliding_window"):
      return None
    layer_types = config_dict.get("layer_types")
    if layer_types is not None:
      if "sliding_attention" not in layer_types:
        return None
    elif int(config_dict.get("max_window_layers", _HF_DEFAULT_MAX_WINDOW_LAYERS)) >= n_layers:
      return None
  if window is None:
    return None
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ModelFileError(
      f"HF config: sliding_window={window!r} is not valid; it must be a positive integer or null"
    )
  return window


def config_from_hf(config_dict: Mapping[str, Any]) -> LlamaConfig:
  """`LlamaConfig` of an HF `config.json` (parsed) of model_type llama, mistral or qwen2.

  Raises `UnsupportedArchitectureError` for another model_type or an unsupported variant
  (activation, biases, RoPE type, quantization) and `ModelFileError` for a missing field.
  """
  model_type = config_dict.get("model_type")
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedArchitectureError(
      f"HF model_type={model_type!r} is not supported; valid: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
  act = config_dict.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedArchitectureError(f"{model_type}: hidden_act={act!r} is not supported (silu)")
  if config_dict.get("quantization_config"):
    method = config_dict["quantization_config"].get("quant_method")
    raise UnsupportedArchitectureError(
      f"{model_type}: quantized checkpoints (quant_method={method!r}) are not supported; "
      "use an unquantized (float32/bfloat16/float16) checkpoint"
    )
  for flag in ("attention_bias", "mlp_bias"):
    if model_type in ("llama", "qwen3", "qwen3_moe") and config_dict.get(flag):
      raise UnsupportedArchitectureError(f"{model_type}: {flag}=True is not supported")

  d_model = int(_required(config_dict, "hidden_size"))
  n_heads = int(_required(config_dict, "num_attention_heads"))
  n_kv = int(config_dict.get("num_key_value_heads") or n_heads)
  head_dim = config_dict.get("head_dim") or d_model // n_heads
  theta, scaling = _rope(config_dict)
  n_layers = int(_required(config_dict, "num_hidden_layers"))
  moe = _experts(config_dict, n_layers) if model_type == "qwen3_moe" else None
  return LlamaConfig(
    vocab_size=int(_required(config_dict, "vocab_size")),
    d_model=d_model,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=n_kv,
    head_dim=int(head_dim),
    d_ff=int(_required(config_dict, "intermediate_size")),
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(config_dict.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(config_dict.get("tie_word_embeddings", False)),
    qkv_bias=model_type == "qwen2",
    max_seq_len=int(config_dict.get("max_position_embeddings", 8192)),
    architecture=model_type,
    sliding_window=_sliding_window(config_dict, model_type, n_layers),
    qk_norm=model_type in ("qwen3", "qwen3_moe"),
    moe=moe,
  )


def _experts(config_dict: Mapping[str, Any], n_layers: int) -> MixtureOfExperts:
  """The experts of a Qwen3-MoE config: the hub's `num_experts` or transformers 5's
  `num_local_experts`. Every layer must be a MoE layer (`decoder_sparse_step` 1 and no
  `mlp_only_layers`, as in every released Qwen3-MoE): a mixed stack is refused."""
  n_experts = config_dict.get("num_experts", config_dict.get("num_local_experts"))
  if n_experts is None:
    raise ModelFileError(
      "HF config lacks the required field 'num_experts' (or 'num_local_experts')"
    )
  n_active = int(_required(config_dict, "num_experts_per_tok"))
  if not 1 <= n_active <= int(n_experts):
    raise ModelFileError(
      f"HF config: num_experts_per_tok={n_active} must be in 1..num_experts={n_experts}"
    )
  step = int(config_dict.get("decoder_sparse_step", 1))
  dense = sorted(set(config_dict.get("mlp_only_layers") or ()))
  dense += [i for i in range(n_layers) if step < 1 or (i + 1) % step and i not in dense]
  if dense:
    raise UnsupportedArchitectureError(
      f"qwen3_moe: layers {sorted(dense)} have a dense MLP (decoder_sparse_step={step}, "
      f"mlp_only_layers={config_dict.get('mlp_only_layers')}); only stacks where every layer is "
      "a MoE layer are supported (decoder_sparse_step 1, mlp_only_layers [])"
    )
  return MixtureOfExperts(
    n_experts=int(n_experts),
    n_active=n_active,
    d_ff=int(_required(config_dict, "moe_intermediate_size")),
    norm_topk_prob=bool(config_dict.get("norm_topk_prob", False)),  # Qwen3MoeConfig's default
  )


def config_to_hf(config: LlamaConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """HF `config.json` dict for `config`: Qwen2 when it has q/k/v biases, else Llama (Mistral when
  it has a sliding window, which Llama configs cannot express).

  Written in the transformers-4 style (`rope_theta`, `rope_scaling`), which transformers 4 and 5
  both read. A Qwen2 window is written for every layer (`max_window_layers` 0), though the source
  may have windowed its upper layers only: the two agree up to the window, and the model runs
  nothing longer (`LlamaConfig.check_seq_len`). `extra` (e.g. bos_token_id, eos_token_id) is
  merged in last.
  """
  if config.moe is not None:
    model_type, arch = "qwen3_moe", "Qwen3MoeForCausalLM"
  elif config.qk_norm:
    model_type, arch = "qwen3", "Qwen3ForCausalLM"
  elif config.qkv_bias:
    model_type, arch = "qwen2", "Qwen2ForCausalLM"
  elif config.sliding_window is not None:
    model_type, arch = "mistral", "MistralForCausalLM"
  else:
    model_type, arch = "llama", "LlamaForCausalLM"
  d = {
    "architectures": [arch],
    "model_type": model_type,
    "vocab_size": config.vocab_size,
    "hidden_size": config.d_model,
    "intermediate_size": config.d_ff,
    "num_hidden_layers": config.n_layers,
    "num_attention_heads": config.n_heads,
    "num_key_value_heads": config.n_kv_heads,
    "head_dim": config.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": config.max_seq_len,
    "rms_norm_eps": config.norm_eps,
    "rope_theta": config.rope_theta,
    "rope_scaling": None,
    "tie_word_embeddings": config.tie_embeddings,
    "torch_dtype": "float32",
  }
  if config.rope_scaling is not None:
    s = config.rope_scaling
    d["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position_embeddings,
    }
  if config.rope_freq_factors is not None:
    raise ValueError(
      "config_to_hf: rope_freq_factors (a Llama-3.1 GGUF's rope_freqs) have no HF config form"
    )
  if config.mlp_hidden_hadamard:
    raise ValueError(
      "config_to_hf: mlp_hidden_hadamard (an online Hadamard of down's input, amber_jax.rotate) "
      "has no HF config form; transformers would run the rotated weights without it"
    )
  if model_type in _QWEN:
    windowed = config.sliding_window is not None
    d.update(
      use_sliding_window=windowed,
      sliding_window=config.sliding_window,
      max_window_layers=0 if windowed else config.n_layers,
    )
  elif model_type == "mistral":
    d.update(sliding_window=config.sliding_window)
  else:
    d.update(attention_bias=False, mlp_bias=False)
  if model_type in ("qwen3", "qwen3_moe"):
    d.update(attention_bias=False)
  if config.moe is not None:
    d.update(
      num_experts=config.moe.n_experts,
      num_experts_per_tok=config.moe.n_active,
      moe_intermediate_size=config.moe.d_ff,
      norm_topk_prob=config.moe.norm_topk_prob,
      decoder_sparse_step=1,
      mlp_only_layers=[],
    )
  d.update(extra or {})
  return d


# ----------------------------------------------------------------------------------------------
# Safetensors.


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """One tensor of a safetensors file, not yet read: ``read()`` copies its bytes from the file
  (``os.pread``: no mapping left resident, so a load holds the params and one tensor)."""

  file: pathlib.Path
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # of its first byte in the file

  def read(self) -> np.ndarray:
    out = np.empty(self.shape, self.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.file, "rb", buffering=0) as f:
      done = 0
      while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], self.offset + done)
        if n <= 0:
          raise ModelFileError(f"{os.fspath(self.file)!r}: short read of tensor {self.name!r}")
        done += n
    return out


def safetensors_index(path: str | os.PathLike) -> dict[str, TensorRef]:
  """Every tensor of one safetensors file, as a ``TensorRef`` (nothing read but the header).

  Raises `ModelFileError` naming the file when it is missing, truncated or corrupt (bad header,
  offsets outside the file or not matching dtype x shape, unknown dtype).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ModelFileError(f"safetensors file not found: {os.fspath(path)!r}")
  size = path.stat().st_size

  def bad(why: str) -> ModelFileError:
    return ModelFileError(f"corrupt or truncated safetensors file {os.fspath(path)!r}: {why}")

  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise bad(f"header length {n} does not fit the file size {size}")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise bad(f"header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  header.pop("__metadata__", None)
  data_start = 8 + n
  data_len = size - data_start
  end_max = 0
  refs = {}
  for name, info in header.items():
    try:
      dtype = _ST_DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except KeyError as e:
      raise bad(f"tensor {name!r}: unknown dtype or missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
      raise bad(f"tensor {name!r}: malformed entry {info!r}") from e
    if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
      raise bad(f"tensor {name!r}: offsets {begin}..{end} do not match {info['dtype']}{shape}")
    if end > data_len:
      raise bad(f"tensor {name!r} ends at byte {data_start + end}, past the end ({size} bytes)")
    end_max = max(end_max, end)
    refs[name] = TensorRef(path, name, dtype, shape, data_start + begin)
  if end_max != data_len:
    raise bad(f"data section is {data_len} bytes but tensors cover {end_max}")
  return refs


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one safetensors file, memory-mapped read-only (bf16 via ml_dtypes).

  Raises `ModelFileError` as ``safetensors_index``. (``load_hf_checkpoint`` reads tensor by
  tensor instead, so that no mapping stays resident.)
  """
  refs = safetensors_index(path)
  if not refs:
    return {}
  buf = np.memmap(path, dtype=np.uint8, mode="r")
  return {
    name: np.frombuffer(buf, dtype=r.dtype, count=math.prod(r.shape), offset=r.offset).reshape(
      r.shape
    )
    for name, r in refs.items()
  }


def _weight_files(path: pathlib.Path) -> tuple[list[str], dict[str, str] | None]:
  """(file names, weight_map or None) of the checkpoint in directory `path`."""
  index = path / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise ModelFileError(f"corrupt index file {os.fspath(index)!r}: {e!r}") from e
    files = sorted(set(weight_map.values()))
    for name in files:
      if not (path / name).is_file():
        raise ModelFileError(
          f"shard {name!r} named in {os.fspath(index)!r} is missing: {os.fspath(path / name)!r}"
        )
    return files, weight_map
  if (path / SINGLE_FILE).is_file():
    return [SINGLE_FILE], None
  others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
  hint = f" (found {others}: pickled PyTorch weights are not read; convert to safetensors)"
  raise ModelFileError(
    f"no {SINGLE_FILE!r} or {INDEX_FILE!r} in {os.fspath(path)!r}" + (hint if others else "")
  )


def _read_tensors(path: pathlib.Path) -> dict[str, TensorRef]:
  """name -> ``TensorRef`` of every tensor of the checkpoint in `path` (headers only)."""
  files, weight_map = _weight_files(path)
  tensors: dict[str, TensorRef] = {}
  for name in files:
    tensors.update(safetensors_index(path / name))
  if weight_map is not None:
    for key, name in weight_map.items():
      if key not in tensors or tensors[key].file.name != name:
        raise ModelFileError(
          f"tensor {key!r} is listed in {INDEX_FILE!r} under {name!r} but that file lacks it"
        )
  return tensors


# ----------------------------------------------------------------------------------------------
# Load / save.


def _hf_names(config: LlamaConfig) -> dict[str, Any]:
  """Our params tree with HF tensor names at the leaves: per layer a format string in ``{i}``,
  per expert in ``{i}`` and ``{e}`` (the hub's per-expert tensors)."""
  layers: dict[str, Any] = {k: f"model.layers.{{i}}.{v}.weight" for k, v in _HF_NORM.items()}
  if config.qk_norm:
    layers.update({k: f"model.layers.{{i}}.{v}.weight" for k, v in _HF_HEAD_NORM.items()})
  for site in config.sites:
    p = site.name
    if site.experts:
      layers[p] = {"w": f"model.layers.{{i}}.mlp.experts.{{e}}.{_HF_EXPERT[p]}.weight"}
      continue
    layers[p] = {"w": f"model.layers.{{i}}.{_HF_PROJ[p]}.weight"}
    if config.qkv_bias and p in _BIASED:
      layers[p]["b"] = f"model.layers.{{i}}.{_HF_PROJ[p]}.bias"
  if config.moe is not None:
    layers["router"] = f"model.layers.{{i}}.{_HF_ROUTER}.weight"  # not a site: a plain leaf
  names = {
    "embed": "model.embed_tokens.weight",
    "layers": layers,
    "final_norm": "model.norm.weight",
  }
  if not config.tie_embeddings:
    names["lm_head"] = "lm_head.weight"
  return names


def _expected_shapes(config: LlamaConfig) -> dict[str, Any]:
  """Our params tree with each leaf's shape (layer leaves without the leading L; an expert
  leaf with its expert axis first)."""
  d, v = config.d_model, config.vocab_size
  layers: dict[str, Any] = {"attn_norm": (d,), "mlp_norm": (d,)}
  if config.qk_norm:
    layers.update(q_norm=(config.head_dim,), k_norm=(config.head_dim,))
  for site in config.sites:
    p = site.name
    layers[p] = {"w": ((site.experts,) if site.experts else ()) + site.shape}
    if config.qkv_bias and p in _BIASED:
      layers[p]["b"] = (site.d_out,)
  if config.moe is not None:
    layers["router"] = (d, config.moe.n_experts)
  shapes = {"embed": (v, d), "layers": layers, "final_norm": (d,)}
  if not config.tie_embeddings:
    shapes["lm_head"] = (d, v)
  return shapes


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor an HF checkpoint of ``config`` holds, name -> shape in HF's layout ([d_out,
  d_in] linear weights; the hub's per-expert tensors), in the order ``save_hf_checkpoint``
  writes them. For writers that stream tensor by tensor (benchmarks of loading)."""
  out: dict[str, tuple[int, ...]] = {}

  def walk(names: Any, shapes: Any, key: str, per_layer: bool) -> None:
    if isinstance(names, dict):
      for k in names:
        walk(names[k], shapes[k], k, per_layer or k == "layers")
      return
    shape = tuple(shapes)
    if "{e}" in names:
      shape = shape[1:]  # one tensor per expert
    hf_shape = shape[::-1] if _is_weight_matrix(key, shape) else shape
    for i in range(config.n_layers) if per_layer else [None]:
      for e in range(config.moe.n_experts) if "{e}" in names else [None]:
        out[names.format(i=i, e=e)] = hf_shape

  walk(_hf_names(config), _expected_shapes(config), "", False)
  return out


def _is_weight_matrix(key: str, shape: tuple[int, ...]) -> bool:
  """True for leaves stored transposed relative to HF (linear weights and lm_head; an expert
  weight's last two axes)."""
  return key in ("w", "lm_head", "router") and len(shape) in (2, 3)


def read_hf_config(path: str | os.PathLike) -> LlamaConfig:
  """The `LlamaConfig` of the HF checkpoint directory `path`, read from config.json alone.

  Raises `ModelFileError` for a missing directory or a missing/corrupt config and
  `UnsupportedArchitectureError` for an unsupported model_type or variant.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ModelFileError(f"HF checkpoint directory not found: {os.fspath(path)!r}")
  config_path = path / CONFIG_FILE
  if not config_path.is_file():
    raise ModelFileError(f"HF checkpoint has no config: {os.fspath(config_path)!r} is missing")
  try:
    config_dict = json.loads(config_path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ModelFileError(f"corrupt config file {os.fspath(config_path)!r}: {e}") from e
  if not isinstance(config_dict, dict):
    raise ModelFileError(f"corrupt config file {os.fspath(config_path)!r}: not a JSON object")
  try:
    config = config_from_hf(config_dict)
  except ValueError as e:
    raise type(e)(f"{os.fspath(config_path)!r}: {e}") from e
  except TypeError as e:  # e.g. a field of the wrong JSON type.
    raise ModelFileError(f"{os.fspath(config_path)!r}: {e}") from e

  return config


def load_hf_checkpoint(
  path: str | os.PathLike,
  *,
  dtype: Any = np.float32,
  progress: Callable[[int, int], None] | None = None,
) -> tuple[LlamaConfig, dict[str, Any]]:
  """(config, params) of the HF checkpoint directory `path` (llama, mistral, qwen2, qwen3,
  qwen3_moe).

  Params are numpy arrays of `dtype` (float32 by default; ``ml_dtypes.bfloat16`` keeps a bf16
  checkpoint bf16), layers stacked along axis 0, linear weights [d_in, d_out], expert weights
  [E, d_in, d_out], the router ``layers/router`` [d_model, E] (a plain leaf: not a site).
  Streamed: each stacked array is allocated once and filled tensor by tensor, read from the
  file without a mapping, so the peak host memory is the params plus one tensor
  (BENCHMARKS.md). Expert weights are read from the hub's per-expert tensors
  (``mlp.experts.{e}.gate_proj.weight``) or transformers 5's stacked ones
  (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]).
  ``progress(done, total)`` is called after each stacked array.

  Raises `ModelFileError` naming the file for a missing directory, config, shard or tensor
  (an expert's by name), a truncated or corrupt file, or a tensor whose shape disagrees with
  the config; `UnsupportedArchitectureError` for an unsupported model_type or variant.
  """
  path = pathlib.Path(path)
  config = read_hf_config(path)
  dtype = np.dtype(dtype)
  tensors = _read_tensors(path)
  used: set[str] = set()

  def ref(name: str, hf_shape: tuple[int, ...], what: str = "") -> TensorRef:
    if name not in tensors:
      raise ModelFileError(
        f"tensor {name!r}{what} is missing from the checkpoint in {os.fspath(path)!r}"
      )
    r = tensors[name]
    if r.shape != hf_shape:
      hint = (
        " (head_dim in config.json?)" if name.endswith(("q_norm.weight", "k_norm.weight")) else ""
      )
      raise ModelFileError(
        f"{os.fspath(r.file)!r}: tensor {name!r} has shape {r.shape}, "
        f"expected {hf_shape} from {CONFIG_FILE}{hint}"
      )
    if not np.issubdtype(r.dtype, np.floating) and r.dtype != ml_dtypes.bfloat16:
      raise ModelFileError(f"{os.fspath(r.file)!r}: tensor {name!r} has dtype {r.dtype}")
    used.add(name)
    return r

  def fill(out: np.ndarray, name: str, shape: tuple[int, ...], transpose: bool, what=""):
    arr = ref(name, shape[::-1] if transpose else shape, what).read()
    out[...] = arr.T if transpose else arr

  def fill_experts(out_ExIxO: np.ndarray, name: str, leaf: str, layer: int) -> None:
    e_count, d_in, d_out = out_ExIxO.shape
    if name.format(i=layer, e=0) in tensors:  # the hub's per-expert tensors
      for e in range(e_count):
        fill(out_ExIxO[e], name.format(i=layer, e=e), (d_in, d_out), True, f" (expert {e})")
      return
    stacked = f"model.layers.{layer}.mlp.experts."
    if leaf == "down":
      if stacked + "down_proj" not in tensors:
        ref(name.format(i=layer, e=0), (d_out, d_in), " (expert 0)")  # raises: names the tensor
      out_ExIxO[...] = ref(stacked + "down_proj", (e_count, d_out, d_in)).read().swapaxes(1, 2)
      return
    if stacked + "gate_up_proj" not in tensors:
      ref(name.format(i=layer, e=0), (d_out, d_in), " (expert 0)")
    both = ref(stacked + "gate_up_proj", (e_count, 2 * d_out, d_in)).read()
    part = both[:, :d_out] if leaf == "gate" else both[:, d_out:]
    out_ExIxO[...] = part.swapaxes(1, 2)

  names, shapes = _hf_names(config), _expected_shapes(config)
  leaves = []  # (tree path, hf name, shape, per layer)

  def walk(n, sh, keys, per_layer):
    if isinstance(n, dict):
      for k in n:
        walk(n[k], sh[k], keys + (k,), per_layer or k == "layers")
    else:
      leaves.append((keys, n, tuple(sh), per_layer))

  walk(names, shapes, (), False)
  params: dict[str, Any] = {}
  for done, (keys, name, shape, per_layer) in enumerate(leaves, 1):
    transpose = _is_weight_matrix(keys[-1], shape)
    out = np.empty(((config.n_layers,) if per_layer else ()) + shape, dtype)
    if not per_layer:
      fill(out, name, shape, transpose)
    for i in range(config.n_layers if per_layer else 0):
      if "{e}" in name:
        fill_experts(out[i], name, keys[-2], i)
      else:
        fill(out[i], name.format(i=i), shape, transpose)
    node = params
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = out
    if progress is not None:
      progress(done, len(leaves))
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
  extra = sorted(
    k for k in tensors if k not in used and k not in ignorable and not k.endswith("inv_freq")
  )
  if extra:
    shown = ", ".join(repr(k) for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
    raise ModelFileError(
      f"checkpoint in {os.fspath(path)!r} has {len(extra)} tensor(s) a {config.architecture} "
      f"model does not use (unsupported variant?): {shown}"
    )
  return config, params


def _tokenizer_text(tokenizer_json: Any) -> str:
  if hasattr(tokenizer_json, "to_str"):  # tokenizers.Tokenizer
    return tokenizer_json.to_str()
  if isinstance(tokenizer_json, os.PathLike):
    return pathlib.Path(tokenizer_json).read_text()
  if isinstance(tokenizer_json, str):
    try:
      json.loads(tokenizer_json)
    except json.JSONDecodeError as e:
      raise ValueError(
        "tokenizer_json must be a tokenizers.Tokenizer, a pathlib.Path to a tokenizer.json, or "
        f"the JSON text itself; got a str that is not JSON: {tokenizer_json[:80]!r}"
      ) from e
    return tokenizer_json
  raise TypeError(f"tokenizer_json: unsupported type {type(tokenizer_json).__name__}")


def save_hf_checkpoint(
  config: LlamaConfig,
  params: Mapping[str, Any],
  path: str | os.PathLike,
  tokenizer_json: Any = None,
  *,
  extra_config: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes `params` as an HF Llama (or, with q/k/v biases, Qwen2) directory at `path`.

  Files: `config.json` (see `config_to_hf`; `extra_config` such as bos/eos token ids is merged
  in), one float32 `model.safetensors`, and `tokenizer.json` when `tokenizer_json` is given (a
  `tokenizers.Tokenizer`, a `pathlib.Path` to a tokenizer.json, or its JSON text). Loadable by
  `transformers.AutoModelForCausalLM.from_pretrained` and by `load_hf_checkpoint`.

  Atomic: everything is written into a temporary directory next to `path`, then renamed. An
  existing `path` raises `FileExistsError` unless `overwrite`. Returns `path`.
  """
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{os.fspath(path)!r} exists; pass overwrite=True to replace it")
  tok_text = None if tokenizer_json is None else _tokenizer_text(tokenizer_json)

  tensors: dict[str, np.ndarray] = {}

  def put(names: Any, shapes: Any, tree: Any, key: str, where: str, per_layer: bool) -> None:
    if isinstance(names, dict):
      if not isinstance(tree, Mapping):
        raise ValueError(f"params{where} must be a dict, got {type(tree).__name__}")
      for k in names:
        if k not in tree:
          raise ValueError(f"params{where} lacks {k!r} (needed by {config})")
        put(names[k], shapes[k], tree[k], k, f"{where}[{k!r}]", per_layer or k == "layers")
      return
    arr = np.asarray(tree, dtype=np.float32)
    want = ((config.n_layers,) if per_layer else ()) + tuple(shapes)
    if arr.shape != want:
      raise ValueError(f"params{where} has shape {arr.shape}, expected {want} from the config")
    transpose = _is_weight_matrix(key, shapes)
    for i, a in enumerate(arr if per_layer else [arr]):
      if "{e}" in names:  # one tensor per expert, as the hub's checkpoints
        for e, a_e in enumerate(a):
          tensors[names.format(i=i, e=e)] = np.ascontiguousarray(a_e.T)
        continue
      name = names.format(i=i) if per_layer else names
      tensors[name] = np.ascontiguousarray(a.T if transpose else a)

  put(_hf_names(config), _expected_shapes(config), params, "", "", False)

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir()
    (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, extra_config), indent=2) + "\n")
    save_file(tensors, os.fspath(tmp / SINGLE_FILE), metadata={"format": "pt"})
    if tok_text is not None:
      (tmp / TOKENIZER_FILE).write_text(tok_text)
    if path.exists():
      path.rename(old)
    tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not path.exists():
      old.rename(path)
    raise
  shutil.rmtree(old, ignore_errors=True)
  return path
