"""Generation under sparse prefill: agreement of greedy continuations with the dense model."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from amber_jax.model.config import LlamaConfig
from amber_jax.model.greedy import generate_greedy
from amber_jax.plan.schema import SparsityPlan


@dataclasses.dataclass(frozen=True)
class GenerationAgreement:
  agreement: float  # share of generated tokens equal to the dense continuation, position-wise
  prefix_agreement: float  # mean share of tokens before the first divergence
  prompts: int
  new_tokens: int
  dense_tokens: np.ndarray  # [P, new_tokens]
  sparse_tokens: np.ndarray


def generation_agreement(
  params,
  prompts_PxT: np.ndarray,
  *,
  config: LlamaConfig,
  plan: SparsityPlan,
  new_tokens: int = 32,
  dtype=jnp.float32,
  sparse_params=None,
) -> GenerationAgreement:
  """Greedy continuations, dense vs sparse prefill (decode is dense in both, unless the plan
  sparsifies decode too: TEAL's and CATS's thresholds with ``threshold_decode``).
  ``sparse_params``: the sparse model's own params (weight pruning: zeros in its weights, in
  prefill and decode), else ``params``."""
  prompts = jnp.asarray(prompts_PxT, jnp.int32)
  dense = np.asarray(
    generate_greedy(
      params, prompts, config=config, max_new_tokens=new_tokens, plan=None, dtype=dtype
    )
  )
  sparse = np.asarray(
    generate_greedy(
      params if sparse_params is None else sparse_params,
      prompts,
      config=config,
      max_new_tokens=new_tokens,
      plan=plan,
      dtype=dtype,
    )
  )
  equal = dense == sparse
  first_diff = np.where(equal.all(axis=1), new_tokens, np.argmin(equal, axis=1))
  return GenerationAgreement(
    agreement=float(equal.mean()),
    prefix_agreement=float(first_diff.mean() / new_tokens),
    prompts=len(prompts_PxT),
    new_tokens=new_tokens,
    dense_tokens=dense,
    sparse_tokens=sparse,
  )
