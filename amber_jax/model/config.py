"""Frozen configuration of a Llama-family decoder (Llama, Llama-3, Mistral, Qwen2, SmolLM2)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 style RoPE frequency scaling ("rope_type": "llama3" in HF configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Shape and numerics of a Llama-family decoder.

  Frozen and hashable: it is a static argument of the jitted forward pass.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  max_seq_len: int = 8192
  architecture: str = "llama"

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  def linear_shapes(self) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection of one layer, in site order."""
    return {
      "q": (self.d_model, self.q_dim),
      "k": (self.d_model, self.kv_dim),
      "v": (self.d_model, self.kv_dim),
      "o": (self.q_dim, self.d_model),
      "gate": (self.d_model, self.d_ff),
      "up": (self.d_model, self.d_ff),
      "down": (self.d_ff, self.d_model),
    }


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
