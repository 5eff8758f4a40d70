"""Small building blocks shared by the decoder and the vision tower: norms and MLPs.

Shape letters: b batch, t/l tokens, d model width, f MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mod_jax.model import lora
from mod_jax.model.linalg import project
from mod_jax.model.partitioning import param

_normal = nnx.initializers.normal
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def dense_init(fan_in: int):
  """Truncated-normal-free scaled init (std = fan_in**-0.5), as common for LLM projections."""
  return _normal(stddev=fan_in**-0.5)


class RMSNorm(nnx.Module):
  """Llama RMSNorm: x / sqrt(mean(x²) + eps) · scale, computed in float32."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, names=("norm",)):
    self.scale = param(rngs, _ones, (dim,), names)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (SigLIP), computed in float32."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, names=("norm",)):
    self.scale = param(rngs, _ones, (dim,), names)
    self.bias = param(rngs, _zeros, (dim,), names)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Dense(nnx.Module):
  """y = x·W (+ b) over the last axis, W: [d_in, d_out] with logical names ``names``."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    names,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    self.kernel = param(rngs, dense_init(d_in), (d_in, d_out), names, param_dtype)
    self.bias = param(rngs, _zeros, (d_out,), names[1:], param_dtype) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``rng``: LoRA dropout key (training only; ``mod_jax/model/lora.py``)."""
    y = project(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    delta = lora.adapter(self, "kernel", x, rng, self.dtype)  # None without LoRA
    return y if delta is None else y + delta


class SwiGLU(nnx.Module):
  """Llama MLP: down(silu(gate(x)) · up(x)); gate/up W: [d, f] ('embed','mlp'), down [f, d]."""

  def __init__(
    self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
  ):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.gate = Dense(d_model, d_ff, ("embed", "mlp"), **kw)
    self.up = Dense(d_model, d_ff, ("embed", "mlp"), **kw)
    self.down = Dense(d_ff, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x_btd: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """x [b, t, d] -> [b, t, d]. ``rng``: LoRA dropout key. The projections' outputs (LoRA
    included) are named for remat policies as MaxText names them: ``mlpwi_0`` (gate),
    ``mlpwi_1`` (up), ``mlpwo`` (down)."""
    g = checkpoint_name(self.gate(x_btd, lora.fold(rng, 0)), "mlpwi_0")
    u = checkpoint_name(self.up(x_btd, lora.fold(rng, 1)), "mlpwi_1")
    return checkpoint_name(self.down(jax.nn.silu(g) * u, lora.fold(rng, 2)), "mlpwo")
