"""Score factors learned with optax: the weights stay frozen, only the N:M selection changes.

A plan's score is ``|x| * f`` per input channel (``f`` = the plan's ``factors``). Here ``f`` is
trained on calibration windows to minimise the KL divergence between the dense model's and the
sparse model's next-token distributions. The top-N selection has no gradient, so training uses a
straight-through estimator: the forward pass keeps the exact hard N:M mask (what inference
does), and the backward pass differentiates a sigmoid relaxation of it around the group's
threshold (the midpoint between the N-th and the (N+1)-th largest score), at a temperature
relative to the group's mean score. ``f`` is parametrised as ``exp(theta)`` (positive, scale
free) and starts from the plan's factors (e.g. the robust score's).

Only sites the plan sparsifies are trained; the learned factors replace the plan's ``factors``
(plain data: no recompilation, saved with the plan by ``plan_io``). With ``learn_scales`` a
per-output-channel scale of every sparse site is learned too (``exp`` of a parameter starting at
0) and stored as the ``out_scale`` of the plan's correction
(``amber_jax.calibrate.correction_fit``), which the ordinary model applies. A plan that already has
a correction (e.g. the median centring) is trained through it: the straight-through mask is taken on
the centred input exactly as the corrected model does, and learned scales multiply the correction's
output scale and bias. Float plans only (a W8A8 plan's quantization is not differentiated here).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amber_jax.calibrate.correction_fit import identity_correction
from amber_jax.core.correction import corrected_sparse_matmul
from amber_jax.core.linear import row_factors, site_product
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import nm_mask, nm_scores
from amber_jax.model.config import LlamaConfig
from amber_jax.model.llama import forward, lm_head, model_pass
from amber_jax.plan.schema import SparsityPlan
from amber_jax.util.progress import progress_bar


def ste_sparsify(
  x: jax.Array,
  pattern: NMPattern,
  factors: jax.Array,
  temperature: float,
  channel_order: jax.Array | None = None,
) -> jax.Array:
  """``sparsify(x, pattern, factors, channel_order=...)`` in the forward pass; a sigmoid
  surrogate's gradient with respect to ``factors`` (and ``x``) in the backward pass."""
  if channel_order is not None:  # groups are consecutive in the permuted order
    xs = ste_sparsify(
      jnp.take(x, channel_order, axis=-1), pattern, jnp.take(factors, channel_order), temperature
    )
    return jnp.take(xs, jnp.argsort(channel_order), axis=-1)
  score = nm_scores(x, factors)
  hard = nm_mask(jax.lax.stop_gradient(score), pattern)
  *lead, width = score.shape
  groups = score.reshape(*lead, width // pattern.m, pattern.m)
  top = jax.lax.top_k(jax.lax.stop_gradient(groups), pattern.n + 1)[0]
  threshold = 0.5 * (top[..., pattern.n - 1] + top[..., pattern.n])
  scale = jax.lax.stop_gradient(jnp.mean(groups, axis=-1)) + 1e-6
  soft = jax.nn.sigmoid((groups - threshold[..., None]) / (temperature * scale[..., None]))
  # A group holding an inf/NaN score gives inf - inf = NaN in ``soft``, and NaN - NaN would
  # spread into the forward mask: such entries get no surrogate (soft only feeds the gradient).
  soft = jnp.where(jnp.isfinite(soft), soft, 0.0).reshape(score.shape)
  mask = hard.astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))  # exactly hard
  # A dropped inf (more infinite entries than N in a group) must read 0 as in sparsify, not
  # inf * 0 = NaN; it passes no gradient.
  return jnp.where(hard | jnp.isfinite(x), x * mask.astype(x.dtype), jnp.zeros((), x.dtype))


