"""Shared test utilities: synthetic batches in the model's slot layout."""

import numpy as np


def synthetic_batch(config, batch_size: int, seed: int = 0, frames_per_sample=None):
  """A random but well-formed batch: one packed sample per row, stream-ordered positions.

  Each row: ``frames_per_sample`` frames (default F_cap - 1, so one padding frame) each followed
  by one interval text token, then the remaining text slots after a prompt, rest padding.
  """
  rng = np.random.default_rng(seed)
  m, d = config.model, config.data
  t_cap, f_cap, n = d.max_text, d.max_frames, m.tokens_per_frame
  nf = f_cap - 1 if frames_per_sample is None else frames_per_sample
  size = m.vision.image_size
  b = {
    k: []
    for k in (
      "text_tokens",
      "text_positions",
      "text_segment_ids",
      "text_targets",
      "text_weights",
      "frame_positions",
      "frame_segment_ids",
      "frame_targets",
      "frame_weights",
    )
  }
  for _ in range(batch_size):
    prompt = 4
    n_text = prompt + nf  # prompt then one interval token after each frame
    assert n_text <= t_cap
    tpos = list(range(prompt))
    fpos = []
    p = prompt
    for _ in range(nf):
      fpos.append(p)
      p += n
      tpos.append(p)
      p += 1
    pad_t = t_cap - n_text
    b["text_tokens"].append(
      np.concatenate([rng.integers(1, m.vocab_size, n_text), np.zeros(pad_t)])
    )
    b["text_positions"].append(np.array(tpos + [0] * pad_t))
    b["text_segment_ids"].append(np.array([1] * n_text + [0] * pad_t))
    b["text_targets"].append(
      np.concatenate([rng.integers(1, m.vocab_size, n_text), np.zeros(pad_t)])
    )
    b["text_weights"].append(np.array([1.0] * n_text + [0.0] * pad_t))
    pad_f = f_cap - nf
    b["frame_positions"].append(np.array(fpos + [0] * pad_f))
    b["frame_segment_ids"].append(np.array([1] * nf + [0] * pad_f))
    b["frame_targets"].append(np.concatenate([rng.integers(1, m.vocab_size, nf), np.zeros(pad_f)]))
    b["frame_weights"].append(np.array([1.0] * nf + [0.0] * pad_f))
  out = {k: np.stack(v).astype(np.float32 if "weights" in k else np.int32) for k, v in b.items()}
  out["frames"] = rng.integers(0, 256, (batch_size, f_cap, size, size, 3), dtype=np.uint8)
  return out


def ordered_row(x, positions, segment_ids, num_text, tokens_per_frame):
  """A layout row (text slots, then frames) in stream order, as the decoder sees it.

  Returns (x [b, l, d] in stream order, ``rows.TokenInfo``, ``rows.StreamLayout``); bring a
  stream-order result back to the layout with ``rows.take(y, layout.inverse)``.
  """
  import jax.numpy as jnp

  from mod_jax.model import rows

  positions, segment_ids = jnp.asarray(positions), jnp.asarray(segment_ids)
  layout = rows.stream_layout(
    positions, segment_ids, num_text=num_text, tokens_per_frame=tokens_per_frame
  )
  seq = rows.TokenInfo(layout.to_stream(positions), layout.to_stream(segment_ids))
  return layout.to_stream(jnp.asarray(x)), seq, layout


def frame_scores_router(scores_bfn, layout):
  """A stand-in router returning fixed per-frame scores [b, f, n] as stream-order logits [b, l]."""
  import jax.numpy as jnp

  scores = jnp.asarray(scores_bfn, jnp.float32)
  b, f, n = scores.shape
  text = jnp.zeros((b, layout.num_text), jnp.float32)
  flat = layout.to_stream(jnp.concatenate([text, scores.reshape(b, f * n)], axis=1))
  return lambda x: flat
