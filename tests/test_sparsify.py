"""sparsify: exact N of M, bit-identical survivors, top-N with index tie-break, NaN/inf."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import (
  _keep_mask_pairwise,
  _keep_mask_topk,
  nm_mask,
  nm_scores,
  sparsify,
)

MS = (2, 4, 8, 16, 32, 64)
# Few distinct magnitudes (and signed zeros), so groups are full of ties and zeros.
VALUES = (-2.0, -1.0, -0.0, 0.0, 1.0, 2.0)
# Products of factors and |x| collide too (1 * 2 == 2 * 1), so weighted scores also tie.
FACTORS = (0.5, 1.0, 2.0, 4.0)
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
UINT = {np.dtype(np.float32): np.uint32, np.dtype(ml_dtypes.bfloat16): np.uint16}

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


# The property tests call the jitted transform (one compile per case instead of one per op);
# test_jit_equals_eager checks that eager gives the same bits.
sparsify_jit = jax.jit(sparsify, static_argnums=1)
nm_mask_jit = jax.jit(nm_mask, static_argnums=1)


def bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view(UINT[a.dtype])


def reference_keep(x: np.ndarray, n: int, m: int, factors: np.ndarray | None = None) -> np.ndarray:
  """Top-N of |x| * factors per group of M, ties to the lower index, NaN as +inf (numpy)."""
  score = np.abs(x.astype(np.float32))
  if factors is not None:
    score = score * factors.astype(np.float32)
  score = np.where(np.isnan(score), np.inf, score)
  score_GxM = score.reshape(*score.shape[:-1], -1, m)
  order = np.argsort(-score_GxM, axis=-1, kind="stable")  # Stable: lower index first among ties.
  rank = np.argsort(order, axis=-1, kind="stable")
  return (rank < n).reshape(x.shape)


@st.composite
def cases(draw, with_factors: bool | None = None, min_lead_dims: int = 0):
  m = draw(st.sampled_from(MS))
  n = draw(st.integers(1, m - 1))
  lead = draw(hnp.array_shapes(min_dims=min_lead_dims, max_dims=2, min_side=1, max_side=2))
  width = m * draw(st.integers(1, 3))
  dtype = draw(st.sampled_from(sorted(DTYPES)))
  x = draw(hnp.arrays(np.float32, (*lead, width), elements=st.sampled_from(VALUES)))
  if with_factors is None:
    with_factors = draw(st.booleans())
  factors = None
  if with_factors:
    factors = draw(hnp.arrays(np.float32, (width,), elements=st.sampled_from(FACTORS)))
  return NMPattern(n=n, m=m), x.astype(DTYPES[dtype]), factors


def _jnp(a):
  return None if a is None else jnp.asarray(a)


@SETTINGS
@given(cases())
def test_matches_reference(case):
  pattern, x, factors = case
  out = sparsify_jit(jnp.asarray(x), pattern, _jnp(factors))
  assert out.shape == x.shape
  assert out.dtype == x.dtype
  out = np.asarray(out)
  keep = reference_keep(x, pattern.n, pattern.m, factors)
  # Survivors are bit-identical (signed zeros included); the rest are +0.
  np.testing.assert_array_equal(bits(out)[keep], bits(x)[keep])
  assert not bits(out)[~keep].any()
  # Exactly min(N, nonzeros) nonzero entries survive in every group, whatever the ties.
  grouped = lambda a: a.reshape(*a.shape[:-1], -1, pattern.m).astype(np.float32)
  nonzero_in = np.count_nonzero(grouped(x), axis=-1)
  nonzero_out = np.count_nonzero(grouped(out), axis=-1)
  np.testing.assert_array_equal(nonzero_out, np.minimum(pattern.n, nonzero_in))


@SETTINGS
@given(cases())
def test_mask_keeps_exactly_n_and_the_top_scores(case):
  pattern, x, factors = case
  score = nm_scores(jnp.asarray(x), _jnp(factors))
  keep = np.asarray(nm_mask_jit(score, pattern))
  score = np.asarray(score)
  assert keep.shape == x.shape and keep.dtype == bool
  keep_GxM = keep.reshape(*x.shape[:-1], -1, pattern.m)
  score_GxM = score.reshape(keep_GxM.shape)
  np.testing.assert_array_equal(keep_GxM.sum(-1), pattern.n)
  min_kept = np.where(keep_GxM, score_GxM, np.inf).min(-1)
  max_dropped = np.where(keep_GxM, -np.inf, score_GxM).max(-1)
  assert np.all(min_kept >= max_dropped)
  # Among entries tied with the threshold score, the kept ones precede the dropped ones.
  idx = np.arange(pattern.m)
  tied = score_GxM == min_kept[..., None]
  last_kept_tie = np.where(keep_GxM & tied, idx, -1).max(-1)
  first_dropped_tie = np.where(~keep_GxM & tied, idx, pattern.m).min(-1)
  assert np.all(last_kept_tie < first_dropped_tie)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(cases())
def test_jit_equals_eager(case):
  pattern, x, factors = case
  eager = sparsify(jnp.asarray(x), pattern, _jnp(factors))
  jitted = jax.jit(sparsify, static_argnums=1)(jnp.asarray(x), pattern, _jnp(factors))
  np.testing.assert_array_equal(bits(jitted), bits(eager))


@settings(max_examples=10, deadline=None, derandomize=True)
@given(cases(min_lead_dims=1))
def test_vmap_equals_loop(case):
  pattern, x, factors = case
  f = jax.jit(functools.partial(sparsify, pattern=pattern, factors=_jnp(factors)))
  mapped = jax.vmap(f)(jnp.asarray(x))
  looped = jnp.stack([f(jnp.asarray(row)) for row in x])
  np.testing.assert_array_equal(bits(mapped), bits(looped))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
  st.sampled_from(MS).flatmap(
    lambda m: st.tuples(
      st.just(m),
      st.integers(1, m - 1),
      hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.just(m)),
        elements=st.sampled_from((0.0, 0.5, 1.0, 2.0, np.inf)),
      ),
    )
  )
)
def test_pairwise_and_topk_paths_agree(case):
  m, n, score_GxM = case
  pairwise = np.asarray(jax.jit(_keep_mask_pairwise, static_argnums=1)(score_GxM, n))
  topk = np.asarray(jax.jit(_keep_mask_topk, static_argnums=1)(score_GxM, n))
  np.testing.assert_array_equal(pairwise, topk)
  np.testing.assert_array_equal(pairwise, reference_keep(score_GxM, n, m))


@pytest.mark.parametrize("m", MS)
def test_all_equal_group_keeps_the_first_n(m):
  n = m // 2
  x = jnp.ones((2, 2 * m), jnp.float32)
  out = np.asarray(sparsify(x, NMPattern(n=n, m=m)))
  group = np.r_[np.ones(n), np.zeros(m - n)]
  np.testing.assert_array_equal(out, np.tile(group, (2, 2)))


def test_ties_between_signs_break_by_index():
  x = jnp.asarray([-1.0, 1.0, 1.0, -1.0, 0.0, -3.0, 3.0, 0.0])
  np.testing.assert_array_equal(
    sparsify(x, "2:4"), np.asarray([-1.0, 1.0, 0.0, 0.0, 0.0, -3.0, 3.0, 0.0])
  )
  np.testing.assert_array_equal(sparsify(x, "1:4"), np.asarray([-1, 0, 0, 0, 0, -3, 0, 0.0]))


def test_all_zero_group_stays_zero():
  x = jnp.zeros((3, 8), jnp.bfloat16)
  out = sparsify(x, "2:8")
  assert out.dtype == jnp.bfloat16
  assert not np.asarray(out, np.float32).any()


def test_factors_change_the_choice():
  x = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_array_equal(sparsify(x, "1:4"), [0, 0, 0, 4.0])
  factors = jnp.asarray([10.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(sparsify(x, "1:4", factors), [1.0, 0, 0, 0])
  # A zero factor drops a channel whatever its magnitude (when others are nonzero).
  factors = jnp.asarray([1.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(sparsify(x, "3:4", factors), [1.0, 2.0, 3.0, 0])
  # Weighted scores that tie (4 * 1 == 2 * 2) break by index.
  x = jnp.asarray([4.0, 2.0, 1.0, 1.0])
  factors = jnp.asarray([1.0, 2.0, 1.0, 1.0])
  np.testing.assert_array_equal(sparsify(x, "1:4", factors), [4.0, 0, 0, 0])
  factors = jnp.asarray([0.5, 2.0, 1.0, 1.0])
  np.testing.assert_array_equal(sparsify(x, "1:4", factors), [0, 2.0, 0, 0])


def test_factors_of_ones_equal_no_factors():
  x = jax.random.normal(jax.random.key(0), (4, 32), jnp.float32)
  np.testing.assert_array_equal(
    sparsify(x, "8:16", jnp.ones((32,), jnp.float32)), sparsify(x, "8:16")
  )


def test_pattern_none_returns_x_unchanged():
  x = jnp.asarray([[1.0, -2.0, 3.0]])
  assert sparsify(x, None) is x
  # Widths that no pattern could take are fine when dense.
  assert sparsify(x, None, factors=jnp.ones((5,))) is x


def test_pattern_string_equals_pattern_object():
  x = jax.random.normal(jax.random.key(1), (3, 16), jnp.float32)
  np.testing.assert_array_equal(sparsify(x, "4:8"), sparsify(x, NMPattern(n=4, m=8)))


@pytest.mark.parametrize("m", [4, 64])  # The pairwise and the top_k path.
def test_nan_is_kept_and_propagates(m):
  x = np.zeros((m,), np.float32)
  x[:4] = [1.0, np.nan, 3.0, 2.0]
  out = np.asarray(sparsify(jnp.asarray(x), NMPattern(n=2, m=m)))
  expected = np.zeros_like(x)
  expected[1:3] = [np.nan, 3.0]
  np.testing.assert_array_equal(out, expected)  # assert_array_equal treats NaN == NaN.
  # The NaN reaches the matmul, as in the dense computation.
  w = jnp.ones((m, 3), jnp.float32)
  assert np.isnan(np.asarray(sparsify(jnp.asarray(x), NMPattern(n=2, m=m)) @ w)).all()


@pytest.mark.parametrize("m", [4, 64])
def test_several_nans_keep_the_lowest_index(m):
  x = np.zeros((m,), np.float32)
  x[:4] = [5.0, np.nan, np.nan, 2.0]
  out = np.asarray(sparsify(jnp.asarray(x), NMPattern(n=1, m=m)))
  expected = np.zeros_like(x)
  expected[1] = np.nan
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("m", [4, 64])
def test_inf_is_kept(m):
  x = np.zeros((m,), np.float32)
  x[:4] = [3.0, -np.inf, 1.0, np.inf]
  out = np.asarray(sparsify(jnp.asarray(x), NMPattern(n=1, m=m)))
  expected = np.zeros_like(x)
  expected[1] = -np.inf
  np.testing.assert_array_equal(out, expected)
  out = np.asarray(sparsify(jnp.asarray(x), NMPattern(n=2, m=m)))
  expected[3] = np.inf
  np.testing.assert_array_equal(out, expected)


def test_nan_and_inf_kept_even_with_zero_factor():
  # |inf| * 0 and NaN * 0 are NaN scores, which count as +inf: still kept.
  x = jnp.asarray([np.inf, np.nan, 3.0, 2.0], jnp.float32)
  factors = jnp.asarray([0.0, 0.0, 1.0, 1.0])
  out = np.asarray(sparsify(x, "2:4", factors))
  np.testing.assert_array_equal(out, [np.inf, np.nan, 0, 0])


def test_nm_scores_upcast_and_nan():
  x = jnp.asarray([-2.0, np.nan, 0.5], jnp.bfloat16)
  score = nm_scores(x, jnp.asarray([1.0, 1.0, 4.0]))
  assert score.dtype == jnp.float32
  np.testing.assert_array_equal(score, [2.0, np.inf, 2.0])


@pytest.mark.parametrize("shape", [(3,), (1, 8), (8, 1), ()])
def test_bad_factors_shape(shape):
  x = jnp.ones((2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"factors must have shape \(8,\).*factors.shape="):
    sparsify(x, "2:4", jnp.ones(shape, jnp.float32))


@pytest.mark.parametrize("pattern, width", [("2:4", 6), ("8:16", 24), ("8:15", 576)])
def test_m_must_divide_last_axis(pattern, width):
  x = jnp.ones((2, width), jnp.float32)
  m = pattern.split(":")[1]
  with pytest.raises(ValueError, match=rf"M={m} must divide the last-axis width {width}"):
    sparsify(x, pattern)


def test_scalar_input_is_an_error():
  with pytest.raises(ValueError, match="at least 1 axis"):
    sparsify(jnp.float32(1.0), "2:4")


def test_bad_pattern_string():
  with pytest.raises(ValueError, match="1 <= N < M"):
    sparsify(jnp.ones((4,)), "4:2")


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 8), (8, 16), (5, 12), (16, 32), (20, 64)])
def test_mask_methods_agree_with_ties(n, m):
  from amber_jax.core.sparsity import MASK_METHODS, nm_mask, nm_scores

  x = jax.random.randint(jax.random.key(n * 100 + m), (7, 3 * m), -2, 3).astype(jnp.float32)
  x = x.at[0, :m].set(jnp.nan).at[1, 1].set(jnp.inf)
  pattern = NMPattern(n=n, m=m)
  masks = [np.asarray(nm_mask(nm_scores(x), pattern, method=k)) for k in MASK_METHODS]
  for mask in masks[1:]:
    np.testing.assert_array_equal(mask, masks[0])
  assert (masks[0].reshape(7, 3, m).sum(-1) == n).all()
  with pytest.raises(ValueError, match="method must be"):
    nm_mask(nm_scores(x), pattern, method="bitonic")


@pytest.mark.parametrize("n,m", [(3, 6), (5, 12), (2, 3)])
def test_mask_methods_agree_with_negative_factors(n, m):
  """Negative factors make every score <= 0: the sorting network's padding (M not a power of
  2) must stay below them, or the padded wires would take the top places."""
  from amber_jax.core.sparsity import MASK_METHODS, nm_mask, nm_scores

  x = jax.random.normal(jax.random.key(m), (5, 4 * m), jnp.float32).at[2, 3].set(jnp.inf)
  factors = -jax.random.uniform(jax.random.key(1), (4 * m,), jnp.float32, 0.5, 2.0)
  pattern = NMPattern(n=n, m=m)
  masks = [np.asarray(nm_mask(nm_scores(x, factors), pattern, method=k)) for k in MASK_METHODS]
  for mask in masks[1:]:
    np.testing.assert_array_equal(mask, masks[0])
  assert (masks[0].reshape(5, 4, m).sum(-1) == n).all()


def test_non_finite_activations_are_kept_whatever_their_factor():
  # inf * 0 is NaN, which counts as +inf: an inf activation is kept under any valid factor.
  x = jnp.array([[jnp.inf, 1.0, 2.0, 3.0, -jnp.inf, 5.0, 6.0, 7.0]])
  for factor in (0.0, 0.5, 1.0):
    out = sparsify(x, "2:4", jnp.full((8,), factor))
    assert out[0, 0] == jnp.inf and out[0, 4] == -jnp.inf, factor
    assert int(jnp.sum(out != 0)) == 4


def test_nm_mask_on_raw_nan_scores_keeps_exactly_n_in_every_method():
  from amber_jax.core.sparsity import MASK_METHODS, nm_mask

  scores = jnp.array([[1.0, jnp.nan, 3.0, 2.0, jnp.nan, jnp.nan, 0.0, 1.0]])
  masks = [np.asarray(nm_mask(scores, NMPattern(n=2, m=4), method=k)) for k in MASK_METHODS]
  for mask in masks:
    np.testing.assert_array_equal(mask, [[False, True, True, False, True, True, False, False]])


def test_make_plan_rejects_bad_factors():
  from amber_jax.model.config import LlamaConfig
  from amber_jax.plan.schema import make_plan

  config = LlamaConfig(
    vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
  )
  negative = np.ones((2, 16), np.float32)
  negative[1, 3] = -0.5
  with pytest.raises(ValueError, match=r"factors\['q'\] must be finite and >= 0.*1 negative"):
    make_plan(config, "2:4", factors={"q": negative})
  nan = np.ones((2, 16), np.float32)
  nan[0, 0] = np.nan
  with pytest.raises(ValueError, match=r"factors\['q'\] must be finite.*1 non-finite"):
    make_plan(config, "2:4", factors={"q": nan})
  with pytest.raises(ValueError, match="factors has unknown projections"):
    make_plan(config, "2:4", factors={"gate_proj": np.ones((2, 16), np.float32)})
  make_plan(config, "2:4", factors={"q": np.zeros((2, 16), np.float32)})  # zeros are fine
