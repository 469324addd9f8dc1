"""amber_jax: training-free N:M activation sparsity for LLM prefill (Amber Pruner), in JAX."""

from amber_jax.dot_general import nm_dot_general, w8a8_dot_general
from amber_jax.patterns import NMPattern
from amber_jax.plan import SparsityPlan, dense_plan, make_plan
from amber_jax.sparsity import nm_mask, nm_scores, sparsify

__version__ = "0.1.0"

__all__ = [
  "NMPattern",
  "SparsityPlan",
  "dense_plan",
  "make_plan",
  "nm_dot_general",
  "nm_mask",
  "nm_scores",
  "sparsify",
  "w8a8_dot_general",
]
