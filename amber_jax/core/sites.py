"""Sites as data: what an architecture declares about each linear it computes.

A *site* is one linear of a repeated block (a decoder layer): the place where the N:M
transform, W8A8 quantization and the other per-site steps of a plan apply. An architecture
declares its sites once (``amber_jax.model.config.LlamaConfig.sites`` for the Llama family);
planners, coverage, sensitivity, site search, corrections, learned factors, W8A8 calibration,
sharding, plan I/O and reports iterate over that declaration instead of naming projections.
Every per-site array of a plan is stacked over the block's layers, ``[L, ...]``, and a site
with an expert axis (a mixture-of-experts block) adds ``[L, E, ...]``.

The declaration says what the rest of the library needs to know, and nothing about how the
block computes:

* ``name``: the key of the site's weights in a layer's params (``layers/<name>/w``) and of its
  rows in a plan; ``path``: where it sits in the block, for people (``attention/q``);
* ``d_in``, ``d_out``: the weight's shape ``[d_in, d_out]`` (``[E, d_in, d_out]`` with experts);
* ``reads``: the activation the site reads. Sites that read the same activation share its
  W8A8 smoothing (a single ``s`` folded into the norm that produced it, where ``folds_into``
  names one) and N:M masks could be shared;
* ``parallel``: how a tensor-parallel mesh splits the weight, "column" (over d_out) or "row"
  (over d_in, Megatron's pairing);
* ``rule``: the paper's default for the site: "sparse" (always), "skippable" (sparse except
  in the layers the policy keeps dense), "dense" (never, under the paper's rules);
* ``writes``: "residual" for a site whose output is added to the residual stream (the stream's
  rotation folds into its output columns, ``amber_jax.rotate``); None otherwise;
* ``heads``: >0 when the input is that many concatenated attention heads (its channels can be
  regrouped across heads, ``amber_jax.plan.channel_order``);
* ``experts``/``active``: the number of experts with their own weight (0: a dense site) and how
  many of them a token uses (multiply-adds per token count only those).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable

RULES = ("sparse", "skippable", "dense")
PARALLEL = ("column", "row")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Site:
  """One linear of a block, as its architecture declares it (see the module docstring)."""

  name: str
  path: str
  d_in: int
  d_out: int
  reads: str
  parallel: str
  rule: str
  folds_into: str | None = None  # the norm weight whose output this site reads, if any
  writes: str | None = None  # "residual": the output is added to the residual stream
  heads: int = 0
  experts: int = 0
  active: int = 1

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"Site {self.name!r}: rule must be one of {RULES}, got {self.rule!r}")
    if self.parallel not in PARALLEL:
      raise ValueError(
        f"Site {self.name!r}: parallel must be one of {PARALLEL}, got {self.parallel!r}"
      )
    if self.writes not in (None, "residual"):
      raise ValueError(
        f"Site {self.name!r}: writes must be None or 'residual', got {self.writes!r}"
      )
    if self.d_in < 1 or self.d_out < 1:
      raise ValueError(f"Site {self.name!r}: d_in and d_out must be >= 1, got {self.shape}")
    if self.experts < 0 or not 1 <= self.active <= max(self.experts, 1):
      raise ValueError(
        f"Site {self.name!r}: need experts >= 0 and 1 <= active <= max(experts, 1), got "
        f"experts={self.experts}, active={self.active}"
      )

  @property
  def shape(self) -> tuple[int, int]:
    """(d_in, d_out) of one weight (one expert's, for an expert site)."""
    return (self.d_in, self.d_out)

  @property
  def macs_per_token(self) -> int:
    """Multiply-adds one token costs at this site (per layer): d_in * d_out per expert used."""
    return self.d_in * self.d_out * (self.active if self.experts else 1)


class SiteSet(tuple):
  """An architecture's sites in block order (a tuple of ``Site``) with lookups by name."""

  def __new__(cls, sites: Iterable[Site]):
    sites = tuple(sites)
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
      raise ValueError(f"site names must be unique, got {names}")
    return super().__new__(cls, sites)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self)

  def __getitem__(self, key):
    if isinstance(key, str):
      for site in self:
        if site.name == key:
          return site
      raise KeyError(f"unknown site {key!r}; valid: {', '.join(self.names)}")
    return super().__getitem__(key)

  def index(self, name: str) -> int:  # type: ignore[override]
    """Position of the site called ``name`` (the column of an ``[L, n_sites]`` table)."""
    return self.names.index(self[name].name)

  def with_rule(self, *rules: str) -> tuple[str, ...]:
    """Names of the sites whose paper rule is one of ``rules``."""
    return tuple(s.name for s in self if s.rule in rules)

  def check_name(self, name: str, *, where: str = "site") -> str:
    """``name`` if it is a site of this set, else ValueError naming ``where`` and the valid."""
    if name not in self.names:
      raise ValueError(f"unknown {where} {name!r}; valid: {', '.join(self.names)}")
    return name

  def groups_by_input(self) -> dict[str, tuple[str, ...]]:
    """reads -> the names of the sites reading that activation, in block order."""
    out: dict[str, list[str]] = {}
    for s in self:
      out.setdefault(s.reads, []).append(s.name)
    return {k: tuple(v) for k, v in out.items()}


@typing.runtime_checkable
class Architecture(typing.Protocol):
  """What planners need of a model configuration: its layer count and its declared sites.
  (``LlamaConfig`` is one; the type lets the plan and calibration layers stay model-free.)"""

  n_layers: int

  @property
  def sites(self) -> SiteSet: ...
