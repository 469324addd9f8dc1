"""Make tiny random Hugging Face checkpoints and golden logits for tests/test_hf_loading.py.

Writes, with fixed seeds, three checkpoint directories under `tests/fixtures/hf/`:

- `tiny-llama`: LlamaForCausalLM, Llama-3 RoPE scaling (`rope_type` "llama3", original context 64,
  so all three frequency bands of the scaling are exercised), GQA (4 query / 2 KV heads, head_dim
  16), untied lm_head, saved SHARDED (`model-0000x-of-0000y.safetensors` +
  `model.safetensors.index.json`).
- `tiny-qwen2`: Qwen2ForCausalLM with non-zero random q/k/v biases, tied embeddings, one file.
- `tiny-mistral`: MistralForCausalLM (sliding_window null), 8 query / 2 KV heads of head_dim 16
  given in the config (n_heads * head_dim = 128 != hidden_size 64), one file.

Each directory gets `config.json`, the safetensors weights (float32), a tiny byte-level BPE
`tokenizer.json` (trained here with `tokenizers`) and `golden.npz`:
`tokens` int32 [2, 12], `logits` float32 [2, 12, vocab] and `hidden_states` float32
[n_layers + 1, 2, 12, d_model] (HF's `output_hidden_states`; the last entry has the final norm
applied), computed by HF transformers in fp32 eval mode with attn_implementation="eager" on the
model re-loaded from the written directory.

All weights (norm weights and biases included, which HF initialises to ones and zeros) are drawn
from a seeded numpy generator, scaled so that logits are O(1): a forward pass that gets RoPE,
GQA, the norm convention or the biases wrong misses the goldens by far more than 1e-4.

Needs torch and transformers (the tests do not). Made with:

  pip install torch==2.13.0 transformers==5.24.0   # torch: the CPU wheel, 2.13.0+cpu
  python scripts/make_hf_goldens.py                # about 5 s; prints each fixture's size

Versions used for the stored fixtures: torch 2.13.0+cpu, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, numpy 2.4.6, Python 3.11. Running it again rewrites `tests/fixtures/hf/`
(byte-identical with these versions).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "hf"

BATCH, SEQ = 2, 12

COMMON = dict(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  hidden_act="silu",
)

SPECS = {
  "tiny-llama": dict(
    cls=transformers.LlamaForCausalLM,
    config_cls=transformers.LlamaConfig,
    seed=0,
    shard_size="200KB",
    config=dict(
      COMMON,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      max_position_embeddings=1024,
      rope_theta=10000.0,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
      },
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
  "tiny-qwen2": dict(
    cls=transformers.Qwen2ForCausalLM,
    config_cls=transformers.Qwen2Config,
    seed=1,
    shard_size=None,
    config=dict(
      COMMON,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=512,
      rope_theta=1000000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
      use_sliding_window=False,
      sliding_window=None,
      max_window_layers=2,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
  "tiny-mistral": dict(
    cls=transformers.MistralForCausalLM,
    config_cls=transformers.MistralConfig,
    seed=2,
    shard_size=None,
    config=dict(
      COMMON,
      num_attention_heads=8,
      num_key_value_heads=2,
      head_dim=16,  # n_heads * head_dim = 128 != hidden_size
      max_position_embeddings=256,
      rope_theta=1000000.0,
      rms_norm_eps=1e-5,
      sliding_window=None,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
  "tiny-qwen3": dict(
    cls=transformers.Qwen3ForCausalLM,
    config_cls=transformers.Qwen3Config,
    seed=3,
    shard_size=None,
    config=dict(
      COMMON,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,  # n_heads * head_dim = 128 != hidden_size, as in Qwen3-8B's 4096 vs 4096
      max_position_embeddings=512,
      rope_theta=1000000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
      use_sliding_window=False,
      sliding_window=None,
      attention_bias=False,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
  "tiny-qwen3-moe": dict(
    cls=transformers.Qwen3MoeForCausalLM,
    config_cls=transformers.Qwen3MoeConfig,
    seed=4,
    shard_size="300KB",
    config=dict(
      COMMON,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      num_experts=8,
      num_experts_per_tok=2,
      moe_intermediate_size=32,
      norm_topk_prob=True,
      decoder_sparse_step=1,
      mlp_only_layers=[],
      output_router_logits=False,
      max_position_embeddings=512,
      rope_theta=1000000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      use_sliding_window=False,
      sliding_window=None,
      attention_bias=False,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
}

TOKENIZER_TEXT = [
  "The quick brown fox jumps over the lazy dog.",
  "Sparse activations keep N of every M values along the hidden dimension.",
  "Prefill is compute bound; decode reads the key-value cache and stays dense.",
  "Llama, Mistral and Qwen2 share one decoder: attention, a gated MLP and RMSNorm.",
  "Numbers like 2025, 8:16 and 3.14159 are split into single digits.",
]


def make_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
  """A tiny byte-level BPE (GPT-2 style) trained on a few sentences; vocab <= vocab_size."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<|endoftext|>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(TOKENIZER_TEXT, trainer)
  assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
  return tok


