"""Model files and caches: GGUF (tiny files written here), sources, param cache, registry, atomics.

No network, except the test marked ``slow`` that asks the real package index for a package that
does not exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import zipfile

import gguf
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tokenizers import pre_tokenizers

from amber_jax.eval.perplexity import make_windows
from amber_jax.io import param_cache
from amber_jax.io.atomic import write_json_atomic, write_text_atomic
from amber_jax.io.errors import ModelFileError, UnsupportedArchitectureError
from amber_jax.io.gguf_loader import load_gguf, load_gguf_tokenizer, read_gguf_config
from amber_jax.io.loading import load_model, load_tokenizer
from amber_jax.io.param_cache import load_cached
from amber_jax.io.registry import RegistryFetchError, WheelFile, fetch_wheel_file
from amber_jax.io.sources import KNOWN_MODELS, resolve_model
from amber_jax.model.config import PROJECTIONS, LlamaConfig

# ---------------------------------------------------------------------------------------------
# A tiny llama-architecture GGUF, written the way llama.cpp's converter writes one.

GGUF_NAMES = {
  "q": "attn_q",
  "k": "attn_k",
  "v": "attn_v",
  "o": "attn_output",
  "gate": "ffn_gate",
  "up": "ffn_up",
  "down": "ffn_down",
}
MERGES = ["h e", "Ġ t", "Ġt he", "1 2"]
EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyGGUF:
  arch: str = "llama"
  n_layers: int = 2
  d_model: int = 32
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 64
  meta_d_ff: int | None = None  # Metadata that disagrees with the tensors.
  qkv_bias: bool = False
  tie: bool = False
  pre: str | None = None  # tokenizer.ggml.pre
  add_bos: bool | None = None  # tokenizer.ggml.add_bos_token (None: not written)
  bos_id: int | None = None  # tokenizer.ggml.bos_token_id (None: not written)
  sliding_window: int | None = None  # {arch}.attention.sliding_window (None: not written)
  drop_tensor: str | None = None
  drop_key: str | None = None


def _tokens() -> tuple[list[str], list[int]]:
  tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "Ġt", "Ġthe", "12", EOS, BOS]
  types = [1] * (len(tokens) - 2) + [3, 3]  # 3: control token.
  return tokens, types


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows reordered for interleaved RoPE."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def write_gguf(path: pathlib.Path, spec: TinyGGUF = TinyGGUF(), seed: int = 0) -> dict:
  """Writes a GGUF; returns the HF-layout float32 tensors ([out, in], unpermuted)."""
  rng = np.random.default_rng(seed)
  tokens, types = _tokens()
  d, hd = spec.d_model, spec.d_model // spec.n_heads
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  hf = {"embed": normal(len(tokens), d), "final_norm": normal(d)}
  if not spec.tie:
    hf["lm_head"] = normal(len(tokens), d)
  out_dims = {"q": spec.n_heads * hd, "k": spec.n_kv_heads * hd, "v": spec.n_kv_heads * hd}
  out_dims |= {"o": d, "gate": spec.d_ff, "up": spec.d_ff, "down": d}
  in_dims = {p: d for p in PROJECTIONS} | {"o": spec.n_heads * hd, "down": spec.d_ff}
  for i in range(spec.n_layers):
    hf[f"{i}.attn_norm"], hf[f"{i}.mlp_norm"] = normal(d), normal(d)
    for p in PROJECTIONS:
      hf[f"{i}.{p}.w"] = normal(out_dims[p], in_dims[p])
      if spec.qkv_bias and p in ("q", "k", "v"):
        hf[f"{i}.{p}.b"] = normal(out_dims[p])

  w = gguf.GGUFWriter(path, spec.arch)
  meta = {
    "context_length": 128,
    "embedding_length": d,
    "block_count": spec.n_layers,
    "feed_forward_length": spec.meta_d_ff or spec.d_ff,
    "attention.head_count": spec.n_heads,
    "attention.head_count_kv": spec.n_kv_heads,
  }
  for key, value in meta.items():
    if key != spec.drop_key:
      w.add_uint32(f"{spec.arch}.{key}", value)
  w.add_rope_freq_base(1e5)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_tokenizer_model("gpt2")
  if spec.pre is not None:
    w.add_tokenizer_pre(spec.pre)
  if spec.add_bos is not None:
    w.add_add_bos_token(spec.add_bos)
  if spec.bos_id is not None:
    w.add_bos_token_id(spec.bos_id)
  if spec.sliding_window is not None:
    w.add_sliding_window(spec.sliding_window)
  w.add_token_list(tokens)
  w.add_token_merges(MERGES)
  w.add_token_types(types)
  tensors = {"token_embd.weight": hf["embed"], "output_norm.weight": hf["final_norm"]}
  if not spec.tie:
    tensors["output.weight"] = hf["lm_head"]
  heads = {"q": spec.n_heads, "k": spec.n_kv_heads}
  for i in range(spec.n_layers):
    tensors[f"blk.{i}.attn_norm.weight"] = hf[f"{i}.attn_norm"]
    tensors[f"blk.{i}.ffn_norm.weight"] = hf[f"{i}.mlp_norm"]
    for p, name in GGUF_NAMES.items():
      for kind, suffix in (("w", "weight"), ("b", "bias")):
        t = hf.get(f"{i}.{p}.{kind}")
        if t is not None:
          tensors[f"blk.{i}.{name}.{suffix}"] = llama_cpp_permute(t, heads[p]) if p in heads else t
  for name, t in tensors.items():
    if name != spec.drop_tensor:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return path, write_gguf(path)


def test_load_gguf_unpermutes_and_transposes_exactly(tiny_gguf):
  path, hf = tiny_gguf
  seen = []
  config, params = load_gguf(path, progress=lambda done, total: seen.append((done, total)))
  assert config == LlamaConfig(
    vocab_size=len(_tokens()[0]),
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    rope_theta=1e5,
    norm_eps=float(np.float32(1e-6)),
    tie_embeddings=False,
    qkv_bias=False,
    max_seq_len=128,
    architecture="llama",
  )
  layers = params["layers"]
  for i in range(2):
    for p in PROJECTIONS:
      assert layers[p]["w"].dtype == np.float32
      np.testing.assert_array_equal(layers[p]["w"][i], hf[f"{i}.{p}.w"].T, err_msg=f"{i}.{p}")
    np.testing.assert_array_equal(layers["attn_norm"][i], hf[f"{i}.attn_norm"])
    np.testing.assert_array_equal(layers["mlp_norm"][i], hf[f"{i}.mlp_norm"])
  np.testing.assert_array_equal(params["embed"], hf["embed"])
  np.testing.assert_array_equal(params["final_norm"], hf["final_norm"])
  np.testing.assert_array_equal(params["lm_head"], hf["lm_head"].T)
  assert "b" not in layers["q"]
  n_tensors = 3 + 9 * 2
  assert seen == [(i + 1, n_tensors) for i in range(n_tensors)]
  assert read_gguf_config(path) == config


def test_load_gguf_tied_embeddings_and_qkv_bias(tmp_path):
  path = tmp_path / "bias.gguf"
  hf = write_gguf(path, TinyGGUF(qkv_bias=True, tie=True, n_kv_heads=1), seed=1)
  config, params = load_gguf(path)
  assert config.tie_embeddings and config.qkv_bias and config.n_kv_heads == 1
  assert "lm_head" not in params
  for i in range(2):
    for p in ("q", "k", "v"):
      np.testing.assert_array_equal(params["layers"][p]["w"][i], hf[f"{i}.{p}.w"].T)
      np.testing.assert_array_equal(params["layers"][p]["b"][i], hf[f"{i}.{p}.b"])
    assert "b" not in params["layers"]["o"]


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "gpt2.gguf"
  write_gguf(path, TinyGGUF(arch="gpt2"))
  for load in (load_gguf, read_gguf_config):
    with pytest.raises(
      UnsupportedArchitectureError, match=r"'gpt2' is not supported; supported: llama"
    ):
      load(path)


def test_missing_gguf_file(tmp_path):
  path = tmp_path / "nowhere" / "model.gguf"
  with pytest.raises(ModelFileError, match=f"model file not found: '{re.escape(str(path))}'"):
    load_gguf(path)
  with pytest.raises(ModelFileError, match="not found"):
    load_gguf_tokenizer(path)


def test_directory_is_not_a_gguf_file(tmp_path):
  with pytest.raises(ModelFileError, match="not found"):
    load_gguf(tmp_path)


@pytest.mark.parametrize("size", [0, 3, 100, 5000])
def test_corrupt_gguf_file(tmp_path, size):
  path = tmp_path / "random.gguf"
  path.write_bytes(np.random.default_rng(size).bytes(size))
  with pytest.raises(
    ModelFileError, match=rf"cannot read GGUF file '{re.escape(str(path))}' \(corrupt or trunc"
  ):
    load_gguf(path)


@pytest.mark.parametrize("keep", [4, 24, 100, 2000, 0.5, -1000, -1])
def test_truncated_gguf_file(tiny_gguf, tmp_path, keep):
  data = tiny_gguf[0].read_bytes()
  keep = int(len(data) * keep) if isinstance(keep, float) else keep
  path = tmp_path / "truncated.gguf"
  path.write_bytes(data[:keep])
  with pytest.raises(ModelFileError, match=re.escape(str(path))):
    load_gguf(path)


def test_missing_metadata_key(tmp_path):
  path = tmp_path / "nokey.gguf"
  write_gguf(path, TinyGGUF(drop_key="block_count"))
  with pytest.raises(ModelFileError, match=r"lacks 'llama.block_count'"):
    read_gguf_config(path)


def test_missing_tensor(tmp_path):
  path = tmp_path / "notensor.gguf"
  write_gguf(path, TinyGGUF(drop_tensor="blk.1.ffn_down.weight"))
  with pytest.raises(ModelFileError, match=r"GGUF tensor 'blk.1.ffn_down.weight' is missing"):
    load_gguf(path)


def test_metadata_disagrees_with_tensors(tmp_path):
  path = tmp_path / "badshape.gguf"
  write_gguf(path, TinyGGUF(meta_d_ff=48))
  with pytest.raises(ModelFileError, match=r"tensor layers/gate/w has shape \(2, 32, 64\), expec"):
    load_gguf(path)


def test_quantized_tensor_is_dequantized(tmp_path):
  # Replace one weight by its Q8_0 form: the loader must give gguf's dequantization of it.
  path = tmp_path / "q8.gguf"
  hf = write_gguf(path)
  reader = gguf.GGUFReader(path)
  writer = gguf.GGUFWriter(tmp_path / "q8b.gguf", "llama")
  for field in reader.fields.values():
    if field.name.startswith("GGUF.") or field.name == "general.architecture":
      continue
    value = field.contents()
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
      writer.add_array(field.name, value)
    else:
      writer.add_key_value(field.name, value, vtype)
  qtype = gguf.GGMLQuantizationType.Q8_0
  for t in reader.tensors:
    arr = np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])
    if t.name == "blk.0.ffn_up.weight":
      writer.add_tensor(t.name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(t.name, arr)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  _, params = load_gguf(tmp_path / "q8b.gguf")
  expected = gguf.quants.dequantize(gguf.quants.quantize(hf["0.up.w"], qtype), qtype)
  np.testing.assert_array_equal(params["layers"]["up"]["w"][0], expected.T)
  assert np.abs(expected - hf["0.up.w"]).max() < 0.05  # Q8_0 really is lossy but close.
  np.testing.assert_array_equal(params["layers"]["up"]["w"][1], hf["1.up.w"].T)


# The tokenizer in the GGUF metadata.


@pytest.mark.parametrize("pre", [None, "gpt2", "smollm"])
def test_gguf_tokenizer_round_trip(tmp_path, pre):
  path = tmp_path / "tok.gguf"
  write_gguf(path, TinyGGUF(pre=pre))
  tokenizer = load_gguf_tokenizer(path)
  tokens, _ = _tokens()
  text = "hello the world, 1234 Ünïcödé\ttabs\nnew line  two spaces"
  encoding = tokenizer.encode(text)
  assert tokenizer.decode(encoding.ids) == text
  assert [tokens[i] for i in encoding.ids] == encoding.tokens
  # Merges apply: " the" is one token, "he" in "hello" too.
  assert encoding.tokens[:2] == ["he", "l"] and "Ġthe" in encoding.tokens
  # SmolLM2 splits digits one by one before BPE, so the "1 2" merge never fires there.
  assert ("12" in encoding.tokens) == (pre != "smollm")
  # The control token is one special token.
  ids = tokenizer.encode(f"the{EOS}").ids
  assert ids[-1] == tokens.index(EOS)
  assert tokenizer.decode(ids, skip_special_tokens=False) == f"the{EOS}"


def test_gguf_tokenizer_unsupported_pre_split(tmp_path):
  path = tmp_path / "pre.gguf"
  write_gguf(path, TinyGGUF(pre="deepseek-coder"))
  with pytest.raises(UnsupportedArchitectureError, match=r"'deepseek-coder' is not supported"):
    load_gguf_tokenizer(path)


def _encode_ids(spec: TinyGGUF, path: pathlib.Path, text: str) -> list[int]:
  write_gguf(path, spec)
  return load_gguf_tokenizer(path).encode(text).ids


@pytest.mark.parametrize(
  "pre, add_bos, expect_bos",
  [
    # No tokenizer.ggml.add_bos_token: llama.cpp's default, BOS only for Llama-3's pre-split.
    ("llama-bpe", None, True),
    ("smollm", None, False),
    ("gpt2", None, False),
    (None, None, False),
    # The flag, when present, decides.
    ("llama-bpe", True, True),
    ("llama-bpe", False, False),
    ("smollm", True, True),
    ("smollm", False, False),
    ("default", True, True),
  ],
)
def test_gguf_tokenizer_add_bos_token(tmp_path, pre, add_bos, expect_bos):
  tokens, _ = _tokens()
  bos_id = tokens.index(BOS)
  spec = TinyGGUF(pre=pre, add_bos=add_bos, bos_id=bos_id)
  text = "hello the world, 12"
  ids = _encode_ids(spec, tmp_path / "bos.gguf", text)
  plain = _encode_ids(TinyGGUF(pre=pre, add_bos=False), tmp_path / "plain.gguf", text)
  assert bos_id not in plain
  assert ids == ([bos_id] + plain if expect_bos else plain)
  tokenizer = load_gguf_tokenizer(tmp_path / "bos.gguf")
  assert tokenizer.decode(ids) == text  # The BOS is a special token: decode drops it.
  if expect_bos:
    # Pairs as HF's Llama-3 tokenizer.json: BOS before each sequence.
    the = tokenizer.encode("the", add_special_tokens=False).ids
    assert tokenizer.encode(text, "the").ids == [bos_id] + plain + [bos_id] + the
    assert tokenizer.encode(text, add_special_tokens=False).ids == plain


def test_gguf_tokenizer_smollm_without_bos_is_unchanged(tmp_path):
  """SmolLM2's GGUF says add_bos_token False (and has a bos_token_id): no BOS, same split."""
  path = tmp_path / "smollm.gguf"
  write_gguf(path, TinyGGUF(pre="smollm", add_bos=False, bos_id=_tokens()[0].index(EOS)))
  tokenizer = load_gguf_tokenizer(path)
  assert tokenizer.post_processor is None
  encoding = tokenizer.encode("hello the 12")
  assert encoding.tokens == ["he", "l", "l", "o", "Ġthe", "Ġ", "1", "2"]


