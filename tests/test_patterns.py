"""NMPattern: parsing, validation messages, width checks, value semantics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from amber_jax.core.patterns import NMPattern, parse_pattern_or_dense


@pytest.mark.parametrize(
  "spec, n, m",
  [("2:4", 2, 4), ("8:16", 8, 16), (" 4 : 8 ", 4, 8), ("1:2", 1, 2), ("31:32", 31, 32)],
)
def test_parse_valid(spec, n, m):
  pattern = NMPattern.parse(spec)
  assert (pattern.n, pattern.m) == (n, m)
  assert str(pattern) == f"{n}:{m}"
  assert pattern.density == n / m


def test_parse_passes_a_pattern_through():
  pattern = NMPattern(n=2, m=4)
  assert NMPattern.parse(pattern) is pattern


@pytest.mark.parametrize(
  "spec, match",
  [
    ("3:2", r"1 <= N < M.*2:4"),  # N > M.
    ("0:4", r"1 <= N < M"),
    ("4:4", r"1 <= N < M"),
    ("1:1", r"M must be >= 2"),
    ("8", r"'N:M'.*1 <= N < M.*'8'"),
    ("a:b", r"'N:M'.*'a:b'"),
    ("", r"'N:M'.*''"),
    ("-1:4", r"'N:M'.*1 <= N < M.*'-1:4'"),
    ("2:4:8", r"'N:M'"),
    ("2.0:4", r"'N:M'"),
  ],
)
def test_parse_invalid(spec, match):
  with pytest.raises(ValueError, match=match):
    NMPattern.parse(spec)


@pytest.mark.parametrize("spec", [None, 8, (2, 4)])
def test_parse_wrong_type(spec):
  with pytest.raises(TypeError, match="pattern must be a string"):
    NMPattern.parse(spec)


@pytest.mark.parametrize("n, m", [(True, 4), (2, 4.0), ("2", 4)])
def test_constructor_needs_ints(n, m):
  with pytest.raises(TypeError, match="must be an int"):
    NMPattern(n=n, m=m)


def test_constructor_is_keyword_only():
  with pytest.raises(TypeError):
    NMPattern(2, 4)  # type: ignore[misc]


@pytest.mark.parametrize("spec", ["dense", "Dense", " none ", "NONE"])
def test_parse_pattern_or_dense_gives_none(spec):
  assert parse_pattern_or_dense(spec) is None


def test_parse_pattern_or_dense_parses_patterns():
  assert parse_pattern_or_dense("8:16") == NMPattern(n=8, m=16)
  with pytest.raises(ValueError, match="'N:M'"):
    parse_pattern_or_dense("sparse")


def test_check_width_accepts_multiples():
  NMPattern(n=8, m=16).check_width(576)
  NMPattern(n=2, m=4).check_width(4)


def test_check_width_names_width_and_projection():
  pattern = NMPattern(n=8, m=15)
  with pytest.raises(ValueError) as info:
    pattern.check_width(576, where="q-projection input")
  message = str(info.value)
  assert "8:15" in message
  assert "576" in message
  assert "q-projection input" in message
  assert "M=15 must divide" in message
  # The valid alternatives for this width are listed (every M up to 128 that divides it).
  assert "[2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 36, 48, 64, 72, 96]" in message


def test_check_width_default_where():
  with pytest.raises(ValueError, match=r"M=4 must divide the input width 6"):
    NMPattern(n=2, m=4).check_width(6)


def test_frozen_hashable_value_equality():
  a, b = NMPattern.parse("8:16"), NMPattern(n=8, m=16)
  assert a == b and a is not b
  assert hash(a) == hash(b)
  assert a != NMPattern(n=4, m=16)
  assert len({a, b, NMPattern(n=2, m=4)}) == 2
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.n = 4  # type: ignore[misc]


def test_equal_patterns_do_not_recompile():
  traces = []

  def f(x, pattern):
    traces.append(pattern)
    return x * pattern.n

  jitted = jax.jit(f, static_argnums=1)
  x = jnp.ones((4,), jnp.float32)
  jitted(x, NMPattern(n=2, m=4))
  jitted(x, NMPattern.parse(" 2 : 4 "))
  assert len(traces) == 1
  jitted(x, NMPattern(n=1, m=4))
  assert len(traces) == 2
