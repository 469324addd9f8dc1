"""amber_jax: training-free N:M activation sparsity for LLM prefill (Amber Pruner), in JAX."""

from amber_jax.core.dot_general import nm_dot_general, w8a8_dot_general
from amber_jax.core.patterns import NMPattern
from amber_jax.core.sparsity import nm_mask, nm_scores, sparsify
from amber_jax.plan.schema import SparsityPlan, dense_plan, make_plan

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
