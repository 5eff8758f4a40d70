"""SigLIP-style ViT vision tower yielding ``1 + p·p`` tokens per frame (VideoLLM-online §3.2).

Patch embedding + learned position embedding → pre-LN transformer encoder (MHA with biases,
GELU-tanh MLP) → post LayerNorm; a multihead attention-pooling ("MAP") head gives the pooled
token, and the patch grid is average-pooled to p×p. Mirrors transformers' ``SiglipVisionModel``
(``last_hidden_state`` and ``pooler_output``) so pretrained SigLIP weights can be imported.

Shape letters: b frames (batch·frames), s patches, w width, n heads, h head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mod_jax.model.attention import dot_product_attention
from mod_jax.model.layers import Dense, LayerNorm
from mod_jax.model.partitioning import param


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention with biased q/k/v/o projections [w, w]."""

  def __init__(self, width: int, n_heads: int, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, use_bias=True)
    self.q = Dense(width, width, ("vision_embed", "vision_heads"), **kw)
    self.k = Dense(width, width, ("vision_embed", "vision_heads"), **kw)
    self.v = Dense(width, width, ("vision_embed", "vision_heads"), **kw)
    self.o = Dense(width, width, ("vision_heads", "vision_embed"), **kw)
    self.n_heads = n_heads

  def __call__(self, x_bqw: jax.Array, kv_bsw: jax.Array | None = None) -> jax.Array:
    kv = x_bqw if kv_bsw is None else kv_bsw
    split = lambda y: y.reshape(*y.shape[:2], self.n_heads, -1)
    q, k, v = split(self.q(x_bqw)), split(self.k(kv)), split(self.v(kv))
    mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
    o = dot_product_attention(q, k, v, mask)
    return self.o(o.reshape(*o.shape[:2], -1))


class VisionMLP(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = Dense(width, mlp_dim, ("vision_embed", "vision_mlp"), rngs=rngs)
    self.fc2 = Dense(mlp_dim, width, ("vision_mlp", "vision_embed"), rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.attn = VisionAttention(cfg.width, cfg.n_heads, rngs=rngs)
    self.norm2 = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.mlp = VisionMLP(cfg.width, cfg.mlp_dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class MAPHead(nnx.Module):
  """Multihead attention pooling (SigLIP): a learned probe attends over the patch tokens."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.probe = param(rngs, nnx.initializers.normal(0.02), (1, cfg.width),
                       (None, "vision_embed"))
    self.attn = VisionAttention(cfg.width, cfg.n_heads, rngs=rngs)
    self.norm = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.mlp = VisionMLP(cfg.width, cfg.mlp_dim, rngs=rngs)

  def __call__(self, x_bsw):
    probe = jnp.broadcast_to(self.probe[...][None], (x_bsw.shape[0], 1, x_bsw.shape[-1]))
    h = self.attn(probe, x_bsw)
    h = h + self.mlp(self.norm(h))
    return h[:, 0]


class VisionEncoder(nnx.Module):
  """Frames uint8 [..., H, W, 3] → vision tokens float32 [..., 1 + p·p, width].

  Pixels are scaled to [-1, 1] (SigLIP's mean = std = 0.5). Token 0 is the MAP-pooled output;
  tokens 1.. are the post-LayerNorm patch grid average-pooled to p×p, row-major.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.patch_size, self.pool_size = cfg.patch_size, cfg.pool_size
    self.grid = cfg.image_size // cfg.patch_size
    self.patch_embed = Dense(cfg.patch_size * cfg.patch_size * 3, cfg.width,
                             (None, "vision_embed"), rngs=rngs)
    self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (self.grid ** 2, cfg.width),
                           (None, "vision_embed"))
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.post_norm = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.head = MAPHead(cfg, rngs=rngs)

  def encode(self, pixels_bhwc: jax.Array):
    """float pixels in [-1, 1], [b, H, W, 3] → (last_hidden_state [b, s, w], pooled [b, w])."""
    b, hgt, wid, c = pixels_bhwc.shape
    p, g = self.patch_size, self.grid
    patches = pixels_bhwc.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(patches.reshape(b, g * g, p * p * c)) + self.pos_embed[...]
    for layer in self.layers:
      x = layer(x)
    x = self.post_norm(x)
    return x, self.head(x)

  def __call__(self, frames: jax.Array) -> jax.Array:
    lead = frames.shape[:-3]
    pixels = frames.reshape(-1, *frames.shape[-3:]).astype(jnp.float32) / 127.5 - 1.0
    hidden, pooled = self.encode(pixels)
    g, q = self.grid, self.pool_size
    grid = hidden.reshape(-1, q, g // q, q, g // q, hidden.shape[-1]).mean(axis=(2, 4))
    tokens = jnp.concatenate([pooled[:, None], grid.reshape(-1, q * q, hidden.shape[-1])], axis=1)
    return tokens.reshape(*lead, *tokens.shape[1:])
