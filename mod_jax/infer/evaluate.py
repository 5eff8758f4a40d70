"""``stream_evaluate`` of a trained model on the held-out split: the four metrics of docs/design.md §3.

Each window of the eval split (``mod_jax.data.pipeline.load_split(config, "eval")``) is one
sample. Its teacher-forced logits come from one full forward pass (the training forward,
``VideoLLM.__call__``); late responses are followed with the streaming engine: a
:class:`~mod_jax.infer.streaming.Session` is filled with the sample up to the turn's last frame
end (one padded slot-layout chunk) and fed the next frames one by one, each after an interval
token, exactly as videollm-online continues from its trimmed KV cache.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from mod_jax.data import pipeline
from mod_jax.data.tokenizer import StreamTokenizer
from mod_jax.infer import metrics, streaming


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _teacher_forced(params, batch, rng, *, graphdef):
  """Per-slot CE, argmax-correctness and frame-end distributions of one padded sample."""
  model = nnx.merge(graphdef, params)
  model.eval()  # no LoRA dropout; the rng is only for random routing
  text_logits, frame_logits, _ = model(batch, rng=rng)
  return {
    "text_ce": optax.softmax_cross_entropy_with_integer_labels(text_logits, batch["text_targets"]),
    "text_correct": jnp.argmax(text_logits, -1) == batch["text_targets"],
    "frame_probs": jax.nn.softmax(frame_logits, axis=-1),
  }


def _padded(example: dict, t_cap: int, f_cap: int, pad_id: int) -> dict:
  """One sample in the fixed [1, T_cap] / [1, F_cap] layout (segment 0 = padding), with its
  ``frames`` or, for a run trained from pre-extracted features (``data.input``), ``features``."""
  nt, nf = len(example["text_tokens"]), len(example["frame_positions"])
  if nt > t_cap or nf > f_cap:
    raise ValueError(f"sample has {nt} text slots / {nf} frames; caps are {t_cap} / {f_cap}.")

  def pad(x, n, value=0):
    x = np.asarray(x)
    out = np.full((n, *x.shape[1:]), value, x.dtype)
    out[: len(x)] = x
    return out[None]

  return {
    "text_tokens": pad(example["text_tokens"], t_cap, pad_id),
    "text_positions": pad(example["text_positions"], t_cap),
    "text_targets": pad(example["text_targets"], t_cap),
    "text_segment_ids": pad(np.ones(nt, np.int32), t_cap),
    **{k: pad(example[k], f_cap) for k in ("frames", "features") if k in example},
    "frame_positions": pad(example["frame_positions"], f_cap),
    "frame_segment_ids": pad(np.ones(nf, np.int32), f_cap),
  }


def continue_after(
  session: streaming.Session, batch: dict, frame_index: int, m: int, interval_id: int
) -> np.ndarray:
  """Frame-end distributions of ``m`` frames fed after frame ``frame_index`` of a sample.

  The cache is filled with the sample up to the last vision token of frame ``frame_index`` (one
  chunk: the padded slot layout with later slots masked out as padding); then frames
  ``frame_index + 1 ..`` are fed one at a time, each after an interval token, at the positions
  that follow (videollm-online: ``trim_past_key_values`` then ``forward`` on
  [interval, <v>·N]·m).

  Args:
    session: a batch-1 session with room for the sample and ``m`` more frames (it is reset).
    batch: the sample, ``[1, ...]`` slot layout with ``text_*``, ``frames`` (or ``features``)
      and ``frame_*`` fields.
    frame_index: last frame kept; m: frames to feed (``frame_index + m`` < frames in ``batch``).
    interval_id: the interval token.

  Returns:
    float32 ``[m, V]``.
  """
  n = session.tokens_per_frame
  p_end = int(batch["frame_positions"][0, frame_index]) + n - 1
  text_seg = batch["text_segment_ids"] * (batch["text_positions"] <= p_end)
  features = batch.get("features")  # pre-extracted vision input instead of pixels
  frames = batch.get("frames")
  frame_seg = batch["frame_segment_ids"] * (
    np.arange(batch["frame_positions"].shape[1]) <= frame_index
  )
  session.reset()
  session.feed_layout(
    batch["text_tokens"],
    batch["text_positions"],
    text_seg,
    frames,
    batch["frame_positions"],
    frame_seg,
    next_position=p_end + 1,
    what="eval prefix",
    features_bfnd=features,
  )
  probs = []
  for j in range(frame_index + 1, frame_index + 1 + m):
    if features is not None:
      out = session.feed([interval_id], features=features[:, j : j + 1], what="late frame")
    else:
      out = session.feed([interval_id], frames[0, j : j + 1], what="late frame")
    probs.append(out["frame_probs"][0, 0])
  return np.stack(probs)


def stream_evaluate(
  config,
  graphdef,
  params,
  tokenizer: StreamTokenizer,
  *,
  threshold: float = 0.0,
  max_samples: int | None = None,
  progress: bool = True,
  compression=None,
) -> dict:
  """LM-PPL, TimeDiff (seconds), Fluency, LM-Correctness on the eval split (docs/design.md §3).

  Args:
    config: the training config (data caps, fps, model).
    graphdef, params: the model (``mod_jax.convert.pretrained.restore_params``).
    tokenizer: its stream tokenizer.
    threshold: the frame-end decision threshold on P(interval) (0: argmax, the reference's
      evaluation default; the LIVE demo uses 0.725).
    max_samples: evaluate only the first windows of the split.
    progress: show a progress bar.
    compression: a ``mod_jax.compress.apply.Compression`` (FastV / DyCoke) applied to the model
      in the teacher-forced pass and in the late continuations on the streaming engine (where
      DyCoke's dynamic KV pruning acts: a teacher-forced pass is one prefill, which DyCoke never
      prunes), or None.

  Returns:
    ``{"lm_ppl", "time_diff", "fluency", "lm_correctness", "samples", "turns",
    "samples_without_turns", "late_continuations", "stream_decision_accuracy", "threshold",
    "fps", "seconds"}``; ``stream_decision_accuracy`` is the share of labelled frame ends whose
    teacher-forced decision (speak or stay silent, at ``threshold``) matches the data.

  Raises:
    RuntimeError: the eval split has no window. (and what ``load_split`` raises)
    ValueError: ``compression`` cannot run on this model (``mod_jax.compress.apply.check``).
  """
  if compression is not None:
    from mod_jax.compress import apply

    graphdef = apply.attach(graphdef, params, compression, config.model)
  start = time.perf_counter()
  index = pipeline.load_split(config, "eval", tokenizer)
  windows = index.windows[:max_samples] if max_samples else index.windows
  if not windows:
    raise RuntimeError("the eval split has no window to evaluate.")
  d, m = config.data, config.model
  t_cap, f_cap = int(d.max_text), int(d.max_frames)
  session = streaming.Session(
    graphdef,
    params,
    m,
    max_frames=2 * f_cap,
    max_text=t_cap + f_cap,
  )
  rng = jax.random.key(config.seed + 1)
  results = []
  decisions = decisions_right = 0  # frame-end decisions (speak vs stay silent) and correct ones
  for i, (_, window) in enumerate(
    tqdm.tqdm(windows, desc="eval", disable=not progress, dynamic_ncols=True)
  ):
    example = index.example(i)
    batch = _padded(example, t_cap, f_cap, tokenizer.pad_id)
    out = jax.device_get(_teacher_forced(params, batch, rng, graphdef=graphdef))
    nt, nf = window.num_text, window.num_frames
    sample = metrics.SampleStream(
      text_tokens=example["text_tokens"],
      text_positions=example["text_positions"],
      text_weights=example["text_weights"],
      text_ce=out["text_ce"][0, :nt],
      text_correct=out["text_correct"][0, :nt],
      frame_positions=example["frame_positions"],
      frame_weights=example["frame_weights"],
      frame_speak=metrics.speak_decision(
        out["frame_probs"][0, :nf], tokenizer.interval_id, threshold
      ),
    )
    late_fn = lambda j, k, batch=batch: metrics.speak_decision(
      continue_after(session, batch, j, k, tokenizer.interval_id), tokenizer.interval_id, threshold
    )
    results.append(metrics.evaluate_sample(sample, eos_id=tokenizer.eos_id, late_fn=late_fn))
    decided = np.asarray(example["frame_weights"]) > 0
    speak = np.asarray(example["frame_targets"]) != tokenizer.interval_id
    decisions += int(decided.sum())
    decisions_right += int((decided & (sample.frame_speak == speak)).sum())
  summary = metrics.aggregate(results, float(d.fps))
  summary.update(
    stream_decision_accuracy=decisions_right / max(decisions, 1),
    late_continuations=int(sum(r.late_queries for r in results)),
    threshold=float(threshold),
    fps=float(d.fps),
    seconds=time.perf_counter() - start,
  )
  return summary