@pytest.mark.parametrize("bos_id", [None, 10**6])
def test_gguf_tokenizer_add_bos_without_valid_bos_id(tmp_path, bos_id):
  path = tmp_path / "nobos.gguf"
  write_gguf(path, TinyGGUF(pre="llama-bpe", bos_id=bos_id))
  n = len(_tokens()[0])
  with pytest.raises(
    ModelFileError,
    match=rf"adds a BOS token but tokenizer\.ggml\.bos_token_id is {bos_id}; it must be a "
    rf"token id in \[0, {n}\)",
  ):
    load_gguf_tokenizer(path)


def test_gguf_sliding_window_is_recorded(tmp_path):
  path = tmp_path / "swa.gguf"
  write_gguf(path, TinyGGUF(sliding_window=16))
  config = read_gguf_config(path)
  assert config.sliding_window == 16
  config.check_seq_len(16)
  with pytest.raises(ValueError, match=r"t=17 exceeds .* sliding_window=16"):
    config.check_seq_len(17)
  write_gguf(tmp_path / "plain.gguf")
  assert read_gguf_config(tmp_path / "plain.gguf").sliding_window is None


# ---------------------------------------------------------------------------------------------
# Model sources.


def test_resolve_model_gguf_and_hf(tiny_gguf, tmp_path):
  source = resolve_model(str(tiny_gguf[0]), tmp_path)
  assert (source.kind, source.path, source.name) == ("gguf", tiny_gguf[0], "tiny")
  (tmp_path / "hfdir").mkdir()
  (tmp_path / "hfdir" / "config.json").write_text("{}")
  source = resolve_model(str(tmp_path / "hfdir"), tmp_path)
  assert (source.kind, source.name) == ("hf", "hfdir")


