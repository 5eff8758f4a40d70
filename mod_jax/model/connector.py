"""Connector MLP: Linear(d_vision → d_model) → GELU → Linear(d_model → d_model) (VideoLLM-online)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mod_jax.model.layers import Dense


class Connector(nnx.Module):
  """Maps vision tokens [..., d_vision] to LLM embeddings [..., d_model] (exact-erf GELU)."""

  def __init__(self, d_vision: int, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = Dense(d_vision, d_model, ("vision_embed", "embed"), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(d_model, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
