"""Projections as 2-D matmuls (the layout every decoder, vision and LoRA projection uses)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
  """x [..., *I] · w [*I, *O] → [..., *O] as ONE 2-D matmul [rows, prod(I)] · [prod(I), prod(O)].

  Same result as the einsum over named dims, but XLA:CPU then emits plain GEMMs for the weight
  gradients instead of writing transposed copies of the [rows, d_ff]-sized activations
  (``benchmarks/vs_transformers.py``: the dense step went from 1.33x to 1.08x of PyTorch). ``n_in``
  is the number of trailing input dims of x that w contracts.
  """
  lead, ins = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
  k = math.prod(ins)
  outs = w.shape[n_in:]
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *outs)