def test_load_model_and_tokenizer_from_gguf_source(tiny_gguf, tmp_path):
  source = resolve_model(str(tiny_gguf[0]), tmp_path)
  logs = []
  loaded = load_model(source, tmp_path / "cache", show_progress=False, log=logs.append)
  again = load_model(source, tmp_path / "cache", show_progress=False, log=logs.append)
  assert not loaded.from_cache and again.from_cache
  assert loaded.config == again.config == read_gguf_config(tiny_gguf[0])
  np.testing.assert_array_equal(again.params["layers"]["q"]["w"], loaded.params["layers"]["q"]["w"])
  uncached = load_model(source, None, show_progress=False)
  assert not uncached.from_cache
  assert load_tokenizer(source).decode(load_tokenizer(source).encode("the 12").ids) == "the 12"


def _known_names_in(message: str) -> bool:
  return all(name in message for name in KNOWN_MODELS)


def test_resolve_model_missing_path(tmp_path):
  with pytest.raises(ModelFileError) as info:
    resolve_model(str(tmp_path / "no-such-model"), tmp_path)
  assert "no-such-model" in str(info.value) and _known_names_in(str(info.value))


def test_resolve_model_directory_without_config(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ModelFileError, match="without config.json") as info:
    resolve_model(str(tmp_path / "empty"), tmp_path)
  assert _known_names_in(str(info.value))


