"""A learned residual rotation: an orthogonal Q trained on the KL to the dense model through the
straight-through N:M mask of a fixed plan (SpinQuant's Cayley parametrisation, arXiv
2405.16406, with the sparse model's loss instead of the quantized one).

Q = (I - A)^-1 (I + A) with A skew-symmetric (the Cayley transform: orthogonal for every A, the
identity at A = 0), so optax's Adam trains the free upper triangle of A with no projection
step. The loss is ``amber_jax.calibrate.learned_factors.ste_kl`` of the params rotated by Q in
the graph (``rotate_residual_traced``): the plan's sites, factors and channel orders stay fixed
while its inputs turn. Q is applied on top of whatever basis the params already have (start
from a PCA rotation, ``res_pca``, or the folded model, ``res_fold``), and the result is folded
like every other residual rotation: no inference cost.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amber_jax.calibrate.learned_factors import dense_teacher, ste_kl, train_on_batches
from amber_jax.model.config import LlamaConfig
from amber_jax.plan.schema import SparsityPlan
from amber_jax.rotate.orthogonal import (
  check_residual_rotatable,
  rotate_residual,
  rotate_residual_traced,
)
from amber_jax.rotate.recipe import RotatedModel, Rotation, dense_logit_gap


def cayley(a_DxD: jax.Array) -> jax.Array:
  """The orthogonal (I - A)^-1 (I + A) of the skew part A = U - U^T of ``a``'s strict upper
  triangle U (float32)."""
  u = jnp.triu(a_DxD.astype(jnp.float32), k=1)
  skew = u - u.T
  eye = jnp.eye(a_DxD.shape[0], dtype=jnp.float32)
  return jnp.linalg.solve(eye - skew, eye + skew)


@dataclasses.dataclass(frozen=True)
class LearnedRotation:
  """The learned Q (float64 [D, D], orthogonal; apply with ``rotate_residual``), the training
  batch's KL before each step, and the mean KL over all windows before and after."""

  q: np.ndarray
  losses: list[float]
  initial_kl: float
  final_kl: float
  seconds: float


def learn_residual_rotation(
  params,
  config: LlamaConfig,
  plan: SparsityPlan,
  calib_windows: np.ndarray,
  *,
  steps: int = 8,
  learning_rate: float = 5e-4,
  temperature: float = 0.5,
  batch_size: int = 2,
  seed: int = 0,
  show_progress: bool = True,
) -> LearnedRotation:
  """Trains Q (module docstring) for ``plan`` on ``calib_windows`` ([W, T+1] token ids; the
  first T are the inputs). Adam's first steps move every entry of A by about the learning
  rate, so the rotation turns by up to rate x d_model radians per step when the gradient's
  signs line up: the default keeps that under 0.3 for d_model 576. ``params`` must have folded
  norms (``fold_norms``). ValueError for a dense or W8A8 plan, bad steps, rate or batch size, or
  no windows."""
  if plan.pattern is None or plan.quant is not None:
    raise ValueError("learn_residual_rotation takes a float N:M plan (a pattern, no W8A8 part)")
  if steps < 1 or batch_size < 1 or not learning_rate > 0 or not temperature > 0:
    raise ValueError(
      "steps and batch_size must be >= 1, learning_rate and temperature > 0, got "
      f"{steps}, {batch_size}, {learning_rate}, {temperature}"
    )
  check_residual_rotatable(params, config)
  windows = np.asarray(calib_windows, np.int32)
  if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
    raise ValueError(f"calib_windows must be [W >= 1, T >= 2] token ids, got {windows.shape}")
  start = time.perf_counter()
  tokens = jnp.asarray(windows[:, :-1])
  batches = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
  teachers = [dense_teacher(params, b, config=config) for b in batches]

  def kl(a, weights, tok, teacher):
    rotated = rotate_residual_traced(weights, config, cayley(a))
    return ste_kl(rotated, tok, teacher, plan, config=config, temperature=temperature)

  a, losses, initial, final = train_on_batches(
    jnp.zeros((config.d_model, config.d_model), jnp.float32),
    kl,
    optax.adam(learning_rate),
    params,
    batches,
    teachers,
    steps=steps,
    seed=seed,
    desc="learn rotation",
    show_progress=show_progress,
  )
  q = np.asarray(cayley(a), np.float64)
  # Re-orthogonalise in float64 (the float32 solve is orthogonal to ~1e-6): the nearest
  # orthogonal matrix, U V^T of the SVD.
  u, _, vt = np.linalg.svd(q)
  return LearnedRotation(
    q=u @ vt, losses=losses, initial_kl=initial, final_kl=final, seconds=time.perf_counter() - start
  )


def with_learned_rotation(
  base: RotatedModel,
  rotation: Rotation,
  plan: SparsityPlan,
  calib_windows: np.ndarray,
  *,
  original: tuple[dict, LlamaConfig] | None = None,
  check_tokens: np.ndarray | None = None,
  **learn_kw,
) -> tuple[RotatedModel, LearnedRotation]:
  """``base`` (built by ``rotate_model`` for ``rotation.without_learning()``) turned further by
  a residual rotation learned for ``plan`` over ``rotation.learn_steps`` steps, and the learning
  record. With ``original`` (the unrotated params and config) and ``check_tokens``, the dense
  logit gaps are measured against the original model."""
  if not rotation.learn_steps:
    raise ValueError(f"rotation {rotation.name} has no learned part (learn<N>)")
  if base.rotation != rotation.without_learning():
    raise ValueError(
      f"base is rotated by {base.rotation.name}, not {rotation.without_learning().name}"
    )
  learned = learn_residual_rotation(
    base.params, base.config, plan, calib_windows, steps=rotation.learn_steps, **learn_kw
  )
  params = jax.block_until_ready(rotate_residual(base.params, base.config, learned.q))
  gaps = [None, None]
  if original is not None and check_tokens is not None:
    gaps = [
      dense_logit_gap(*original, params, base.config, check_tokens, float64=f64)
      for f64 in (False, True)
    ]
  seconds = base.seconds + learned.seconds
  return RotatedModel(params, base.config, rotation, seconds, *gaps), learned