def randomize_(model: torch.nn.Module, rng: np.random.Generator) -> None:
  """Overwrites every parameter with seeded numpy draws (deterministic across torch versions)."""
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      shape = tuple(p.shape)
      if name.endswith("norm.weight"):
        value = 1.0 + 0.2 * rng.standard_normal(shape)
      elif name.endswith(".bias"):
        value = 0.5 * rng.standard_normal(shape)
      elif name.endswith("embed_tokens.weight"):  # Also the lm_head when tied: keep logits O(1).
        value = rng.standard_normal(shape) / np.sqrt(shape[1])
      else:  # Linear weight [(E,) out, in]: unit-variance outputs for unit-variance inputs.
        value = rng.standard_normal(shape) / np.sqrt(shape[-1])
      p.copy_(torch.from_numpy(value.astype(np.float32)))


def make_one(name: str, spec: dict, out_root: pathlib.Path) -> None:
  out = out_root / name
  if out.exists():
    shutil.rmtree(out)
  torch.manual_seed(spec["seed"])
  rng = np.random.default_rng(spec["seed"])
  config = spec["config_cls"](**spec["config"])
  config._attn_implementation = "eager"
  model = spec["cls"](config).to(torch.float32).eval()
  randomize_(model, rng)
  if config.tie_word_embeddings:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

  save_kwargs = {}
  if spec["shard_size"] is not None:
    save_kwargs["max_shard_size"] = spec["shard_size"]
  model.save_pretrained(out, **save_kwargs)
  make_tokenizer(config.vocab_size).save(str(out / "tokenizer.json"))

  reloaded = spec["cls"].from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
  reloaded.eval()
  tokens = rng.integers(0, config.vocab_size, size=(BATCH, SEQ), dtype=np.int64)
  with torch.no_grad():
    result = reloaded(torch.from_numpy(tokens), output_hidden_states=True)
  logits = result.logits.numpy().astype(np.float32)
  hidden = torch.stack(result.hidden_states).numpy().astype(np.float32)
  with torch.no_grad():
    direct = model(torch.from_numpy(tokens)).logits.numpy()
  assert np.array_equal(direct, logits), "reloaded model differs from the saved one"
  np.savez(out / "golden.npz", tokens=tokens.astype(np.int32), logits=logits, hidden_states=hidden)

  files = sorted(p.name for p in out.iterdir())
  size = sum(p.stat().st_size for p in out.iterdir())
  cfg = json.loads((out / "config.json").read_text())
  print(f"{name}: {size / 1024:.0f} KiB, files={files}")
  print(
    f"  model_type={cfg['model_type']} logits std={logits.std():.3f} max|.|={abs(logits).max():.2f}"
  )
  assert size < 1_000_000, f"{name} is {size} bytes; keep fixtures under 1 MB"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--only", nargs="*", choices=sorted(SPECS), help="fixtures to (re)make")
  args = parser.parse_args()
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  torch.use_deterministic_algorithms(True)
  for name, spec in SPECS.items():
    if not args.only or name in args.only:
      make_one(name, spec, args.out)


if __name__ == "__main__":
  main()
