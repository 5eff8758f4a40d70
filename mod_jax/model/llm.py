"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2 via ``qkv_bias``) with MoD vision routing.

RMSNorm → GQA attention with RoPE → RMSNorm → SwiGLU, pre-norm residual blocks, optional tied
embeddings; matches transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` numerics. Layers
listed by the :class:`~mod_jax.model.mod.RoutingPlan` route vision tokens (``mod.routed_block``).

Shape letters: b batch, l/t tokens, d model width, v vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mod_jax.model import lora, mod
from mod_jax.model.attention import Attention
from mod_jax.model.layers import RMSNorm, SwiGLU, dense_init
from mod_jax.model.partitioning import param, shard


class DecoderLayer(nnx.Module):
  """One pre-norm block: x + attn(norm(x)); then + mlp(norm(·))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    self.input_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, rules=rules)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, rngs=rngs)
    self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype))
    self.rules = rules

  def __call__(self, x_bld, positions_bl, segment_ids_bl, rng=None) -> jax.Array:
    """``rng``: LoRA dropout key (training only)."""
    x = x_bld + self.attn(self.input_norm(x_bld), positions_bl, segment_ids_bl,
                          lora.fold(rng, 0)).astype(x_bld.dtype)
    x = x + self.mlp(self.post_attn_norm(x), lora.fold(rng, 1)).astype(x.dtype)
    return shard(x, ("batch", "length", "embed"), self.rules)


class Decoder(nnx.Module):
  """Token embedding, decoder layers (some with a LayerExpert router), final norm, LM head."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    pdt = jnp.dtype(cfg.param_dtype)
    self.plan = mod.RoutingPlan.from_config(cfg)
    self.embed = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                       ("vocab", "embed"), pdt)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, rules=rules)
                            for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else param(
        rngs, dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
    # Routers last, so a MoD model and its dense counterpart draw identical weights for a seed.
    self.routers = nnx.Dict({str(i): mod.LayerExpert(cfg.d_model, rngs=rngs)
                             for i in range(cfg.n_layers) if self.plan.needs_router(i)})
    lora_cfg = cfg.get("lora")
    self.lora_dropout = bool(lora_cfg and lora_cfg.rank > 0 and lora_cfg.dropout > 0)
    if lora_cfg and lora_cfg.rank > 0:  # adapters after everything else (same base init)
      lora.attach(self, cfg, rngs=rngs)
    self.dtype = jnp.dtype(cfg.dtype)
    self.rules = rules

  def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
    """int32 [b, t] -> [b, t, d] in the compute dtype."""
    # Gather rows from a table replicated along vocab (all-gathered over its 'vocab' shards):
    # GSPMD cannot gather from a vocab-sharded table without rematerialising it whole.
    table = shard(self.embed[...], (None, "embed"), self.rules)
    x = jnp.take(table, tokens_bt, axis=0).astype(self.dtype)
    return shard(x, ("batch", "length", "embed"), self.rules)

  def __call__(self, x_bld, positions_bl, segment_ids_bl, *, num_text: int | None = None,
               num_frames: int = 0, rng: jax.Array | None = None):
    """Runs all layers; returns (final-normed hidden [b, l, d], aux per routed layer).

    The row holds ``num_text`` text slots then ``num_frames`` frames of ``tokens_per_frame``
    slots (``num_text`` defaults to all of l, i.e. text only, where no layer routes anything).
    """
    n = self.plan.tokens_per_frame
    num_text = x_bld.shape[1] - num_frames * n if num_text is None else num_text
    aux = {}
    x = x_bld
    drop = lora.fold(rng, lora.DROPOUT_STREAM) if self.lora_dropout else None
    for i, layer in enumerate(self.layers):
      if drop is not None:
        layer = functools.partial(layer, rng=jax.random.fold_in(drop, i))
      if num_frames and self.plan.routed(i):
        x, aux[f"layer_{i}"] = mod.routed_block(
            layer, x, positions_bl, segment_ids_bl, num_text=num_text, num_frames=num_frames,
            tokens_per_frame=n, k=self.plan.keep[i], selection=self.plan.selection,
            weighting=self.plan.weighting, router=self.routers.get(str(i)),
            rng=None if rng is None else jax.random.fold_in(rng, i))
      else:
        x = layer(x, positions_bl, segment_ids_bl)
    return self.final_norm(x), aux

  def logits(self, h_btd: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """LM head, float32 [b, t, v]. ``rng``: LoRA dropout key (training only)."""
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    y = jnp.einsum("btd,dv->btv", h_btd.astype(self.dtype), w.astype(self.dtype))
    drop = lora.fold(rng, lora.DROPOUT_STREAM) if self.lora_dropout else None
    delta = lora.adapter(self, "lm_head", h_btd, lora.fold(drop, len(self.layers)), self.dtype)
    return (y if delta is None else y + delta).astype(jnp.float32)

  def text_logits(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
    """Plain causal LM call on token ids int32 [b, t] -> logits float32 [b, t, v]."""
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = self(self.embed_tokens(tokens_bt), positions_bt, jnp.ones((b, t), jnp.int32))
    return self.logits(h)
