"""The output correction of one N:M site, as pure maths (no model, no calibration).

At an enabled site with a correction (``amber_jax.calibrate.correction_fit`` fits the arrays; the
plan holds them stacked over layers), the site's linear computes::

    x_c = x - center                          # per input channel (0: off)
    m   = N:M mask of |x_c| * factors         # the plan's score, on the centred values
    x_s = x_c * m                             # the sparse operand (still exactly N:M)
    g   = ||x_c|| / ||x_s|| per token         # only where token_rescale is 1
    y   = ((x_s * in_scale) @ W) * g * out_scale + out_bias

The matmul's operand stays N:M sparse; everything else is elementwise or a per-token /
per-output-channel vector.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import nm_keep


def _row(a: jax.Array, like: jax.Array) -> jax.Array:
  """A per-channel vector [C] broadcastable against ``like`` [..., C], in its dtype."""
  return a.astype(like.dtype).reshape((1,) * (like.ndim - 1) + (-1,))


def token_gain(xc: jax.Array, xs: jax.Array, flag: jax.Array) -> jax.Array:
  """[..., 1] float32: ||x_c|| / ||x_s|| per token where ``flag`` is 1 (else 1)."""
  n_c = jnp.sum(jnp.square(xc.astype(jnp.float32)), axis=-1, keepdims=True)
  n_s = jnp.sum(jnp.square(xs.astype(jnp.float32)), axis=-1, keepdims=True)
  gain = jnp.where(n_s > 0, jnp.sqrt(n_c / jnp.where(n_s > 0, n_s, 1.0)), 1.0)
  return jnp.where(flag > 0, gain, 1.0)


def sparse_operand(x, pattern, factors, center, method, channel_order=None):
  """(x_c, x_s): the centred input and its N:M-sparse version (mask chosen on x_c)."""
  xc = x - _row(center, x)
  keep = nm_keep(xc, pattern, factors, channel_order=channel_order, method=method)
  return xc, jnp.where(keep, xc, jnp.zeros((), xc.dtype))


def corrected_sparse_matmul(
  x: jax.Array,
  w: jax.Array,
  pattern: NMPattern,
  factors: jax.Array,
  correction: dict[str, jax.Array],
  *,
  channel_order: jax.Array | None = None,
  method: str = "auto",
  sparsify_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """One site's corrected sparse output: x [..., d_in], w [d_in, d_out] -> [..., d_out].

  ``correction`` holds this site's row of the plan's arrays (see the module docstring);
  ``channel_order`` forms the N:M groups as in ``amber_jax.core.sparsity.nm_keep``.
  ``sparsify_fn`` (x_c -> its N:M-sparse version) replaces the hard mask of ``pattern`` and
  ``factors``, e.g. with the straight-through mask that ``amber_jax.calibrate.learned_factors``
  trains.
  """
  if sparsify_fn is None:
    xc, xs = sparse_operand(x, pattern, factors, correction["center"], method, channel_order)
  else:
    xc = x - _row(correction["center"], x)
    xs = sparsify_fn(xc)
  gain = token_gain(xc, xs, correction["token_rescale"]).astype(x.dtype)
  y = jnp.einsum("...i,io->...o", xs * _row(correction["in_scale"], xs), w)
  return y * gain * _row(correction["out_scale"], y) + _row(correction["out_bias"], y)
