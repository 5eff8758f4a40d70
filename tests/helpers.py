"""Shared test utilities: synthetic batches in the model's slot layout, sharded train steps."""

import functools

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


def chunked_batch(config, batch_size: int, chunks: int, seed: int = 0):
  """A random batch whose rows are ``chunks`` context chunks (``mod_jax/model/rows.py``).

  Chunk r holds text slots r·T/R.. and frames r·F/R... Sample 1 starts in chunk 0 with a
  3-token prompt and runs into the last chunk (so it spans every chunk boundary), where sample
  2 starts (prompt) after that chunk's first frame. Every frame is followed by one interval
  token; each chunk's unused text slots are padding, and chunk 0's last frame slot is a padding
  frame. Positions continue across a sample's chunks.
  """
  rng = np.random.default_rng(seed)
  m, d = config.model, config.data
  n = m.tokens_per_frame
  tc, fc = d.max_text // chunks, d.max_frames // chunks
  assert fc >= 2 and tc >= 3 + fc + 3
  keys = ("tokens", "positions", "segment_ids", "targets", "weights")
  text = {k: np.zeros((batch_size, d.max_text)) for k in keys}
  frame = {k: np.zeros((batch_size, d.max_frames)) for k in keys[1:]}
  for row in range(batch_size):
    seg, pos = 0, 0
    for r in range(chunks):
      ti, fi = r * tc, r * fc
      for j in range(fc):
        if r == 0 and j == fc - 1:
          break  # a padding frame
        if (r, j) in ((0, 0), (chunks - 1, 1)):  # a sample starts: 3-token prompt
          seg, pos = seg + 1, 0
          for _ in range(3):
            text["positions"][row, ti], text["segment_ids"][row, ti] = pos, seg
            ti, pos = ti + 1, pos + 1
        frame["positions"][row, fi], frame["segment_ids"][row, fi] = pos, seg
        fi, pos = fi + 1, pos + n
        text["positions"][row, ti], text["segment_ids"][row, ti] = pos, seg
        ti, pos = ti + 1, pos + 1
  real_t, real_f = text["segment_ids"] > 0, frame["segment_ids"] > 0
  text["tokens"] = np.where(real_t, rng.integers(1, m.vocab_size, real_t.shape), 0)
  text["targets"] = np.where(real_t, rng.integers(1, m.vocab_size, real_t.shape), 0)
  text["weights"] = real_t.astype(np.float32)
  frame["targets"] = np.where(real_f, rng.integers(1, m.vocab_size, real_f.shape), 0)
  frame["weights"] = real_f.astype(np.float32)
  out = {f"text_{k}": v for k, v in text.items()}
  out.update({f"frame_{k}": v for k, v in frame.items()})
  out = {k: v.astype(np.float32 if "weights" in k else np.int32) for k, v in out.items()}
  size = m.vision.image_size
  out["frames"] = rng.integers(0, 256, (batch_size, d.max_frames, size, size, 3), dtype=np.uint8)
  return out


def run_train_steps(config, devices, batches):
  """``train_step`` on ``config``'s mesh over ``devices`` for each host batch in turn (the oracle
  runs of the sharded / context-axis equality tests). Returns (initial params, final params,
  last metrics — all on the host —, the final state, the last global batch)."""
  import jax

  from mod_jax.train import sharding
  from mod_jax.train.step import train_step

  mesh = sharding.make_mesh(config, devices=devices)
  rules = sharding.rules_of(config)
  state, graphdef, tx, shardings = sharding.create_train_state(config, mesh)
  init = jax.device_get(state.params)
  fn = jax.jit(
    functools.partial(
      train_step, graphdef=graphdef, tx=tx, stream_loss_weight=1.0, base_rng=jax.random.key(0)
    ),
    in_shardings=(shardings, None),
    out_shardings=(shardings, None),
  )
  global_batch = metrics = None
  with jax.set_mesh(mesh):
    for b in batches:
      global_batch = sharding.host_to_global(b, mesh, rules)
      state, metrics = fn(state, global_batch)
  return init, jax.device_get(state.params), jax.device_get(metrics), state, global_batch