def _sparse_logits(params, tokens_BxT, theta, plan, *, config, temperature):
  """Logits with the STE mask at enabled sites; ``theta["factors"]`` site -> [L, d_in] log score
  factors, ``theta["scales"]`` (or None) site -> [L, d_out] log output scales of sparse sites;
  ``plan`` gives the enabled sites, pattern, channel orders and correction."""
  scales = theta["scales"]
  pattern, correction = plan.pattern, plan.correction
  orders = plan.channel_order or {}
  hook_xs = {}
  for p in plan.enabled:
    row = {"enabled": plan.enabled[p], "log_factors": theta["factors"][p]}
    if scales is not None:
      row["log_scale"] = scales[p]
    if p in orders:
      row["channel_order"] = orders[p]
    if correction is not None:
      row["correction"] = correction[p]
    hook_xs[p] = row

  def hook(name, x, weights, row, linear):
    del name, linear  # the dense plan's product is replaced by the straight-through one
    on, log_scale, corr = row["enabled"], row.get("log_scale"), row.get("correction")
    w = weights["w"].astype(x.dtype)

    def ste(v):  # an expert site's rows each take their expert's factors
      factors = row_factors(jnp.exp(row["log_factors"]), weights)
      return ste_sparsify(v, pattern, factors, temperature, row.get("channel_order"))

    if corr is None:
      y = site_product(jnp.where(on, ste(x), x), weights)
    else:  # the model's corrected path, with the straight-through mask
      y_sparse = corrected_sparse_matmul(x, w, pattern, None, corr, sparsify_fn=ste)
      y = jnp.where(on, y_sparse, jnp.einsum("...i,io->...o", x, w))
    if log_scale is not None:  # the plan's correction out_scale, on sparse sites only
      scale = row_factors(jnp.exp(log_scale), weights).astype(y.dtype)
      scale = scale.reshape((1,) * (y.ndim - scale.ndim) + scale.shape)
      y = jnp.where(on, y * scale, y)
    if "b" in weights:
      b = row_factors(weights["b"], weights).astype(y.dtype)
      y = y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)
    return y, None

  out = model_pass(params, tokens_BxT, config=config, hook=hook, hook_xs=hook_xs)
  return lm_head(config, params, out.hidden)


@functools.partial(jax.jit, static_argnames=("config",))
def _teacher_logprobs(params, tokens_BxT, *, config):
  """The dense model's next-token log-probabilities (bf16 to halve their memory)."""
  logits = forward(params, tokens_BxT, config=config)
  return jax.nn.log_softmax(logits, axis=-1).astype(jnp.bfloat16)


def _kl(params, tokens, teacher, theta, plan, *, config, temperature):
  logits = _sparse_logits(params, tokens, theta, plan, config=config, temperature=temperature)
  logp = jax.nn.log_softmax(logits, axis=-1)
  teacher = teacher.astype(jnp.float32)
  return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - logp), axis=-1))


def dense_teacher(params, tokens_BxT, *, config: LlamaConfig) -> jax.Array:
  """The dense model's next-token log-probabilities [B, T, V] (bf16), the target of ``ste_kl``."""
  return _teacher_logprobs(params, tokens_BxT, config=config)


def ste_kl(params, tokens_BxT, teacher, plan: SparsityPlan, *, config, temperature: float = 0.5):
  """KL(dense || plan) per token (nats) with the straight-through mask at the plan's enabled
  sites and the plan's own factors: differentiable in ``params`` (what a learned rotation of
  the weights trains through; ``teacher`` from ``dense_teacher``)."""
  theta = {
    "factors": {p: jnp.log(jnp.maximum(plan.factors[p], 1e-6)) for p in plan.enabled},
    "scales": None,
  }
  return _kl(params, tokens_BxT, teacher, theta, plan, config=config, temperature=temperature)


def train_on_batches(
  theta, kl, opt, params, batches, teachers, *, steps: int, seed: int, desc: str, show_progress
):
  """``steps`` optimiser (``opt``, optax) steps of ``theta`` on ``kl(theta, params, tokens,
  teacher)``, each on a batch drawn at random (``seed``) from ``batches`` / ``teachers`` (the
  learned factors' and the learned rotation's loop). Returns (theta, the training batch's KL
  before each step, the mean KL over all batches before and after).

  The weights are an argument of the jitted loss, never a closure: a closed-over array becomes
  a constant of the compiled function (a second copy of the model, and slow constant folding).
  """
  loss_and_grad = jax.jit(jax.value_and_grad(kl, argnums=0))
  kl_only = jax.jit(kl)

  def mean_kl(th):
    return float(
      np.mean([float(kl_only(th, params, b, t)) for b, t in zip(batches, teachers, strict=True)])
    )

  state = opt.init(theta)
  initial = mean_kl(theta)
  rng = np.random.default_rng(seed)
  losses = []
  with progress_bar(total=steps, desc=desc, unit="step", disable=not show_progress) as bar:
    for _ in range(steps):
      i = int(rng.integers(len(batches)))
      loss, grads = loss_and_grad(theta, params, batches[i], teachers[i])
      updates, state = opt.update(grads, state, theta)
      theta = optax.apply_updates(theta, updates)
      losses.append(float(loss))
      bar.set_postfix(kl=f"{float(loss):.4f}")
      bar.update(1)
  return theta, losses, initial, mean_kl(theta)


