"""N:M sparsity patterns: parsing and validation."""

from __future__ import annotations

import dataclasses
import re

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMPattern:
  """Keep ``n`` entries of every ``m`` consecutive input channels.

  Frozen and compared by value, so it can be a static argument of ``jax.jit``
  without recompiling for equal patterns.
  """

  n: int
  m: int

  def __post_init__(self):
    for name in ("n", "m"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"NMPattern.{name} must be an int, got {value!r}")
    if self.m < 2:
      raise ValueError(f"pattern M must be >= 2, got {self.n}:{self.m}")
    if not 1 <= self.n < self.m:
      raise ValueError(
        f"pattern N must satisfy 1 <= N < M, got {self.n}:{self.m} (valid examples: 2:4, 4:8, 8:16)"
      )

  @classmethod
  def parse(cls, spec: str | NMPattern) -> NMPattern:
    """Parses ``"N:M"`` (e.g. ``"8:16"``); raises ValueError naming what is valid."""
    if isinstance(spec, NMPattern):
      return spec
    if not isinstance(spec, str):
      raise TypeError(f"pattern must be a string like '8:16', got {spec!r}")
    match = _PATTERN_RE.match(spec)
    if match is None:
      raise ValueError(
        f"pattern must look like 'N:M' with integers 1 <= N < M (e.g. '2:4', '8:16'), got {spec!r}"
      )
    return cls(n=int(match.group(1)), m=int(match.group(2)))

  @property
  def density(self) -> float:
    """Share of entries kept, N / M."""
    return self.n / self.m

  def check_width(self, width: int, *, where: str = "input") -> None:
    """Raises ValueError unless M divides ``width`` (the contraction width)."""
    if width % self.m:
      raise ValueError(
        f"pattern {self}: M={self.m} must divide the {where} width {width}; "
        f"valid M for this width (M > 1 dividing it, up to 128): "
        f"{[m for m in range(2, min(width, 128) + 1) if width % m == 0]}"
      )

  def __str__(self) -> str:
    return f"{self.n}:{self.m}"


def parse_pattern_or_dense(spec: str) -> NMPattern | None:
  """``"dense"`` (or ``"none"``) gives None; anything else goes to NMPattern.parse."""
  if isinstance(spec, str) and spec.strip().lower() in ("dense", "none"):
    return None
  return NMPattern.parse(spec)
