"""Frozen configuration of a Llama-family decoder (Llama, Llama-3, Mistral, Qwen2, Qwen3,
Qwen3-MoE, SmolLM2)."""

from __future__ import annotations

import dataclasses
import functools
import operator

from amber_jax.core.sites import Site, SiteSet


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 style RoPE frequency scaling ("rope_type": "llama3" in HF configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtureOfExperts:
  """A sparse mixture-of-experts MLP (Qwen3-MoE): a dense router picks ``n_active`` of
  ``n_experts`` SwiGLU experts of width ``d_ff`` per token (softmax over all experts, then top-k;
  with ``norm_topk_prob`` the k weights are renormalised to sum to 1)."""

  n_experts: int
  n_active: int
  d_ff: int
  norm_topk_prob: bool = True
  # "grouped": each token's rows go to its n_active experts only (the model). "every": every
  # token through every expert, the unselected ones weighted 0 (the same result at E / n_active
  # times the work: the baseline the benchmarks compare the grouped dispatch against).
  dispatch: str = "grouped"

  def __post_init__(self):
    if self.dispatch not in ("grouped", "every"):
      raise ValueError(
        f"MixtureOfExperts: dispatch must be 'grouped' or 'every', got {self.dispatch!r}"
      )
    if self.n_experts < 1 or self.d_ff < 1:
      raise ValueError(
        f"MixtureOfExperts: n_experts and d_ff must be >= 1, got {self.n_experts}, {self.d_ff}"
      )
    if not 1 <= self.n_active <= self.n_experts:
      raise ValueError(
        f"MixtureOfExperts: n_active (num_experts_per_tok) must be in 1..n_experts="
        f"{self.n_experts}, got {self.n_active}"
      )


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
  # Sliding-window attention (Mistral v0.1, some Qwen2): a query attends to the last
  # `sliding_window` positions only. None: full causal attention. The model implements full
  # causal attention only, which equals the windowed one for sequences of at most
  # `sliding_window` positions; `check_seq_len` refuses longer ones.
  sliding_window: int | None = None
  # Qwen3: RMSNorm over each query and key head (weights [head_dim]) before RoPE.
  qk_norm: bool = False
  # Qwen3-MoE: every layer's MLP is a mixture of experts (mixed dense/MoE stacks are refused
  # by the loaders: the layer scan needs one layer shape).
  moe: MixtureOfExperts | None = None
  # Llama-3.1 GGUFs: per-frequency divisors of the RoPE inverse frequencies [head_dim / 2]
  # (llama.cpp's ``rope_freqs`` tensor), used instead of ``rope_scaling``.
  rope_freq_factors: tuple[float, ...] | None = None
  # The MLP's hidden activation (down's input) goes through the orthonormal Hadamard transform
  # (``amber_jax.core.hadamard.hadamard_transform``) before down: an online rotation, set by
  # ``amber_jax.rotate`` together with down's weight rotated to match (dense MLPs only).
  mlp_hidden_hadamard: bool = False

  def __post_init__(self):
    if self.mlp_hidden_hadamard and self.moe is not None:
      raise ValueError(
        "mlp_hidden_hadamard rotates a dense MLP's hidden activation; this model's MLP is a "
        "mixture of experts (not supported)"
      )
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    w = self.sliding_window
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
      raise ValueError(f"sliding_window must be None (full attention) or an int >= 1, got {w!r}")
    f = self.rope_freq_factors
    if f is not None and len(f) != self.head_dim // 2:
      raise ValueError(
        f"rope_freq_factors must have head_dim/2={self.head_dim // 2} entries, got {len(f)}"
      )
    if f is not None and self.rope_scaling is not None:
      raise ValueError("give rope_scaling or rope_freq_factors, not both")

  @property
  def seq_len_limit(self) -> int:
    """The longest sequence ``check_seq_len`` accepts: max_seq_len, or the window if shorter.

    For defaults such as an evaluation's context length or a prefill's max_len.
    """
    if self.sliding_window is None:
      return self.max_seq_len
    return min(self.max_seq_len, self.sliding_window)

  def check_seq_len(self, t: int) -> None:
    """Raises ``ValueError`` unless the model computes a pass over ``t`` positions exactly.

    ``t`` is the number of positions the attention spans: the tokens of a forward or prefill
    pass (checked in ``model_pass``), or prompt plus fed-back generated tokens (checked by the
    generation entry points). Valid: 0 <= t <=
    max_seq_len and, with a sliding window, t <= sliding_window: the model attends fully
    causally, which equals windowed attention (query q sees keys k with q - k < window) only
    when no query is a window or more past a key. ``TypeError`` if ``t`` is not an integer.
    """
    try:
      if isinstance(t, bool):
        raise TypeError
      t = operator.index(t)  # Python or numpy integers.
    except TypeError:
      raise TypeError(f"sequence length t must be an int, got {type(t).__name__} {t!r}") from None
    if t < 0:
      raise ValueError(f"sequence length t must be >= 0, got {t}")
    if t > self.max_seq_len:
      raise ValueError(
        f"sequence length t={t} exceeds the {self.architecture} model's "
        f"max_seq_len={self.max_seq_len}; valid: 0 <= t <= {self.max_seq_len}"
      )
    if self.sliding_window is not None and t > self.sliding_window:
      raise ValueError(
        f"sequence length t={t} exceeds the {self.architecture} model's attention window "
        f"sliding_window={self.sliding_window}: sliding-window attention is not implemented "
        f"(attention is fully causal, exact only up to the window); valid: 0 <= t <= "
        f"{self.seq_len_limit}"
      )

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  @property
  def mlp_width(self) -> int:
    """The width of the MLP's gate/up output: d_ff, or each expert's d_ff with experts."""
    return self.d_ff if self.moe is None else self.moe.d_ff

  @functools.cached_property
  def sites(self) -> SiteSet:
    """The decoder layer's linears, in the order the layer computes them (the declaration the
    rest of the library iterates over; see ``amber_jax.core.sites``). The paper's rules: q and
    gate sparse except in skipped layers, down always sparse, k and v (small under GQA), o and
    up (the most sensitive) dense. With experts, gate/up/down are expert sites (an expert
    axis, ``n_active`` of them per token); the router is not a site (never transformed, and
    excluded from coverage as in the paper)."""
    d, q, kv, ff = self.d_model, self.q_dim, self.kv_dim, self.mlp_width
    experts = {} if self.moe is None else dict(experts=self.moe.n_experts, active=self.moe.n_active)
    attn = dict(reads="attn_norm", folds_into="attn_norm", parallel="column")
    mlp = dict(reads="mlp_norm", folds_into="mlp_norm", parallel="column", **experts)
    return SiteSet(
      (
        Site(name="q", path="attention/q", d_in=d, d_out=q, rule="skippable", **attn),
        Site(name="k", path="attention/k", d_in=d, d_out=kv, rule="dense", **attn),
        Site(name="v", path="attention/v", d_in=d, d_out=kv, rule="dense", **attn),
        Site(
          name="o",
          path="attention/o",
          d_in=q,
          d_out=d,
          reads="attn_out",
          writes="residual",
          parallel="row",
          rule="dense",
          heads=self.n_heads,
        ),
        Site(name="gate", path="mlp/gate", d_in=d, d_out=ff, rule="skippable", **mlp),
        Site(name="up", path="mlp/up", d_in=d, d_out=ff, rule="dense", **mlp),
        Site(
          name="down",
          path="mlp/down",
          d_in=ff,
          d_out=d,
          reads="mlp_hidden",
          writes="residual",
          parallel="row",
          rule="sparse",
          **experts,
        ),
      )
    )

  @property
  def site_names(self) -> tuple[str, ...]:
    """The names of ``sites``, in block order."""
    return self.sites.names

  def linear_shapes(self) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each site of one layer, in site order."""
    return {s.name: s.shape for s in self.sites}


# The Llama family's site names, in block order (what ``LlamaConfig.sites`` declares); code
# outside the architecture's own modules iterates ``config.sites`` instead.
PROJECTIONS = LlamaConfig(
  vocab_size=1, d_model=2, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, d_ff=2
).site_names
