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

from mod_jax.model import attention_ops
from mod_jax.model.layers import Dense, LayerNorm
from mod_jax.model.partitioning import param


def _dtypes(cfg) -> dict:
  """Compute and parameter dtypes of the tower's projections (``model.vision.dtype`` /
  ``param_dtype``; bfloat16 parameters only for a frozen tower, ``config.validate``)."""
  return dict(
    dtype=jnp.dtype(cfg.get("dtype", "float32")),
    param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")),
  )


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention with biased q/k/v/o projections [w, w].

  Self-attention over a frame's patches runs on the configured kernel
  (``attention_ops.attend``, no mask); the MAP head's single probe query uses the plain path.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    width = cfg.width
    kw = dict(rngs=rngs, use_bias=True, **_dtypes(cfg))
    self.q = Dense(width, width, ("vision_embed", "vision_heads"), **kw)
    self.k = Dense(width, width, ("vision_embed", "vision_heads"), **kw)
    self.v = Dense(width, width, ("vision_embed", "vision_heads"), **kw)
    self.o = Dense(width, width, ("vision_heads", "vision_embed"), **kw)
    self.n_heads = cfg.n_heads
    self.implementation = cfg.get("attention", "xla")
    self.block_size = int(cfg.get("attention_block_size", 512))
    self.platform = cfg.get("attention_platform", "") or None
    self.rules = rules  # splash runs in a shard_map over the mesh axes of these names

  def __call__(self, x_bqw: jax.Array, kv_bsw: jax.Array | None = None) -> jax.Array:
    kv = x_bqw if kv_bsw is None else kv_bsw
    split = lambda y: y.reshape(*y.shape[:2], self.n_heads, -1)
    q, k, v = split(self.q(x_bqw)), split(self.k(kv)), split(self.v(kv))
    impl = self.implementation if kv_bsw is None else "xla"
    o = attention_ops.attend(
      q,
      k,
      v,
      causal=False,
      implementation=impl,
      block_size=self.block_size,
      backend=self.platform,
      rules=self.rules,
      head_names=("vision_heads", "vision_heads"),
      length_name=None,  # per-frame patches: whole on every device
    )
    return self.o(o.reshape(*o.shape[:2], -1))


class VisionMLP(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    width, mlp_dim = cfg.width, cfg.mlp_dim
    self.fc1 = Dense(width, mlp_dim, ("vision_embed", "vision_mlp"), rngs=rngs, **_dtypes(cfg))
    self.fc2 = Dense(mlp_dim, width, ("vision_mlp", "vision_embed"), rngs=rngs, **_dtypes(cfg))

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    self.norm1 = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.attn = VisionAttention(cfg, rngs=rngs, rules=rules)
    self.norm2 = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class MAPHead(nnx.Module):
  """Multihead attention pooling (SigLIP): a learned probe attends over the patch tokens."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.probe = param(rngs, nnx.initializers.normal(0.02), (1, cfg.width), (None, "vision_embed"))
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.norm = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x_bsw):
    probe = jnp.broadcast_to(self.probe[...][None], (x_bsw.shape[0], 1, x_bsw.shape[-1]))
    h = self.attn(probe, x_bsw)
    h = h + self.mlp(self.norm(h))
    return h[:, 0]


class VisionEncoder(nnx.Module):
  """Frames uint8 [..., H, W, 3] → vision tokens [..., 1 + p·p, width] (``vision.dtype``).

  Pixels are scaled to [-1, 1] (SigLIP's mean = std = 0.5). Token 0 is the MAP-pooled output;
  tokens 1.. are the post-LayerNorm patch grid average-pooled to p×p, row-major. With
  ``vision.frame_chunk`` = c > 0 the frames are encoded c at a time (``lax.map``), which bounds
  the tower's activations, and chunks holding only padding frames are skipped.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    self.patch_size, self.pool_size = cfg.patch_size, cfg.pool_size
    self.grid = cfg.image_size // cfg.patch_size
    self.frame_chunk = int(cfg.get("frame_chunk", 0))
    self.dtype = _dtypes(cfg)["dtype"]
    self.patch_embed = Dense(
      cfg.patch_size * cfg.patch_size * 3,
      cfg.width,
      (None, "vision_embed"),
      rngs=rngs,
      **_dtypes(cfg),
    )
    self.pos_embed = param(
      rngs,
      nnx.initializers.normal(0.02),
      (self.grid**2, cfg.width),
      (None, "vision_embed"),
      _dtypes(cfg)["param_dtype"],
    )
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs, rules=rules) for _ in range(cfg.depth)])
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

  def tokens(self, frames_bhwc: jax.Array) -> jax.Array:
    """uint8 frames [b, H, W, 3] → tokens [b, 1 + p·p, w]."""
    pixels = (frames_bhwc.astype(jnp.float32) / 127.5 - 1.0).astype(self.dtype)
    hidden, pooled = self.encode(pixels)
    g, q = self.grid, self.pool_size
    grid = hidden.reshape(-1, q, g // q, q, g // q, hidden.shape[-1]).mean(axis=(2, 4))
    return jnp.concatenate([pooled[:, None], grid.reshape(-1, q * q, hidden.shape[-1])], axis=1)

  def __call__(self, frames: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """uint8 [..., H, W, 3] → [..., 1 + p·p, w]. ``valid`` (bool [...], optional): frames that
    are not padding; only used to skip all-padding chunks (their tokens are 0)."""
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, *frames.shape[-3:])
    m, c = flat.shape[0], self.frame_chunk
    if c <= 0 or c >= m:
      tokens = self.tokens(flat)
    else:
      nc = -(-m // c)
      pad = nc * c - m
      chunks = jnp.pad(flat, ((0, pad),) + ((0, 0),) * 3).reshape(nc, c, *flat.shape[1:])
      ok = jnp.ones((m,), bool) if valid is None else valid.reshape(-1)
      ok = jnp.pad(ok, (0, pad)).reshape(nc, c).any(axis=1)
      out = jax.eval_shape(self.tokens, chunks[0])

      def one(xs):
        chunk, keep = xs
        return jax.lax.cond(keep, self.tokens, lambda _: jnp.zeros(out.shape, out.dtype), chunk)

      tokens = jax.lax.map(one, (chunks, ok)).reshape(nc * c, *out.shape[1:])[:m]
    return tokens.reshape(*lead, *tokens.shape[1:])
