"""Rotation recipes: which change of basis at each of three places, by name, and applying one.

A ``Rotation`` names a basis for each place a model's N:M groups read:

* ``residual`` (what q/k/v/gate/up read; one Q for every layer, folded, free): "none", "fold"
  (the norm weights folded into the readers, Q = I: what every other basis starts from), "pca"
  (eigenvectors of the calibrated covariance, strided), "balance" (a permutation only: channels
  strided by calibrated energy), "hadamard" (random signs times a Hadamard matrix), "random"
  (Haar-random orthogonal);
* ``heads`` (what o reads; per layer and value head, folded into v and o, free): "none", "pca",
  "hadamard", "random";
* ``hidden`` (what down reads): "none", "balance" (a free permutation of the MLP channels,
  strided by energy), "hadamard" (an online Hadamard transform, not free:
  ``LlamaConfig.mlp_hidden_hadamard``).

Names: "none", or parts joined by "+", each ``res_<basis>``, ``head_<basis>`` or
``down_<basis>`` (e.g. "res_pca+head_pca+down_balance"), and ``learn<N>``: N optimiser steps of
a residual rotation learned on top of the residual basis through a plan's straight-through mask
(``amber_jax.rotate.learned``; it needs the plan, so ``rotate_model`` builds the rest and
``with_learned_rotation`` adds it). The calibrated bases ("pca", "balance") are laid out for a
group size M (``amber_jax.rotate.bases.strided_order``), so a rotation is built per N:M
pattern. Calibration statistics come from calibration windows only.

Measured on SmolLM2-135M (RESULTS.md "rotation-notes"): Hadamard and random bases make
magnitude N:M selection far worse; head PCA helps o; the residual PCA helps the calibration
text and hurts a held-out one.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from amber_jax.core.hadamard import hadamard_factors, hadamard_matrix, random_signs
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import forward
from amber_jax.rotate.bases import (
  RotationStats,
  collect_rotation_stats,
  pca_basis,
  permutation_basis,
  random_hadamard,
  random_orthogonal,
  strided_order,
)
from amber_jax.rotate.fold import fold_norms
from amber_jax.rotate.orthogonal import (
  hadamard_mlp_hidden,
  permute_mlp_hidden,
  rotate_heads,
  rotate_residual,
)

RESIDUAL_BASES = ("none", "fold", "pca", "balance", "hadamard", "random")
HEAD_BASES = ("none", "pca", "hadamard", "random")
HIDDEN_BASES = ("none", "balance", "hadamard")
# name prefix -> (field, valid bases)
PARTS = {
  "res": ("residual", RESIDUAL_BASES),
  "head": ("heads", HEAD_BASES),
  "down": ("hidden", HIDDEN_BASES),
}
CALIBRATED = ("pca", "balance")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rotation:
  """A change of basis at each place N:M groups read (module docstring); all "none" = the
  model unchanged. ``seed`` fixes the random signs and matrices."""

  residual: str = "none"
  heads: str = "none"
  hidden: str = "none"
  learn_steps: int = 0
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.learn_steps, int) or self.learn_steps < 0:
      raise ValueError(f"Rotation: learn_steps must be an int >= 0, got {self.learn_steps!r}")
    if self.learn_steps and self.residual == "none":
      raise ValueError(
        "Rotation: a learned rotation (learn<N>) turns the residual stream, which needs a "
        "residual basis to start from (res_fold, res_pca, ...)"
      )
    for prefix, (field, valid) in PARTS.items():
      value = getattr(self, field)
      if value not in valid:
        raise ValueError(
          f"Rotation: {field} ({prefix}_...) must be one of {', '.join(valid)}, got {value!r}"
        )

  @classmethod
  def parse(cls, spec: str, *, seed: int = 0) -> Rotation:
    """The rotation a name stands for ("none", "res_pca", "res_hadamard+down_hadamard", ...);
    ValueError naming the part that is not valid."""
    if not isinstance(spec, str) or not spec.strip():
      raise ValueError(f"rotation must be a non-empty name such as 'res_pca', got {spec!r}")
    if spec.strip() == "none":
      return cls(seed=seed)
    fields = {}
    for part in spec.strip().split("+"):
      if part.startswith("learn"):
        steps = part[len("learn") :]
        if not steps.isdigit() or int(steps) < 1 or "learn_steps" in fields:
          raise ValueError(
            f"rotation {spec!r}: {part!r} must be learn<N> with N >= 1 steps, given once"
          )
        fields["learn_steps"] = int(steps)
        continue
      prefix, _, basis = part.partition("_")
      if prefix not in PARTS or not basis:
        raise ValueError(
          f"rotation {spec!r}: part {part!r} must be <place>_<basis> with place one of "
          f"{', '.join(PARTS)} (e.g. res_pca, head_pca, down_hadamard)"
        )
      field, valid = PARTS[prefix]
      if field in fields:
        raise ValueError(f"rotation {spec!r} names the {prefix} basis twice")
      if basis not in valid or basis == "none":
        raise ValueError(
          f"rotation {spec!r}: {prefix}_{basis} is not valid; {prefix}_ takes "
          f"{', '.join(v for v in valid if v != 'none')}"
        )
      fields[field] = basis
    return cls(**fields, seed=seed)

  @property
  def name(self) -> str:
    parts = [
      f"{prefix}_{getattr(self, field)}"
      for prefix, (field, _) in PARTS.items()
      if getattr(self, field) != "none"
    ]
    if self.learn_steps:
      parts.append(f"learn{self.learn_steps}")
    return "+".join(parts) or "none"

  @property
  def is_identity(self) -> bool:
    return self.name == "none"

  def without_learning(self) -> Rotation:
    """The same bases with no learned part (what ``rotate_model`` builds)."""
    return dataclasses.replace(self, learn_steps=0)

  @property
  def calibrated(self) -> bool:
    """True if some basis comes from calibration statistics."""
    return any(getattr(self, f) in CALIBRATED for f, _ in PARTS.values())

  @property
  def inference_cost(self) -> str:
    """What the rotation adds at inference ("none": every part is folded into weights)."""
    return "online Hadamard of down's input" if self.hidden == "hadamard" else "none"


@dataclasses.dataclass(frozen=True)
class RotatedModel:
  """Params and config of a rotated model (``config`` may differ: an untied LM head after
  folding, ``mlp_hidden_hadamard``), the rotation, its calibration seconds and, with a check,
  the largest |logit| change of the dense model on the check tokens, with passes in float32 and
  in float64 (``dense_logit_gap``)."""

  params: dict
  config: LlamaConfig
  rotation: Rotation
  seconds: float
  dense_logit_gap: float | None = None
  dense_logit_gap_f64: float | None = None


def _residual_basis(rotation: Rotation, stats: RotationStats | None, d: int, m: int):
  kind = rotation.residual
  if kind == "pca":
    return pca_basis(stats.residual_cov, m)
  if kind == "balance":
    return permutation_basis(strided_order(np.diagonal(stats.residual_cov), m))
  if kind == "hadamard":
    return random_hadamard(d, seed=rotation.seed)
  if kind == "fold":
    return None
  return random_orthogonal(d, seed=rotation.seed)


def _head_bases(rotation: Rotation, stats: RotationStats | None, config: LlamaConfig, m: int):
  c, kind = config, rotation.heads
  lead = (c.n_layers, c.n_kv_heads)
  if kind == "pca":
    return pca_basis(stats.head_cov, m)
  if kind == "hadamard":
    h = hadamard_matrix(c.head_dim) / np.sqrt(c.head_dim)
    s = np.stack(
      [random_signs(c.head_dim, seed=rotation.seed + 1 + i) for i in range(np.prod(lead))]
    )
    return (s[:, :, None] * h).reshape(*lead, c.head_dim, c.head_dim)
  return random_orthogonal(c.head_dim, seed=rotation.seed + 1, lead=lead)


def check_rotation_for(config: LlamaConfig, rotation: Rotation, m: int) -> None:
  """ValueError before any work if ``rotation`` cannot be built for ``config`` with groups of
  ``m`` (a calibrated layout needs m to divide the width it orders; an online Hadamard needs a
  dense MLP and a Hadamard order; mixture-of-experts hidden channels are per expert)."""
  widths = {"residual": config.d_model, "heads": config.head_dim, "hidden": config.mlp_width}
  for field, width in widths.items():
    kind = getattr(rotation, field)
    if kind in CALIBRATED and width % m:
      raise ValueError(
        f"rotation {rotation.name}: the {field} width {width} is not a multiple of the group "
        f"size M={m}"
      )
    if kind == "hadamard":
      hadamard_factors(width)
  if rotation.hidden != "none" and config.moe is not None:
    raise ValueError(
      f"rotation {rotation.name}: down_{rotation.hidden} is not supported for mixture-of-experts "
      "MLPs (their hidden channels are per expert)"
    )


def rotate_model(
  params,
  config: LlamaConfig,
  rotation: Rotation | str,
  *,
  m: int,
  calib_windows: np.ndarray | None = None,
  check_tokens: np.ndarray | None = None,
  batch_size: int = 2,
  dtype=jnp.float32,
  show_progress: bool = True,
) -> RotatedModel:
  """``params`` under ``rotation`` (a ``Rotation`` or its name), with calibrated layouts for N:M
  groups of size ``m``. ``calib_windows`` [W, T] token ids feed the calibrated bases ("pca",
  "balance"; required for those). With ``check_tokens`` [B, T], the dense model's logits
  before and after are compared (``RotatedModel.dense_logit_gap``, passes in float32 and in
  float64)."""
  rotation = Rotation.parse(rotation) if isinstance(rotation, str) else rotation
  if rotation.learn_steps:
    raise ValueError(
      f"rotation {rotation.name}: its learned part needs a plan; build "
      f"{rotation.without_learning().name!r} here, then amber_jax.rotate.learned."
      "with_learned_rotation"
    )
  check_rotation_for(config, rotation, m)
  if rotation.calibrated and calib_windows is None:
    raise ValueError(f"rotation {rotation.name} is calibrated: give calib_windows")
  start = time.perf_counter()
  new_params, new_config = params, config
  if rotation.residual != "none":
    new_params, new_config = fold_norms(params, config)
  stats = None
  if rotation.calibrated:
    stats = collect_rotation_stats(
      new_params,
      calib_windows,
      config=new_config,
      batch_size=batch_size,
      dtype=dtype,
      show_progress=show_progress,
    )
  if rotation.residual != "none":
    q = _residual_basis(rotation, stats, config.d_model, m)
    if q is not None:
      new_params = rotate_residual(new_params, new_config, q)
  if rotation.heads != "none":
    new_params = rotate_heads(new_params, new_config, _head_bases(rotation, stats, config, m))
  if rotation.hidden == "balance":
    new_params = permute_mlp_hidden(new_params, new_config, strided_order(stats.hidden_energy, m))
  elif rotation.hidden == "hadamard":
    signs = np.stack(
      [random_signs(config.d_ff, seed=rotation.seed + 10_000 + l) for l in range(config.n_layers)]
    )
    new_params, new_config = hadamard_mlp_hidden(new_params, new_config, signs)
  new_params = jax.block_until_ready(new_params)
  seconds = time.perf_counter() - start
  gaps = [None, None]
  if check_tokens is not None:
    gaps = [
      dense_logit_gap(params, config, new_params, new_config, check_tokens, float64=f64)
      for f64 in (False, True)
    ]
  return RotatedModel(new_params, new_config, rotation, seconds, *gaps)


def dense_logit_gap(
  params, config, rotated_params, rotated_config, tokens_BxT, *, float64: bool = False
) -> float:
  """max |logits(params) - logits(rotated_params)| of the dense models on ``tokens_BxT``.

  The folded rotations are exact, so this is rounding only. In float32 (the default) the pass
  itself rounds differently once a weight's rows are reordered or mixed: a pure permutation of
  the MLP channels moves SmolLM2-135M's logits by about 1e-4 on 512 tokens. With ``float64``
  both passes run in float64 (the weights as stored), which leaves the rotation's own error."""
  tokens = jnp.asarray(np.asarray(tokens_BxT, np.int32))
  if not float64:
    a = forward(params, tokens, config=config, dtype=jnp.float32)
    b = forward(rotated_params, tokens, config=rotated_config, dtype=jnp.float32)
    return float(jnp.max(jnp.abs(a - b)))
  with jax.enable_x64(True):
    up = functools.partial(jax.tree.map, lambda x: jnp.asarray(np.asarray(x, np.float64)))
    a = forward(up(params), tokens, config=config, dtype=jnp.float64)
    b = forward(up(rotated_params), tokens, config=rotated_config, dtype=jnp.float64)
    return float(jnp.max(jnp.abs(a - b)))
