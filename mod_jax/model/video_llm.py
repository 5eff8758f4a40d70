"""The streaming video LLM: vision tower → connector → decoder with MoD vision routing.

Consumes a batch in the slot layout of ``mod_jax.data.pipeline`` (docs/design.md §1.2, §2):

  text_tokens, text_positions, text_segment_ids     int32 [b, T]
  frames                                            uint8 [b, F, H, W, 3]  (or, instead,)
  features                                          [b, F, N, d_vision] pre-extracted tower output
  frame_positions, frame_segment_ids                int32 [b, F]  (frame f's N tokens sit at
                                                    positions p_f .. p_f + N − 1)

:meth:`VideoLLM.embed_row` embeds it and puts the row in stream order (``mod_jax/model/rows.py``)
so that every attention runs on a kernel; :meth:`VideoLLM.hidden` runs the decoder and returns
hidden states only where the loss needs them: at every text slot, and at the last vision token of
every frame (the streaming decision: interval token vs. stream close, docs/design.md §2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mod_jax.model import rows
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
    vision_cfg = cfg.vision.copy_and_resolve_references()
    with vision_cfg.unlocked():  # one kernel choice for the whole model
      vision_cfg.attention = cfg.get("attention", "xla")
      vision_cfg.attention_block_size = cfg.get("attention_block_size", 512)
      vision_cfg.attention_platform = cfg.get("attention_platform", "")
    self.vision = VisionEncoder(vision_cfg, rngs=rngs, rules=rules)
    self.connector = Connector(cfg.vision.width, cfg.d_model, rngs=rngs, dtype=jnp.dtype(cfg.dtype))
    self.llm = Decoder(cfg, rngs=rngs, rules=rules)
    self.tokens_per_frame = cfg.tokens_per_frame
    self.vision_trainable = cfg.vision.trainable
    self.rules = rules

  def embed_frames(self, frames, valid=None) -> jax.Array:
    """uint8 [b, F, H, W, 3] → connector outputs [b, F, N, d]. ``valid`` bool [b, F]: real
    (non-padding) frames, which lets a chunked tower skip padding (``vision.frame_chunk``)."""
    return self.embed_features(self.vision(frames, valid))

  def embed_features(self, features) -> jax.Array:
    """Vision-tower outputs [b, F, N, d_vision] (any float dtype) → connector outputs [b, F, N, d].

    A frozen tower's output gets no gradient, so pre-extracted features and the online tower
    train the same model."""
    if not self.vision_trainable:
      features = jax.lax.stop_gradient(features)
    return self.connector(features.astype(self.llm.dtype))

  def embed_row(self, batch):
    """Embeds a batch and puts each row in stream order.

    With a ``context`` mesh axis of size R (``rows.context_chunks``), each row's R chunks are
    put in stream order separately (``mod_jax/model/rows.py``), each on its own device.

    Args:
      batch: the slot-layout fields (module docstring), with ``frames`` or ``features``.
    Returns:
      (x [b, L, d] in stream order, ``rows.TokenInfo`` of those slots, ``rows.StreamLayout``),
      L = T + F·N; the layout is of the folded rows [b·R, L/R] when R > 1.
    Raises:
      ValueError: T or F is not divisible by R.
    """
    n = self.tokens_per_frame
    text = self.llm.embed_tokens(batch["text_tokens"])
    b, t, d = text.shape
    f = batch["frame_positions"].shape[1]
    if not f:  # a text-only chunk (streaming: prompt, response tokens) has no frame to encode
      vis = jnp.zeros((b, 0, n, d), text.dtype)
    elif "features" in batch:
      vis = self.embed_features(batch["features"])
    else:
      vis = self.embed_frames(batch["frames"], batch["frame_segment_ids"] != 0)
    r = rows.context_chunks(self.rules)
    if t % r or f % r:
      raise ValueError(
        f"a row of {t} text slots and {f} frames does not split into {r} context chunks "
        f"(the context mesh axis); both must be multiples of {r}."
      )
    v_pos, v_seg = frame_token_layout(batch["frame_positions"], batch["frame_segment_ids"], n)
    fold = lambda *xs: rows.fold(xs, r, self.rules)
    text, t_pos, t_seg = fold(text, batch["text_positions"], batch["text_segment_ids"])
    vis, v_pos, v_seg = fold(vis.reshape(b, f * n, d), v_pos, v_seg)
    x = jnp.concatenate([text, vis], axis=1)
    positions = jnp.concatenate([t_pos, v_pos], axis=1)
    segments = jnp.concatenate([t_seg, v_seg], axis=1)
    layout = rows.stream_layout(positions, segments, num_text=t // r, tokens_per_frame=n, chunks=r)
    x, positions, segments = rows.unfold(
      (layout.to_stream(x), layout.to_stream(positions), layout.to_stream(segments)), r
    )
    x = shard(x, ("batch", "length", "embed"), self.rules)
    return x, rows.TokenInfo(positions, segments), layout

  def text_logits(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
    """The text-only causal LM: int32 token ids [b, t] → logits f32 [b, t, V].

    ``positions_bt`` int32 [b, t] (default 0..t-1, which runs on the attention kernel)."""
    return self.llm.text_logits(tokens_bt, positions_bt)

  def hidden(self, batch, *, rng: jax.Array | None = None, remat: str = "none", router_mix=0.0):
    """Final-normed hidden states where the loss is: (h_text [b, T, d], h_frame_end [b, F, d],
    aux), in the slot layout. ``rng``: random routing and LoRA dropout; ``remat``: the
    ``train.remat`` policy (``llm.REMAT_POLICIES``); ``router_mix``: the annealed router gate's
    weight (``Decoder.__call__``; training only)."""
    x, seq, layout = self.embed_row(batch)
    if layout.chunks > 1 and self.llm.compress is not None:
      raise ValueError(
        f"FastV / DyCoke rank tokens over the whole row; they cannot run with a context mesh "
        f"axis of size {layout.chunks}."
      )
    routable = None
    if self.llm.plan.routing == "sequence" and "text_weights" in batch:  # γ-MoD: answer tokens
      text = batch["text_weights"] > 0
      flags = jnp.concatenate(
        [text, jnp.ones((text.shape[0], layout.order.shape[1] - text.shape[1]), bool)], 1
      )
      routable = layout.to_stream(flags)
    h, aux = self.llm(
      x,
      seq,
      layout,
      rng=rng,
      remat=remat,
      vision_keep=batch.get("vision_keep"),
      routable=routable,
      router_mix=router_mix,
    )
    h_text, h_end = _at_outputs(h, layout, self.rules)
    return h_text, h_end, aux

  def stream_step(self, batch, caches, *, rope_offset=0, rng: jax.Array | None = None, state=None):
    """Streaming inference: one chunk of a stream over the decoder's KV caches.

    Args:
      batch: the chunk in the slot layout (module docstring; ``frames`` or ``features``), with
        absolute stream positions; padding slots (segment id 0) take no cache slot.
      caches: the decoder's KV caches, one ``attention.KVCache`` per stack of layers
        (``mod_jax.infer.streaming.empty_caches``).
      rope_offset: int32 [], the stream's re-basing (``attention.Attention.cached``).
      rng: ``random`` selection key.
      state: a training-free method's per-stream state (``Decoder.cached``), or None.
    Returns:
      (text_logits f32 [b, T, V], frame_logits f32 [b, F, V] at each frame's last vision token,
      tuple of the updated caches, the updated ``state``).
    """
    x, seq, layout = self.embed_row(batch)
    h, _, caches, state = self.llm.cached(
      x, seq, layout, caches, rope_offset=rope_offset, rng=rng, state=state
    )
    h_text, h_end = _at_outputs(h, layout)
    return self.llm.logits(h_text), self.llm.logits(h_end), caches, state

  def __call__(self, batch: dict, *, rng: jax.Array | None = None):
    """Returns (text_logits f32 [b, T, V], frame_logits f32 [b, F, V], aux dict).

    ``rng`` is needed only for ``selection='random'`` routing (and drives LoRA dropout in
    training). For token ids without video use :meth:`text_logits`.

    Raises:
      TypeError: ``batch`` is not a dict of the slot-layout fields.
    """
    if not isinstance(batch, dict):
      raise TypeError(
        f"VideoLLM(batch) takes a dict of slot-layout fields, got {type(batch).__name__}; "
        f"for int32 token ids [b, t] call model.text_logits(ids)."
      )
    h_text, h_end, aux = self.hidden(batch, rng=rng)
    frame_rng = None if rng is None else jax.random.fold_in(rng, 1)  # LoRA dropout on lm_head
    return self.llm.logits(h_text, rng), self.llm.logits(h_end, frame_rng), aux


def _at_outputs(h_bld: jax.Array, layout: rows.StreamLayout, rules=None):
  """Hidden states [b, L, d] in stream order -> (at the text slots [b, T, d], at each frame's
  last vision token [b, F, d]), in the slot layout (per context chunk when the layout is of
  folded rows, ``rows.fold``)."""
  if layout.chunks > 1:
    h_text, h_end = _at_outputs(rows.fold(h_bld, layout.chunks, rules), layout.unchunked())
    return rows.unfold((h_text, h_end), layout.chunks)
  t, n = layout.num_text, layout.tokens_per_frame
  f = layout.frame_start.shape[1]
  # Ordered slots of the text slots and of each frame's last vision token (layout order).
  idx = jnp.concatenate([layout.inverse[:, :t], layout.inverse[:, t + n - 1 :: n][:, :f]], axis=1)
  back = jnp.full(layout.order.shape, t + f, jnp.int32)
  back = jnp.where(layout.order < t, layout.order, back)
  is_end = (layout.order >= t) & ((layout.order - t) % n == n - 1)
  back = jnp.where(is_end, t + (layout.order - t) // n, back)
  h_out = rows.gather_rows(h_bld, idx, back)
  return h_out[:, :t], h_out[:, t:]