@dataclasses.dataclass(frozen=True)
class LearnedFactors:
  """What ``learn_score_factors`` returns: the plan with the learned factors, and its losses."""

  plan: SparsityPlan  # the input plan with the learned factors
  losses: list[float]  # KL (nats/token) on the training batch, per step (before the update)
  initial_kl: float  # mean KL over all calibration windows, before / after training
  final_kl: float
  seconds: float


def learn_score_factors(
  params,
  plan: SparsityPlan,
  calib_windows: np.ndarray,
  *,
  config: LlamaConfig,
  steps: int = 60,
  learning_rate: float = 0.05,
  temperature: float = 0.5,
  batch_size: int = 2,
  seed: int = 0,
  learn_scales: bool = False,
  scale_learning_rate: float = 0.005,
  show_progress: bool = True,
) -> LearnedFactors:
  """Trains the plan's score factors (and with ``learn_scales`` the sparse sites' output
  scales) on ``calib_windows`` ([W, T+1] or [W, T] token ids; the inputs are the first T) to
  minimise KL(dense || sparse) of the next-token distributions.

  Raises:
    ValueError: the plan is dense or W8A8, bad steps/learning
      rate/temperature/batch size, or no calibration windows.
  """
  if plan.pattern is None:
    raise ValueError("plan has no N:M pattern: there are no score factors to learn")
  if plan.quant is not None:
    raise ValueError("learn_score_factors takes float plans (plan.quant must be None)")
  for name, v in (("steps", steps), ("batch_size", batch_size)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  if not learning_rate > 0 or not temperature > 0 or not scale_learning_rate > 0:
    raise ValueError(
      "learning_rate, scale_learning_rate and temperature must be > 0, got "
      f"{learning_rate}, {scale_learning_rate}, {temperature}"
    )
  windows = np.asarray(calib_windows, np.int32)
  if windows.ndim != 2 or len(windows) == 0:
    raise ValueError(f"calib_windows must be [W >= 1, T], got shape {windows.shape}")
  start = time.perf_counter()
  tokens = jnp.asarray(windows[:, :-1] if windows.shape[1] > 1 else windows)
  batches = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
  teachers = [_teacher_logprobs(params, b, config=config) for b in batches]
  enabled = dict(plan.enabled)
  theta = {
    "factors": {p: jnp.log(jnp.maximum(plan.factors[p], 1e-6)) for p in enabled},
    "scales": None,
  }
  if learn_scales:
    theta["scales"] = {p: jnp.zeros((config.n_layers, config.sites[p].d_out)) for p in enabled}
  kw = dict(config=config, temperature=temperature)
  kl = lambda th, weights, tok, tea: _kl(weights, tok, tea, th, plan, **kw)
  # Adam moves every parameter by about its learning rate per step. For the output scales that
  # must be small: at 0.05 (the factors' rate) all of a site's channels move by ~5% at once, and
  # on SmolLM2-135M the KL tripled after one step (0.20 -> 0.60) and perplexity rose 40.3 -> 45.6.
  opt = optax.multi_transform(
    {"factors": optax.adam(learning_rate), "scales": optax.adam(scale_learning_rate)},
    lambda th: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in th.items()},
  )
  theta, losses, initial, final = train_on_batches(
    theta,
    kl,
    opt,
    params,
    batches,
    teachers,
    steps=steps,
    seed=seed,
    desc="learn factors",
    show_progress=show_progress,
  )
  factors = {p: jnp.exp(theta["factors"][p]).astype(jnp.float32) for p in enabled}
  learned = plan.replace(factors=factors)
  if learn_scales:
    # The learned scale multiplies the site's corrected output: its out_scale and out_bias.
    base = identity_correction(config) if plan.correction is None else plan.correction
    correction = {}
    for p in enabled:
      scale = jnp.exp(theta["scales"][p]).astype(jnp.float32)
      correction[p] = dict(
        base[p], out_scale=scale * base[p]["out_scale"], out_bias=scale * base[p]["out_bias"]
      )
    learned = learned.replace(correction=correction)
  return LearnedFactors(
    plan=learned,
    losses=losses,
    initial_kl=initial,
    final_kl=final,
    seconds=time.perf_counter() - start,
  )
