"""GGUF (llama.cpp) files of the Llama family: config, weights and tokenizer.

Architectures (``general.architecture``), with what llama.cpp's converter
(``convert_hf_to_gguf.py``) writes into each:

- ``llama``: Llama 1-3.x, SmolLM2, and Mistral: the converter writes ``MistralForCausalLM``
  (and Mistral's own consolidated format before Ministral 3) as ``llama``. Optional q/k/v biases.
  Llama-3.1 RoPE scaling arrives as the ``rope_freqs`` tensor (per-frequency divisors, computed by
  the converter's ``LlamaModel.generate_extra_tensors``), read into ``rope_freq_factors``.
- ``mistral3``: the text decoder of ``Mistral3ForConditionalGeneration`` (Mistral Small 3.x) and
  ``Ministral3ForCausalLM``: the same tensors as ``llama``. Ministral 3's YaRN RoPE and Llama-4
  attention temperature (``attention.temperature_scale``) are not implemented and refused.
  There is no plain ``mistral`` architecture in llama.cpp (gguf-py's ``MODEL_ARCH``).
- ``qwen2``: q/k/v biases (required).
- ``qwen3``: per-head RMSNorm of queries and keys (``attn_q_norm``, ``attn_k_norm`` [head_dim]).
- ``qwen3moe``: Qwen3 attention and, in every layer, a mixture of experts: the router
  ``ffn_gate_inp`` and the 3-D ``ffn_{gate,up,down}_exps`` tensors (experts first).
  ``norm_topk_prob``: llama.cpp's qwen3moe graph always renormalises the top-k weights (its
  ``build_moe_ffn`` is called with ``norm_w = true``, and the converter writes no key for it; every
  released Qwen3-MoE sets ``norm_topk_prob: true``), so True, unless the file carries
  ``{arch}.expert_weights_norm``, which then decides (llama.cpp ignores that key for qwen3moe).

Weights are dequantized to float32 (``gguf.quants.dequantize``), one tensor at a time, into
arrays allocated once per parameter (layers stacked on axis 0): the same tree, shapes and dtype as
``amber_jax.io.hf.load_hf_checkpoint``. llama.cpp stores the q/k rows of the architectures it
ropes in the interleaved ("normal") convention (llama, mistral3) permuted; they are permuted back
here so the model can use the rotate-half convention of HF checkpoints (without this the default
model's perplexity is about 425 instead of 33). The Qwen architectures use llama.cpp's NeoX RoPE,
which is rotate-half: their rows are stored as in HF and used as they are.

Every tensor's shape is checked against the metadata, and a tensor the model would not use (an
unsupported variant) is refused: a loaded file is computed exactly as its architecture says.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.model.config import LlamaConfig, MixtureOfExperts


def _gguf():
  import gguf

  return gguf


@dataclasses.dataclass(frozen=True)
class _Family:
  """What one GGUF architecture holds (see the module docstring)."""

  architecture: str  # LlamaConfig.architecture: the HF model_type of the family
  interleaved_rope: bool  # q/k rows stored permuted (llama.cpp's LLAMA_ROPE_TYPE_NORM)
  qkv_bias: str  # "optional" (detected), "required" or "none"
  qk_norm: bool = False
  moe: bool = False
  rope_freqs: bool = False  # llama.cpp's graph divides the RoPE frequencies by rope_freqs


_FAMILIES = {
  "llama": _Family(
    architecture="llama", interleaved_rope=True, qkv_bias="optional", rope_freqs=True
  ),
  "mistral3": _Family(
    architecture="mistral", interleaved_rope=True, qkv_bias="optional", rope_freqs=True
  ),
  "qwen2": _Family(architecture="qwen2", interleaved_rope=False, qkv_bias="required"),
  "qwen3": _Family(architecture="qwen3", interleaved_rope=False, qkv_bias="none", qk_norm=True),
  "qwen3moe": _Family(
    architecture="qwen3_moe", interleaved_rope=False, qkv_bias="none", qk_norm=True, moe=True
  ),
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)

# Our linear sites -> gguf-py's tensor kinds (MODEL_TENSOR member names).
_LINEAR_TENSORS = {
  "q": "ATTN_Q",
  "k": "ATTN_K",
  "v": "ATTN_V",
  "o": "ATTN_OUT",
  "gate": "FFN_GATE",
  "up": "FFN_UP",
  "down": "FFN_DOWN",
}
_EXPERT_TENSORS = {"gate": "FFN_GATE_EXP", "up": "FFN_UP_EXP", "down": "FFN_DOWN_EXP"}


def _tensor_name(kind: str, layer: int | str | None = None, suffix: str = "weight") -> str:
  """The GGUF name of tensor kind ``kind`` (a ``gguf.MODEL_TENSOR`` member name) in block
  ``layer`` (``"{i}"``: a template to format per layer)."""
  gguf = _gguf()
  template = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]]
  return (template.format(bid=layer) if layer is not None else template) + f".{suffix}"


def _reader(path: str | os.PathLike):
  gguf = _gguf()

  if not os.path.isfile(path):
    raise ModelFileError(f"model file not found: {os.fspath(path)!r}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files.
    raise ModelFileError(
      f"cannot read GGUF file {os.fspath(path)!r} (corrupt or truncated?): {e}"
    ) from e


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _read_tensor(t, path) -> np.ndarray:
  """One GGUF tensor dequantized to float32, in numpy order (ggml's dimensions reversed)."""
  gguf = _gguf()
  try:
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
  except Exception as e:
    raise ModelFileError(f"{os.fspath(path)!r}: cannot dequantize {t.name!r}: {e}") from e
  return np.asarray(arr, np.float32).reshape([int(d) for d in reversed(t.shape)])


class _Meta:
  """Typed reads of ``{arch}.*`` metadata, with errors that name the file and the key."""

  def __init__(self, reader, path, arch: str):
    self.reader, self.path, self.arch = reader, os.fspath(path), arch

  def key(self, template: str) -> str:
    return template.format(arch=self.arch)

  def get(self, template: str, default=None, kind: type = int):
    key = self.key(template)
    value = _field(self.reader, key)
    if value is None:
      return default
    try:
      if kind is int and (isinstance(value, float) or int(value) != value):
        raise TypeError
      return kind(value)
    except (TypeError, ValueError):
      raise ModelFileError(
        f"{self.path!r}: GGUF metadata '{key}' is {value!r}; expected a {kind.__name__}"
      ) from None

  def req(self, template: str, kind: type = int):
    value = self.get(template, kind=kind)
    if value is None:
      raise ModelFileError(f"{self.path!r}: GGUF metadata lacks '{self.key(template)}'")
    return value

  def unsupported(self, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"{self.path!r}: {what} is not supported")


def _family(reader, path) -> tuple[str, _Family]:
  arch = _field(reader, "general.architecture")
  if arch not in _FAMILIES:
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: GGUF architecture {arch!r} is not supported; "
      f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
  return arch, _FAMILIES[arch]


def _check_rope_and_attention(m: _Meta, head_dim: int) -> None:
  """Refuses the RoPE and attention variants the model does not implement."""
  K = _gguf().Keys
  scaling = _field(m.reader, m.key(K.Rope.SCALING_TYPE))
  if scaling not in (None, "none"):
    raise m.unsupported(
      f"RoPE scaling type {scaling!r} ('{m.key(K.Rope.SCALING_TYPE)}'; supported: none, and "
      "Llama-3.1 scaling as a rope_freqs tensor)"
    )
  # Without a type, llama.cpp reads a scaling factor as linear scaling (1 / factor).
  for template in (K.Rope.SCALING_FACTOR, "{arch}.rope.scale_linear"):
    factor = m.get(template, kind=float)
    if factor not in (None, 0.0, 1.0):
      raise m.unsupported(f"linear RoPE scaling ('{m.key(template)}' = {factor})")
  temperature = m.get(K.Attention.TEMPERATURE_SCALE, kind=float)
  if temperature not in (None, 0.0):
    raise m.unsupported(
      f"Llama-4 attention temperature scaling ('{m.key(K.Attention.TEMPERATURE_SCALE)}' = "
      f"{temperature})"
    )
  scale = m.get(K.Attention.SCALE, kind=float)
  if scale not in (None, 0.0) and not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
    raise m.unsupported(
      f"an attention scale other than 1/sqrt(head_dim) ('{m.key(K.Attention.SCALE)}' = {scale}, "
      f"head_dim {head_dim})"
    )


def _experts(m: _Meta, fam: _Family, d_ff: int | None) -> MixtureOfExperts | None:
  """The mixture of experts of a qwen3moe file; refuses experts anywhere else (Mixtral)."""
  K = _gguf().Keys
  n_experts = m.get(K.LLM.EXPERT_COUNT)
  if not fam.moe:
    if n_experts:
      raise m.unsupported(
        f"a {m.arch} GGUF with experts ('{m.key(K.LLM.EXPERT_COUNT)}' = {n_experts}: Mixtral style)"
      )
    return None
  if n_experts is None or n_experts < 1:
    raise ModelFileError(
      f"{m.path!r}: GGUF metadata '{m.key(K.LLM.EXPERT_COUNT)}' is {n_experts!r}; a {m.arch} "
      "file needs a number of experts >= 1"
    )
  n_active = m.req(K.LLM.EXPERT_USED_COUNT)
  if not 1 <= n_active <= n_experts:
    raise ModelFileError(
      f"{m.path!r}: GGUF metadata '{m.key(K.LLM.EXPERT_USED_COUNT)}' = {n_active} must be in "
      f"1..'{m.key(K.LLM.EXPERT_COUNT)}' = {n_experts}"
    )
  # llama.cpp's fallback when the expert width is absent: feed_forward_length / experts used.
  expert_ff = m.get(K.LLM.EXPERT_FEED_FORWARD_LENGTH)
  if expert_ff is None:
    if d_ff is None:
      raise ModelFileError(
        f"{m.path!r}: GGUF metadata lacks '{m.key(K.LLM.EXPERT_FEED_FORWARD_LENGTH)}'"
      )
    expert_ff = d_ff // n_active
  shared = m.get(K.LLM.EXPERT_SHARED_COUNT)
  if shared:
    raise m.unsupported(f"shared experts ('{m.key(K.LLM.EXPERT_SHARED_COUNT)}' = {shared})")
  dense = m.get(K.LLM.LEADING_DENSE_BLOCK_COUNT)
  if dense:
    raise m.unsupported(
      f"dense leading layers ('{m.key(K.LLM.LEADING_DENSE_BLOCK_COUNT)}' = {dense}; every layer "
      "must be a MoE layer)"
    )
  gating = m.get(K.LLM.EXPERT_GATING_FUNC)
  softmax = int(_gguf().ExpertGatingFuncType.SOFTMAX)
  if gating not in (None, softmax):
    raise m.unsupported(
      f"expert gating function {gating} ('{m.key(K.LLM.EXPERT_GATING_FUNC)}'; supported: "
      f"{softmax}, softmax)"
    )
  weights_scale = m.get(K.LLM.EXPERT_WEIGHTS_SCALE, kind=float)
  if weights_scale not in (None, 0.0, 1.0):
    raise m.unsupported(
      f"scaled expert weights ('{m.key(K.LLM.EXPERT_WEIGHTS_SCALE)}' = {weights_scale})"
    )
  norm = _field(m.reader, m.key(K.LLM.EXPERT_WEIGHTS_NORM))
  return MixtureOfExperts(
    n_experts=n_experts,
    n_active=n_active,
    d_ff=expert_ff,
    norm_topk_prob=True if norm is None else bool(norm),
  )


def _config_from_reader(reader, path, read: Callable[[Any], np.ndarray]) -> LlamaConfig:
  """The config of a GGUF; ``read`` dequantizes a tensor (only ``rope_freqs`` is read here)."""
  K = _gguf().Keys
  arch, fam = _family(reader, path)
  m = _Meta(reader, path, arch)
  d_model = m.req(K.LLM.EMBEDDING_LENGTH)
  n_heads = m.req(K.Attention.HEAD_COUNT)
  n_kv = m.get(K.Attention.HEAD_COUNT_KV, n_heads)
  if n_heads < 1 or n_kv < 1 or n_heads % n_kv:
    raise ModelFileError(
      f"{m.path!r}: GGUF metadata '{m.key(K.Attention.HEAD_COUNT)}' = {n_heads} must be a "
      f"positive multiple of '{m.key(K.Attention.HEAD_COUNT_KV)}' = {n_kv}"
    )
  # As llama.cpp: head width from key_length (else d_model / heads), rotated width from
  # rope.dimension_count (else the head width).
  head_dim = m.get(K.Attention.KEY_LENGTH, d_model // n_heads)
  value_dim = m.get(K.Attention.VALUE_LENGTH, head_dim)
  rope_dim = m.get(K.Rope.DIMENSION_COUNT, head_dim)
  if value_dim != head_dim:
    raise m.unsupported(
      f"value heads of another width than key heads ('{m.key(K.Attention.VALUE_LENGTH)}' = "
      f"{value_dim}, '{m.key(K.Attention.KEY_LENGTH)}' = {head_dim})"
    )
  if rope_dim != head_dim:
    raise m.unsupported(
      f"partial RoPE ('{m.key(K.Rope.DIMENSION_COUNT)}' = {rope_dim} of head width {head_dim})"
    )
  _check_rope_and_attention(m, head_dim)
  tensors = {t.name: t for t in reader.tensors}

  vocab = m.get(K.LLM.VOCAB_SIZE)
  if vocab is None:
    tokens = _field(reader, K.Tokenizer.LIST)
    if tokens is None:
      raise ModelFileError(
        f"{m.path!r}: GGUF metadata lacks '{m.key(K.LLM.VOCAB_SIZE)}' and "
        f"'{K.Tokenizer.LIST}' (the vocabulary size)"
      )
    vocab = len(tokens)
  d_ff = m.get(K.LLM.FEED_FORWARD_LENGTH)
  moe = _experts(m, fam, d_ff)
  if d_ff is None:
    if moe is None:
      raise ModelFileError(f"{m.path!r}: GGUF metadata lacks '{m.key(K.LLM.FEED_FORWARD_LENGTH)}'")
    d_ff = moe.d_ff  # Unused by a MoE stack.

  rope_freq_factors = None
  freqs_name = _tensor_name("ROPE_FREQS")
  if freqs_name in tensors and fam.rope_freqs:
    factors = read(tensors[freqs_name])
    if factors.shape != (head_dim // 2,):
      raise ModelFileError(
        f"{m.path!r}: GGUF tensor {freqs_name!r} has shape {factors.shape}, expected "
        f"({head_dim // 2},) (head_dim / 2) from the metadata"
      )
    if not np.all(np.isfinite(factors) & (factors > 0)):
      raise ModelFileError(
        f"{m.path!r}: GGUF tensor {freqs_name!r} holds non-positive or non-finite RoPE "
        "frequency factors"
      )
    rope_freq_factors = tuple(float(f) for f in factors)

  if fam.qkv_bias == "optional":
    qkv_bias = _tensor_name("ATTN_Q", 0, "bias") in tensors
  else:
    qkv_bias = fam.qkv_bias == "required"
  # A window the file records is kept (LlamaConfig.check_seq_len enforces it). GGUFs of the
  # llama architecture usually record none, even for Mistral v0.1: None here is what the file
  # says, not proof that the source model attends fully.
  window = m.get(K.Attention.SLIDING_WINDOW)
  try:
    return LlamaConfig(
      vocab_size=vocab,
      d_model=d_model,
      n_layers=m.req(K.LLM.BLOCK_COUNT),
      n_heads=n_heads,
      n_kv_heads=n_kv,
      head_dim=head_dim,
      d_ff=d_ff,
      rope_theta=m.get(K.Rope.FREQ_BASE, 10000.0, kind=float),
      rope_freq_factors=rope_freq_factors,
      norm_eps=m.get(K.Attention.LAYERNORM_RMS_EPS, 1e-5, kind=float),
      tie_embeddings=_tensor_name("OUTPUT") not in tensors,
      qkv_bias=qkv_bias,
      max_seq_len=m.get(K.LLM.CONTEXT_LENGTH, 8192),
      architecture=fam.architecture,
      sliding_window=window or None,  # 0: none, as in llama.cpp.
      qk_norm=fam.qk_norm,
      moe=moe,
    )
  except ValueError as e:  # LlamaConfig's own checks (e.g. an odd head_dim).
    raise ModelFileError(f"{m.path!r}: GGUF metadata gives an invalid config: {e}") from e


def read_gguf_config(path: str | os.PathLike) -> LlamaConfig:
  """The `LlamaConfig` of a GGUF file, from its metadata (and its tiny ``rope_freqs`` tensor).

  Cheap (the file is memory-mapped, no weight is read), so flags can be validated first. Raises
  `ModelFileError` for a missing, corrupt or inconsistent file and
  `UnsupportedArchitectureError` for an architecture or variant this library does not implement
  (the message lists the supported architectures).
  """
  reader = _reader(path)
  return _config_from_reader(reader, path, lambda t: _read_tensor(t, path))


def _unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf.py's ``LlamaModel.permute`` on the rows of q or k."""
  d_out, d_in = w_OxI.shape
  head_dim = d_out // n_heads
  return w_OxI.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One parameter: where it goes, which GGUF tensor fills it (``{i}``: the layer) and how."""

  keys: tuple[str, ...]  # path in the params tree
  tensor: str  # GGUF tensor name, with ``{i}`` for per-layer tensors
  file_shape: tuple[int, ...]  # the tensor's numpy shape the config implies (one layer)
  convert: Callable[[np.ndarray], np.ndarray]  # file layout -> ours
  hint: str = ""

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.tensor


def _transpose(a: np.ndarray) -> np.ndarray:
  return a.T


def _swap_last(a: np.ndarray) -> np.ndarray:
  return a.swapaxes(-1, -2)


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _leaves(config: LlamaConfig, fam: _Family, arch: str) -> list[_Leaf]:
  """Every parameter of ``config`` with its GGUF tensor, in file order."""
  K = _gguf().Keys
  d, v, hd = config.d_model, config.vocab_size, config.head_dim
  per = lambda kind, suffix="weight": _tensor_name(kind, "{i}", suffix)
  leaves = [
    _Leaf(("embed",), _tensor_name("TOKEN_EMBD"), (v, d), _identity),
    _Leaf(("final_norm",), _tensor_name("OUTPUT_NORM"), (d,), _identity),
  ]
  if not config.tie_embeddings:
    leaves.append(_Leaf(("lm_head",), _tensor_name("OUTPUT"), (v, d), _transpose))
  leaves += [
    _Leaf(("layers", "attn_norm"), per("ATTN_NORM"), (d,), _identity),
    _Leaf(("layers", "mlp_norm"), per("FFN_NORM"), (d,), _identity),
  ]
  if config.qk_norm:
    hint = f" (head_dim {hd}: '{K.Attention.KEY_LENGTH.format(arch=arch)}')"
    for leaf, kind in (("q_norm", "ATTN_Q_NORM"), ("k_norm", "ATTN_K_NORM")):
      leaves.append(_Leaf(("layers", leaf), per(kind), (hd,), _identity, hint))
  heads = {"q": config.n_heads, "k": config.n_kv_heads}
  for site in config.sites:
    p = site.name
    if site.experts:
      e = site.experts
      leaves.append(
        _Leaf(("layers", p, "w"), per(_EXPERT_TENSORS[p]), (e, site.d_out, site.d_in), _swap_last)
      )
      continue
    unpermute = fam.interleaved_rope and p in heads
    if unpermute:
      n = heads[p]
      w_conv = lambda a, n=n: _unpermute_rope_rows(a, n).T
      b_conv = lambda a, n=n: _unpermute_rope_rows(a[:, None], n)[:, 0]
    else:
      w_conv, b_conv = _transpose, _identity
    kind = _LINEAR_TENSORS[p]
    leaves.append(_Leaf(("layers", p, "w"), per(kind), (site.d_out, site.d_in), w_conv))
    if config.qkv_bias and p in ("q", "k", "v"):
      leaves.append(_Leaf(("layers", p, "b"), per(kind, "bias"), (site.d_out,), b_conv))
  if config.moe is not None:
    leaves.append(
      _Leaf(("layers", "router"), per("FFN_GATE_INP"), (config.moe.n_experts, d), _transpose)
    )
  return leaves


def _leaf_name(keys: tuple[str, ...]) -> str:
  return "/".join(keys)


def load_gguf(
  path: str | os.PathLike,
  progress: Callable[[int, int], None] | None = None,
  *,
  dtype: Any = np.float32,
) -> tuple[LlamaConfig, dict]:
  """(config, numpy params of ``dtype`` in our layout) of a GGUF file (see
  ``SUPPORTED_ARCHITECTURES``). float32 by default; ``ml_dtypes.bfloat16`` rounds each
  dequantized tensor to bf16 as it is stored.

  The params tree, shapes and dtype are those of ``amber_jax.io.hf.load_hf_checkpoint``: layers
  stacked on axis 0, linear weights [d_in, d_out], expert weights [E, d_in, d_out], the router
  [d_model, E]. Streamed: each stacked array is allocated once and filled layer by layer, one
  tensor dequantized at a time. ``progress(done, total)`` is called after each tensor read.

  Raises `ModelFileError` naming the file (and the tensor) for a missing, corrupt or truncated
  file, a missing tensor, a tensor whose shape disagrees with the metadata or one the model does
  not use; `UnsupportedArchitectureError` for another architecture (the message lists the
  supported ones) or an unsupported variant (RoPE scaling type, experts outside qwen3moe, ...).
  """
  dtype = np.dtype(dtype)
  reader = _reader(path)
  tensors = {t.name: t for t in reader.tensors}
  total = len(tensors)
  done = 0

  def read(t) -> np.ndarray:
    nonlocal done
    arr = _read_tensor(t, path)
    done += 1
    if progress is not None:
      progress(done, total)
    return arr

  config = _config_from_reader(reader, path, read)
  arch, fam = _family(reader, path)
  leaves = _leaves(config, fam, arch)
  n_layers = config.n_layers

  if config.moe is None and _tensor_name("FFN_GATE_INP", 0) in tensors:
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: a {arch} GGUF with experts (tensor "
      f"{_tensor_name('FFN_GATE_INP', 0)!r}: Mixtral style) is not supported"
    )
  # Every tensor is checked before any is read: a missing one is named, an unused one refused.
  wanted = [
    leaf.tensor.format(i=i)
    for leaf in leaves
    for i in (range(n_layers) if leaf.per_layer else [None])
  ]
  for name in wanted:
    if name not in tensors:
      raise ModelFileError(f"{os.fspath(path)!r}: GGUF tensor {name!r} is missing")
  used = set(wanted) | ({_tensor_name("ROPE_FREQS")} if config.rope_freq_factors else set())
  extra = sorted(set(tensors) - used)
  if extra:
    shown = ", ".join(repr(k) for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
    raise ModelFileError(
      f"{os.fspath(path)!r}: GGUF has {len(extra)} tensor(s) a {arch} model of this config does "
      f"not use (unsupported variant?): {shown}"
    )

  params: dict[str, Any] = {}
  for leaf in leaves:
    ours = leaf.convert(np.empty(leaf.file_shape, np.float32)).shape
    lead = (n_layers,) if leaf.per_layer else ()
    out = np.empty(lead + ours, dtype)
    for i in range(n_layers) if leaf.per_layer else [None]:
      name = leaf.tensor.format(i=i)
      t = tensors[name]
      file_shape = tuple(int(x) for x in reversed(t.shape))
      if file_shape != leaf.file_shape:
        try:  # Our layout of the tensor as stored, beside what the metadata implies.
          got_shape = lead + leaf.convert(np.empty(file_shape, np.float32)).shape
        except (ValueError, IndexError):
          got_shape = file_shape
        raise ModelFileError(
          f"{os.fspath(path)!r}: tensor {_leaf_name(leaf.keys)} has shape {got_shape}, expected "
          f"{lead + ours} from the metadata: GGUF tensor {name!r} is stored as {file_shape}, "
          f"expected {leaf.file_shape}{leaf.hint}"
        )
      arr = leaf.convert(read(t))
      if i is None:
        out[...] = arr
      else:
        out[i] = arr
    node = params
    for k in leaf.keys[:-1]:
      node = node.setdefault(k, {})
    node[leaf.keys[-1]] = out
  return config, params


# ----------------------------------------------------------------------------------------------
# Tokenizer.

# tokenizer.ggml.pre values we rebuild (llama.cpp's names; "deepseek-r1-qwen" is its alias of
# the qwen2 split).
_PRE_TOKENIZERS = ("smollm", "gpt2", "default", "llama-bpe", "qwen2", "deepseek-r1-qwen")
# Llama-3's split (llama.cpp's LLAMA3 pre-tokenizer): digits in groups of up to three.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2/Qwen3's split (the regex of their tokenizer.json, which llama.cpp's QWEN2 pre-tokenizer
# rewrites without the (?i:...) group): single digits.
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_gguf_tokenizer(path: str | os.PathLike):
  """Rebuilds the GGUF's byte-level BPE tokenizer as a ``tokenizers.Tokenizer``.

  Pre-splits (``tokenizer.ggml.pre``): smollm (single digits, then GPT-2's split), gpt2 and
  default (GPT-2's split), llama-bpe (Llama-3's), qwen2 and deepseek-r1-qwen (Qwen2/Qwen3's:
  single digits; with NFC normalisation, as their HF tokenizer.json, which llama.cpp skips: the
  two differ only on text that is not NFC). A BOS is prepended as llama.cpp does (see
  ``_bos_to_add``): by default only for llama-bpe, never for qwen2. Raises
  `UnsupportedArchitectureError` for another tokenizer model or pre-split, `ModelFileError` for a
  missing or corrupt file.
  """
  from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
  )

  reader = _reader(path)
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: tokenizer model {kind!r} is not supported; supported: 'gpt2' "
      "(byte-level BPE)"
    )
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: tokenizer pre-split {pre!r} is not supported; supported: "
      f"{', '.join(_PRE_TOKENIZERS)}"
    )
  tokens = _field(reader, "tokenizer.ggml.tokens")
  types = _field(reader, "tokenizer.ggml.token_type")
  merges_field = _field(reader, "tokenizer.ggml.merges")
  if tokens is None or types is None or merges_field is None:
    raise ModelFileError(
      f"{os.fspath(path)!r}: GGUF tokenizer lacks tokenizer.ggml.tokens, token_type or merges"
    )
  merges = [tuple(m.split(" ", 1)) for m in merges_field]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  split = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
  if pre == "smollm":
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  elif pre in split:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(split[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  else:
    tokenizer.pre_tokenizer = byte_level
  if split.get(pre) is _QWEN2_SPLIT:
    tokenizer.normalizer = normalizers.NFC()
  tokenizer.decoder = decoders.ByteLevel()
  control = [tok for tok, ty in zip(tokens, types, strict=True) if int(ty) == 3]
  bos = _bos_to_add(reader, path, pre, tokens)
  if bos is not None and bos not in control:
    control.append(bos)  # So that decode(skip_special_tokens=True) drops it.
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
  if bos is not None:
    bos_id = tokens.index(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{bos}:0 $A:0",
      pair=f"{bos}:0 $A:0 {bos}:1 $B:1",  # As HF's Llama-3 tokenizer.json.
      special_tokens=[(bos, bos_id)],
    )
  return tokenizer


# llama.cpp's pre-tokenizer types whose vocab adds a BOS when the GGUF has no
# tokenizer.ggml.add_bos_token (the LLAMA3 group of llama-vocab.cpp; of ours, llama-bpe).
_PRE_ADD_BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe")


def _bos_to_add(reader, path, pre: str, tokens: list[str]) -> str | None:
  """The BOS token string to prepend to every encoding, or None when the GGUF adds none.

  ``tokenizer.ggml.add_bos_token`` decides when present. When absent we use llama.cpp's default
  (``llama_vocab::impl::load`` in llama-vocab.cpp), the reference reader of these files: a
  byte-level BPE ("gpt2") vocab adds no BOS, except with a Llama-3 pre-tokenizer (``llama-bpe``),
  for which it adds one. Llama-3 GGUFs written by older converters carry no flag. Qwen2/Qwen3
  (``qwen2``) add none, as their HF tokenizers (which have no BOS token).
  """
  flag = _field(reader, "tokenizer.ggml.add_bos_token")
  add_bos = pre in _PRE_ADD_BOS_BY_DEFAULT if flag is None else bool(flag)
  if not add_bos:
    return None
  bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
  if bos_id is None or not 0 <= int(bos_id) < len(tokens):
    raise ModelFileError(
      f"{os.fspath(path)!r}: the GGUF tokenizer adds a BOS token but tokenizer.ggml.bos_token_id "
      f"is {bos_id!r}; it must be a token id in [0, {len(tokens)})"
    )
  return tokens[int(bos_id)]