def test_resolve_model_not_a_gguf_file(tmp_path):
  path = tmp_path / "model.bin"
  path.write_bytes(b"\0" * 16)
  with pytest.raises(ModelFileError, match=r"must be a \.gguf file") as info:
    resolve_model(str(path), tmp_path)
  assert _known_names_in(str(info.value))


# ---------------------------------------------------------------------------------------------
# The converted-params cache.

CONFIG = LlamaConfig(
  vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=8
)


class Converter:
  """A ``convert`` callable that counts its calls."""

  def __init__(self, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.params = {
      "embed": rng.standard_normal((8, 4)).astype(np.float32),
      "layers": {"q": {"w": rng.standard_normal((1, 4, 4)).astype(np.float32)}},
      "final_norm": np.ones((4,), np.float32),
    }
    self.calls = 0

  def __call__(self):
    self.calls += 1
    return CONFIG, self.params


def _assert_params_equal(a, b):
  np.testing.assert_array_equal(a["embed"], b["embed"])
  np.testing.assert_array_equal(a["layers"]["q"]["w"], b["layers"]["q"]["w"])
  np.testing.assert_array_equal(a["final_norm"], b["final_norm"])


@pytest.fixture
def cached_source(tmp_path):
  source = tmp_path / "model.gguf"
  source.write_bytes(b"weights v1")
  convert = Converter()
  logs: list[str] = []
  first = load_cached(source, tmp_path / "cache", convert, log=logs.append)
  assert not first.from_cache and convert.calls == 1
  entries = list((tmp_path / "cache" / "params").iterdir())
  assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
  return source, tmp_path / "cache", entries[0], convert, logs


def test_param_cache_second_call_restores(cached_source):
  source, cache, _, convert, logs = cached_source
  second = load_cached(source, cache, convert, log=logs.append)
  assert second.from_cache and convert.calls == 1
  assert second.config == CONFIG
  _assert_params_equal(second.params, convert.params)
  assert second.params["embed"].dtype == np.float32
  assert logs == []
  # No temporary directories are left beside the entry.
  assert [p.name for p in (cache / "params").iterdir()] == [next((cache / "params").iterdir()).name]


def test_param_cache_stale_entry_is_rebuilt(cached_source):
  source, cache, _, convert, logs = cached_source
  stat = source.stat()
  os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  rebuilt = load_cached(source, cache, convert, log=logs.append)
  assert not rebuilt.from_cache and convert.calls == 2
  assert any("stale" in line for line in logs)
  # Same mtime, other size: stale too.
  source.write_bytes(b"weights v2, longer")
  assert not load_cached(source, cache, convert, log=logs.append).from_cache
  assert convert.calls == 3
  assert load_cached(source, cache, convert, log=logs.append).from_cache
  assert convert.calls == 3


def test_param_cache_missing_meta_is_rebuilt(cached_source):
  source, cache, entry, convert, logs = cached_source
  (entry / "meta.json").unlink()
  result = load_cached(source, cache, convert, log=logs.append)
  assert not result.from_cache and convert.calls == 2
  assert (entry / "meta.json").is_file()
  assert load_cached(source, cache, convert, log=logs.append).from_cache


def test_param_cache_unreadable_meta_is_rebuilt(cached_source):
  source, cache, entry, convert, logs = cached_source
  (entry / "meta.json").write_text("{not json")
  assert not load_cached(source, cache, convert, log=logs.append).from_cache
  assert convert.calls == 2 and any("unreadable metadata" in line for line in logs)


def test_param_cache_digest_mismatch_is_rebuilt(cached_source):
  source, cache, entry, convert, logs = cached_source
  meta = json.loads((entry / "meta.json").read_text())
  meta["digest"] = "0" * 64
  (entry / "meta.json").write_text(json.dumps(meta))
  assert not load_cached(source, cache, convert, log=logs.append).from_cache
  assert convert.calls == 2 and any("checksum mismatch" in line for line in logs)


# orbax leaves an asyncio callback behind when a restore fails; it is harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["flip", "delete", "truncate"])
def test_param_cache_damaged_checkpoint_files(tmp_path, damage):
  """Whatever file of the orbax checkpoint is damaged, wrong params are never returned.

  Damage to a file orbax does not need (e.g. its commit marker) may go unnoticed, and the
  entry is then used as is; damage to anything holding the arrays is caught (by orbax or
  by the digest) and the entry rebuilt.
  """
  source = tmp_path / "model.gguf"
  source.write_bytes(b"weights")
  cache = tmp_path / "cache"
  convert = Converter()

  def fresh_entry() -> list[pathlib.Path]:
    shutil.rmtree(cache, ignore_errors=True)
    assert not load_cached(source, cache, convert, log=lambda _: None).from_cache
    (entry,) = (cache / "params").iterdir()
    return sorted(p for p in (entry / "params").rglob("*") if p.is_file())

  n_files = len(fresh_entry())
  assert n_files > 0
  rebuilt_for = []
  for k in range(n_files):
    files = fresh_entry()  # orbax may split the arrays into a different number of files
    path = files[k % len(files)]
    data = path.read_bytes()
    if damage == "flip":
      path.write_bytes(bytes(b ^ 0xFF for b in data))
    elif damage == "delete":
      path.unlink()
    else:
      path.write_bytes(data[: len(data) // 2])
    calls, logs = convert.calls, []
    result = load_cached(source, cache, convert, log=logs.append)
    _assert_params_equal(result.params, convert.params)
    if not result.from_cache:
      assert convert.calls == calls + 1
      assert any("rebuilding" in line for line in logs), logs
      rebuilt_for.append(path.name)
      # The rebuilt entry is whole again.
      assert load_cached(source, cache, convert, log=logs.append).from_cache
  assert rebuilt_for  # At least the array data and orbax's metadata are checked.


def test_param_cache_separate_entries_per_source(tmp_path):
  a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
  a.write_bytes(b"a")
  b.write_bytes(b"b")
  conv_a, conv_b = Converter(1), Converter(2)
  load_cached(a, tmp_path / "cache", conv_a, log=lambda _: None)
  load_cached(b, tmp_path / "cache", conv_b, log=lambda _: None)
  got_a = load_cached(a, tmp_path / "cache", conv_a, log=lambda _: None)
  got_b = load_cached(b, tmp_path / "cache", conv_b, log=lambda _: None)
  assert got_a.from_cache and got_b.from_cache
  _assert_params_equal(got_a.params, conv_a.params)
  _assert_params_equal(got_b.params, conv_b.params)


def test_param_cache_failed_conversion_writes_nothing(tmp_path):
  source = tmp_path / "model.gguf"
  source.write_bytes(b"x")

  def broken():
    raise ModelFileError("bad tensor")

  with pytest.raises(ModelFileError, match="bad tensor"):
    load_cached(source, tmp_path / "cache", broken, log=lambda _: None)
  assert not (tmp_path / "cache" / "params").exists() or not any(
    (tmp_path / "cache" / "params").iterdir()
  )


def _make_stale(source: pathlib.Path) -> None:
  st = source.stat()
  os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _hidden_leftovers(cache: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (cache / "params").iterdir() if p.name.startswith("."))


def test_param_cache_replacement_deletes_the_old_entry_only_after_the_new_is_in(
  cached_source, monkeypatch
):
  """The old entry is renamed aside, the new one renamed in, and only then the old one deleted."""
  source, cache, entry, convert, logs = cached_source
  _make_stale(source)
  new_fingerprint = param_cache.source_fingerprint(source)
  real_rmtree = shutil.rmtree
  deleted_while = []

  def rmtree(path, *args, **kwargs):
    path = pathlib.Path(path)
    if not path.name.startswith(f".{entry.name}-tmp-"):  # Deleting an old entry.
      meta = json.loads((entry / "meta.json").read_text())  # The entry is there...
      deleted_while.append(meta["fingerprint"] == new_fingerprint)  # ...and is the new one.
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(param_cache.shutil, "rmtree", rmtree)
  rebuilt = load_cached(source, cache, convert, log=logs.append)
  assert not rebuilt.from_cache and convert.calls == 2
  assert deleted_while == [True]
  monkeypatch.undo()
  assert load_cached(source, cache, convert, log=logs.append).from_cache
  assert _hidden_leftovers(cache) == []
  assert logs == [line for line in logs if "stale" in line]


def test_param_cache_failed_rename_keeps_the_old_entry(cached_source, monkeypatch):
  """A failure between removing the old entry and renaming the new one in loses no entry."""
  source, cache, entry, convert, logs = cached_source
  old_meta = (entry / "meta.json").read_text()
  real_replace = os.replace

  def replace(src, dst, *args, **kwargs):
    if pathlib.Path(src).name.startswith(f".{entry.name}-tmp-"):
      raise OSError(28, "No space left on device (simulated)")
    return real_replace(src, dst, *args, **kwargs)

  _make_stale(source)
  monkeypatch.setattr(param_cache.os, "replace", replace)
  result = load_cached(source, cache, convert, log=logs.append)
  monkeypatch.undo()
  assert not result.from_cache and convert.calls == 2
  _assert_params_equal(result.params, convert.params)
  assert any("could not write the param cache" in line and "simulated" in line for line in logs)
  assert (entry / "meta.json").read_text() == old_meta  # The old entry is back, whole.
  assert _hidden_leftovers(cache) == []
  # With the source's old mtime back, the kept entry serves it again.
  old_mtime_ns = json.loads(old_meta)["fingerprint"]["files"][0][2]
  os.utime(source, ns=(source.stat().st_atime_ns, old_mtime_ns))
  assert load_cached(source, cache, convert, log=logs.append).from_cache


def test_param_cache_filesystem_error_is_logged_and_the_run_goes_on(cached_source, monkeypatch):
  source, cache, entry, convert, logs = cached_source
  old_meta = (entry / "meta.json").read_text()

  def full_disk(self, *args, **kwargs):
    raise OSError(28, "No space left on device (simulated)")

  _make_stale(source)
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", full_disk)
  result = load_cached(source, cache, convert, log=logs.append)
  assert not result.from_cache and convert.calls == 2
  _assert_params_equal(result.params, convert.params)
  assert any("could not write the param cache" in line for line in logs)
  assert (entry / "meta.json").read_text() == old_meta
  assert _hidden_leftovers(cache) == []


def test_param_cache_other_errors_are_not_swallowed(cached_source, monkeypatch):
  """Only filesystem errors are logged and skipped; a bug in the writing code propagates."""
  source, cache, entry, convert, logs = cached_source
  old_meta = (entry / "meta.json").read_text()

  def broken(self, *args, **kwargs):
    raise RuntimeError("not a filesystem problem")

  _make_stale(source)
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", broken)
  with pytest.raises(RuntimeError, match="not a filesystem problem"):
    load_cached(source, cache, convert, log=logs.append)
  assert not any("could not write" in line for line in logs)
  assert (entry / "meta.json").read_text() == old_meta
  assert _hidden_leftovers(cache) == []


@pytest.mark.parametrize(
  "damage",
  [
    lambda meta: meta["config"].update(no_such_field=1),  # e.g. written by another version
    lambda meta: meta["config"].pop("d_model"),
    lambda meta: meta["config"].update(sliding_window=0),
    lambda meta: meta.pop("config"),
  ],
)
def test_param_cache_unreadable_config_is_rebuilt(cached_source, damage):
  source, cache, entry, convert, logs = cached_source
  meta = json.loads((entry / "meta.json").read_text())
  damage(meta)
  (entry / "meta.json").write_text(json.dumps(meta))
  assert not load_cached(source, cache, convert, log=logs.append).from_cache
  assert convert.calls == 2 and any("unreadable config" in line for line in logs)
  assert load_cached(source, cache, convert, log=logs.append).from_cache


def test_param_cache_keeps_the_sliding_window(tmp_path):
  source = tmp_path / "model"
  source.write_bytes(b"x")
  config = dataclasses.replace(CONFIG, sliding_window=4, max_seq_len=16)
  params = Converter().params
  convert = lambda: (config, params)
  assert not load_cached(source, tmp_path / "cache", convert, log=lambda _: None).from_cache
  again = load_cached(source, tmp_path / "cache", convert, log=lambda _: None)
  assert again.from_cache and again.config == config and again.config.sliding_window == 4


# ---------------------------------------------------------------------------------------------
# Fetching files out of wheels (offline: a local wheel and pip's --no-index).


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def local_wheel(tmp_path_factory) -> tuple[pathlib.Path, bytes]:
  """A minimal wheel ``amber-jax-test-data==0.1`` holding ``amber_jax_test_data/data.txt``."""
  folder = tmp_path_factory.mktemp("wheels")
  payload = b"hello from a wheel\n" * 100
  dist = "amber_jax_test_data-0.1.dist-info"
  files = {
    "amber_jax_test_data/data.txt": payload,
    f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: amber-jax-test-data\nVersion: 0.1\n",
    f"{dist}/WHEEL": (
      b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    ),
  }
  record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
  files[f"{dist}/RECORD"] = record.encode()
  with zipfile.ZipFile(folder / "amber_jax_test_data-0.1-py3-none-any.whl", "w") as whl:
    for name, data in files.items():
      whl.writestr(name, data)
  return folder, payload


def _spec(folder, member="amber_jax_test_data/data.txt", sha=None, requirement=None) -> WheelFile:
  return WheelFile(
    requirement=requirement or "amber-jax-test-data==0.1",
    member=member,
    sha256=sha,
    pip_args=("--no-index", "--find-links", str(folder)),
  )


def test_fetch_wheel_file_from_local_wheel(local_wheel, tmp_path):
  folder, payload = local_wheel
  spec = _spec(folder, sha=_sha256(payload))
  logs = []
  path = fetch_wheel_file(spec, tmp_path, log=logs.append)
  assert path.read_bytes() == payload and path.name == "data.txt"
  assert len(logs) == 1 and "fetching data.txt" in logs[0]
  # Second call: from the cache, pip is not run (no log line).
  assert fetch_wheel_file(spec, tmp_path, log=logs.append) == path and len(logs) == 1
  # A corrupt cached copy is fetched again.
  path.write_bytes(b"tampered")
  assert fetch_wheel_file(spec, tmp_path, log=logs.append).read_bytes() == payload
  assert any("corrupt" in line for line in logs)
  # Nothing but the file is left in its folder (no partial downloads).
  assert [p.name for p in path.parent.iterdir()] == ["data.txt"]


def test_fetch_wheel_file_digest_mismatch(local_wheel, tmp_path):
  folder, _ = local_wheel
  with pytest.raises(RegistryFetchError, match=r"has SHA-256 [0-9a-f]{64}, expected 0{64}"):
    fetch_wheel_file(_spec(folder, sha="0" * 64), tmp_path, log=lambda _: None)
  target_dir = tmp_path / "files" / ("0" * 16)
  assert not any(target_dir.iterdir())


def test_fetch_wheel_file_member_missing(local_wheel, tmp_path):
  folder, _ = local_wheel
  spec = _spec(folder, member="amber_jax_test_data/missing.bin", sha="1" * 64)
  with pytest.raises(RegistryFetchError, match=r"does not contain 'amber_jax_test_data/missing"):
    fetch_wheel_file(spec, tmp_path, log=lambda _: None)


def test_fetch_wheel_file_no_such_package_offline(local_wheel, tmp_path):
  folder, _ = local_wheel
  spec = _spec(folder, sha="2" * 64, requirement="amber-jax-no-such-package==0.0.1")
  with pytest.raises(RegistryFetchError, match=r"could not download 'amber-jax-no-such-package"):
    fetch_wheel_file(spec, tmp_path, log=lambda _: None)


@pytest.mark.slow
def test_fetch_wheel_file_no_such_package_on_the_registry(tmp_path):
  spec = WheelFile(requirement="amber-jax-no-such-package==0.0.1", member="x", sha256="3" * 64)
  with pytest.raises(RegistryFetchError, match=r"pip download --no-deps amber-jax-no-such-pack"):
    fetch_wheel_file(spec, tmp_path, log=lambda _: None)


# ---------------------------------------------------------------------------------------------
# Atomic writes.


def test_write_json_atomic(tmp_path):
  path = tmp_path / "sub" / "result.json"
  write_json_atomic(path, {"ppl": 33.3, "sites": [[0, "q"]]})
  assert json.loads(path.read_text()) == {"ppl": 33.3, "sites": [[0, "q"]]}
  assert path.read_text().endswith("\n")
  write_json_atomic(path, {"ppl": 1.0})
  assert json.loads(path.read_text()) == {"ppl": 1.0}
  assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
  umask = os.umask(0o022)
  try:
    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
    path.chmod(0o640)
    write_text_atomic(path, "b\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode
  finally:
    os.umask(umask)


def test_write_json_atomic_failure_keeps_old_content(tmp_path):
  path = tmp_path / "result.json"
  write_json_atomic(path, {"ok": True})
  with pytest.raises(TypeError):
    write_json_atomic(path, {"bad": object()})
  assert json.loads(path.read_text()) == {"ok": True}
  assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_write_text_atomic_failure_mid_write_removes_temp(tmp_path):
  path = tmp_path / "out.txt"
  write_text_atomic(path, "old\n")
  with pytest.raises(TypeError):
    write_text_atomic(path, b"bytes are not text")  # Fails inside the write, after mkstemp.
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ---------------------------------------------------------------------------------------------
# Perplexity windows.


def test_make_windows():
  tokens = np.arange(30)
  windows = make_windows(tokens, 4, 3)
  assert windows.dtype == np.int32 and windows.shape == (3, 5)
  np.testing.assert_array_equal(windows.reshape(-1), np.arange(15))
  assert make_windows(tokens, 4, None).shape == (6, 5)
  assert make_windows(tokens, 29, None).shape == (1, 30)


def test_make_windows_text_too_short():
  with pytest.raises(ValueError, match=r"text too short: 10 tokens, but one window of seq_len=16"):
    make_windows(np.arange(10), 16, 1)
  with pytest.raises(ValueError, match=r"text too short: 10 tokens.*needs 11"):
    make_windows(np.arange(10), 10, None)


def test_make_windows_too_many():
  with pytest.raises(ValueError, match=r"num_windows=7 windows of seq_len=4: 30 tokens give 6"):
    make_windows(np.arange(30), 4, 7)


@pytest.mark.parametrize("seq_len", [0, -3])
def test_make_windows_bad_seq_len(seq_len):
  with pytest.raises(ValueError, match=rf"seq_len must be >= 1, got {seq_len}"):
    make_windows(np.arange(30), seq_len, 1)


def test_make_windows_bad_num_windows():
  with pytest.raises(ValueError, match=r"num_windows must be >= 1 \(or None for all\), got 0"):
    make_windows(np.arange(30), 4, 0)
