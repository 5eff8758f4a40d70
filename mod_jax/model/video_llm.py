"""The streaming video LLM: vision tower → connector → decoder with MoD vision routing.

Consumes a batch in the slot layout of ``mod_jax.data.pipeline`` (SPEC §1.2, §2):

  text_tokens, text_positions, text_segment_ids     int32 [b, T]
  frames                                            uint8 [b, F, H, W, 3]
  frame_positions, frame_segment_ids                int32 [b, F]  (frame f's N tokens sit at
                                                    positions p_f .. p_f + N − 1)

and returns logits only where the loss needs them: at every text slot, and at the last vision
token of every frame (the streaming decision: interval token vs. stream close, SPEC §2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mod_jax.model.connector import Connector
from mod_jax.model.llm import Decoder
from mod_jax.model.partitioning import shard
from mod_jax.model.vision import VisionEncoder


def frame_token_layout(frame_positions_bf, frame_segment_ids_bf, tokens_per_frame: int):
  """Positions and segment ids of every vision slot, int32 [b, F·N] each."""
  b, f = frame_positions_bf.shape
  pos = frame_positions_bf[:, :, None] + jnp.arange(tokens_per_frame, dtype=jnp.int32)
  seg = jnp.broadcast_to(frame_segment_ids_bf[:, :, None], (b, f, tokens_per_frame))
  return pos.reshape(b, -1), seg.reshape(b, -1)


class VideoLLM(nnx.Module):
  """LLaVA-style video LLM with Mixture-of-Depths vision computation (VideoLLM-MoD)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    """cfg: the ``config.model`` ConfigDict. rules: logical axis rules for activation sharding."""
    self.vision = VisionEncoder(cfg.vision, rngs=rngs)
    self.connector = Connector(cfg.vision.width, cfg.d_model, rngs=rngs, dtype=jnp.dtype(cfg.dtype))
    self.llm = Decoder(cfg, rngs=rngs, rules=rules)
    self.tokens_per_frame = cfg.tokens_per_frame
    self.vision_trainable = cfg.vision.trainable
    self.rules = rules

  def embed_frames(self, frames) -> jax.Array:
    """uint8 [b, F, H, W, 3] → connector outputs [b, F, N, d]."""
    tokens = self.vision(frames)
    if not self.vision_trainable:
      tokens = jax.lax.stop_gradient(tokens)
    return self.connector(tokens.astype(self.llm.dtype))

  def __call__(self, batch, *, rng: jax.Array | None = None):
    """Returns (text_logits f32 [b, T, V], frame_logits f32 [b, F, V], aux dict).

    ``rng`` is needed only for ``selection='random'`` routing (and drives LoRA dropout in
    training). Called on a plain int32 array of token ids [b, t] instead of a batch dict, this is
    the text-only causal LM and returns logits f32 [b, t, V] (positions 0..t-1).
    """
    if not isinstance(batch, dict):
      return self.llm.text_logits(batch)
    n = self.tokens_per_frame
    text = self.llm.embed_tokens(batch["text_tokens"])
    b, t, d = text.shape
    f = batch["frames"].shape[1]
    # A text-only chunk (streaming inference: prompt, response tokens) has no frame to encode.
    vis = self.embed_frames(batch["frames"]) if f else jnp.zeros((b, 0, n, d), text.dtype)
    x = jnp.concatenate([text, vis.reshape(b, f * n, d)], axis=1)
    x = shard(x, ("batch", "length", "embed"), self.rules)
    v_pos, v_seg = frame_token_layout(batch["frame_positions"], batch["frame_segment_ids"], n)
    positions = jnp.concatenate([batch["text_positions"], v_pos], axis=1)
    segments = jnp.concatenate([batch["text_segment_ids"], v_seg], axis=1)
    h, aux = self.llm(x, positions, segments, num_text=t, num_frames=f, rng=rng)
    frame_end = h[:, t:].reshape(b, f, n, d)[:, :, -1]
    frame_rng = None if rng is None else jax.random.fold_in(rng, 1)  # LoRA dropout on lm_head
    return self.llm.logits(h[:, :t], rng), self.llm.logits(frame_end, frame_rng), aux
