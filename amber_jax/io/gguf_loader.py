"""GGUF (llama.cpp) files of the ``llama`` architecture: config, weights and tokenizer.

Weights are dequantized to float32 with ``gguf.quants.dequantize``. llama.cpp
stores the rows of q/k permuted for its interleaved RoPE; they are permuted back
here so the model can use the rotate-half convention of HF checkpoints (without
this the default model's perplexity is about 425 instead of 33).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.model.config import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)

_GGUF_NAMES = {
  "q": "attn_q",
  "k": "attn_k",
  "v": "attn_v",
  "o": "attn_output",
  "gate": "ffn_gate",
  "up": "ffn_up",
  "down": "ffn_down",
}


def _reader(path: str | os.PathLike):
  import gguf

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


def _config_from_reader(reader, path) -> LlamaConfig:
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: GGUF architecture {arch!r} is not supported; "
      f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )

  def req(key):
    value = _field(reader, f"{arch}.{key}")
    if value is None:
      raise ModelFileError(f"{os.fspath(path)!r}: GGUF metadata lacks '{arch}.{key}'")
    return value

  d_model = int(req("embedding_length"))
  n_heads = int(req("attention.head_count"))
  n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
  head_dim = int(_field(reader, f"{arch}.rope.dimension_count", d_model // n_heads))
  tensor_names = {t.name for t in reader.tensors}
  vocab = _field(reader, f"{arch}.vocab_size")
  if vocab is None:
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
  scaling = None
  if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: RoPE scaling type "
      f"{_field(reader, f'{arch}.rope.scaling.type')!r} is not supported"
    )
  if "rope_freqs.weight" in tensor_names:
    # Llama-3.1 GGUFs carry precomputed frequency factors instead of the
    # scaling parameters; we only support the parameterised form.
    raise UnsupportedArchitectureError(
      f"{os.fspath(path)!r}: GGUF rope_freqs tensors (Llama-3.1 scaling) are not supported; "
      "load the HF checkpoint directory instead"
    )
  # A window the file records is kept (LlamaConfig.check_seq_len enforces it). GGUFs of the
  # llama architecture usually record none, even for Mistral v0.1: None here is what the file
  # says, not proof that the source model attends fully.
  window = _field(reader, f"{arch}.attention.sliding_window")
  return LlamaConfig(
    vocab_size=int(vocab),
    d_model=d_model,
    n_layers=int(req("block_count")),
    n_heads=n_heads,
    n_kv_heads=n_kv,
    head_dim=head_dim,
    d_ff=int(req("feed_forward_length")),
    rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
    rope_scaling=scaling,
    norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
    tie_embeddings="output.weight" not in tensor_names,
    qkv_bias="blk.0.attn_q.bias" in tensor_names,
    max_seq_len=int(_field(reader, f"{arch}.context_length", 8192)),
    architecture=arch,
    sliding_window=int(window) if window else None,  # 0: none, as in llama.cpp.
  )


def read_gguf_config(path: str | os.PathLike) -> LlamaConfig:
  """Reads only the metadata: cheap (memory-mapped), so flags can be validated first."""
  reader = _reader(path)
  return _config_from_reader(reader, path)


def _unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  d_out, d_in = w_OxI.shape
  head_dim = d_out // n_heads
  return w_OxI.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def load_gguf(
  path: str | os.PathLike,
  progress: Callable[[int, int], None] | None = None,
) -> tuple[LlamaConfig, dict]:
  """Loads a llama-architecture GGUF: (config, float32 numpy params in our layout).

  ``progress(done, total)`` is called after each tensor when given.
  """
  import gguf

  reader = _reader(path)
  config = _config_from_reader(reader, path)
  tensors = {t.name: t for t in reader.tensors}
  total = len(tensors)
  done = 0

  def get(name: str) -> np.ndarray:
    nonlocal done
    t = tensors.get(name)
    if t is None:
      raise ModelFileError(f"{os.fspath(path)!r}: GGUF tensor {name!r} is missing")
    try:
      arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise ModelFileError(f"{os.fspath(path)!r}: cannot dequantize {name!r}: {e}") from e
    arr = np.asarray(arr, np.float32).reshape([int(d) for d in reversed(t.shape)])
    done += 1
    if progress is not None:
      progress(done, total)
    return arr

  n_layers = config.n_layers
  layers = {"attn_norm": [], "mlp_norm": [], **{p: {"w": []} for p in config.site_names}}
  if config.qkv_bias:
    for p in ("q", "k", "v"):
      layers[p]["b"] = []
  for i in range(n_layers):
    layers["attn_norm"].append(get(f"blk.{i}.attn_norm.weight"))
    layers["mlp_norm"].append(get(f"blk.{i}.ffn_norm.weight"))
    for proj, gname in _GGUF_NAMES.items():
      w_OxI = get(f"blk.{i}.{gname}.weight")
      if proj in ("q", "k"):
        heads = config.n_heads if proj == "q" else config.n_kv_heads
        w_OxI = _unpermute_rope_rows(w_OxI, heads)
      layers[proj]["w"].append(np.ascontiguousarray(w_OxI.T))
      if "b" in layers[proj]:
        b = get(f"blk.{i}.{gname}.bias")
        if proj in ("q", "k"):
          heads = config.n_heads if proj == "q" else config.n_kv_heads
          b = _unpermute_rope_rows(b[:, None], heads)[:, 0]
        layers[proj]["b"].append(b)
  stacked = {
    name: (np.stack(v) if isinstance(v, list) else {k: np.stack(a) for k, a in v.items()})
    for name, v in layers.items()
  }
  params = {
    "embed": get("token_embd.weight"),
    "layers": stacked,
    "final_norm": get("output_norm.weight"),
  }
  if not config.tie_embeddings:
    params["lm_head"] = np.ascontiguousarray(get("output.weight").T)
  _check_shapes(config, params, path)
  return config, params


def _check_shapes(config: LlamaConfig, params: dict, path) -> None:
  expected = {"embed": (config.vocab_size, config.d_model)}
  for proj, (d_in, d_out) in config.linear_shapes().items():
    expected[f"layers/{proj}/w"] = (config.n_layers, d_in, d_out)
  actual = {"embed": params["embed"].shape}
  for proj in config.site_names:
    actual[f"layers/{proj}/w"] = params["layers"][proj]["w"].shape
  for name, shape in expected.items():
    if tuple(actual[name]) != shape:
      raise ModelFileError(
        f"{os.fspath(path)!r}: tensor {name} has shape {tuple(actual[name])}, "
        f"expected {shape} from the metadata"
      )


_PRE_TOKENIZERS = ("smollm", "gpt2", "default", "llama-bpe")


def load_gguf_tokenizer(path: str | os.PathLike):
  """Rebuilds the GGUF's byte-level BPE tokenizer as a ``tokenizers.Tokenizer``."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

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
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  elif pre == "llama-bpe":
    llama3_split = (
      r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
      r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(llama3_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  else:
    tokenizer.pre_tokenizer = byte_level
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
  for which it adds one. Llama-3 GGUFs written by older converters carry no flag.
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
