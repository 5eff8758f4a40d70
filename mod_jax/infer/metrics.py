"""The four streaming metrics of VideoLLM-online: LM-PPL, TimeDiff, Fluency, LM-Correctness.

Source: videollm-online ``models/modeling_live.py::LiveMixin.stream_evaluate`` (per sample) and
``data/ego4d/narration.py::compute_metrics`` (mean over samples, frames → seconds); docs/design.md §3.

A sample is one teacher-forced stream. It is split into **turns** at every ``<eos>``: turn ``r``
covers stream positions ``[start_r, stop_r)`` with ``stop_r`` = (position of the r-th ``<eos>``)
+ 1; whatever follows the last ``<eos>`` belongs to no turn. In a turn:

* the **LM tokens** are the labelled text slots (``text_weights > 0``): as in the reference, the
  ``]\\n`` slot before ``Assistant:`` (its target is ``Assistant:``), the tag, and the response
  up to its last word (target ``<eos>``) — :mod:`mod_jax.data.stream` sets these weights from
  videollm-online's learn ranges, so a turn counts exactly the reference's labels;
* the **stream targets** are the labelled frame ends (``frame_weights > 0``), in stream order;
  the last one is the frame after which the model should speak.

Per turn (skipped when it has neither):

* **LM-PPL** = exp(mean CE of the LM tokens).
* **LM-Correctness** = (# leading LM tokens whose argmax is the target, up to the first error) /
  (# LM tokens).
* **frame_diff**: if some stream target's decision is "speak", the first such one at index ``i``
  (of ``n`` stream targets) gives ``frame_diff = n - i - 1`` (> 0: early, 0: on time). If none
  speaks the response is late: in the last turn ``frame_diff = 0`` (the stream ends); otherwise
  the model is fed ``m = min(frames of the next turn, frames of this turn - 1)`` further frames
  (each as [interval token, frame]) after this turn's last stream target, with the cache of
  everything up to it (``late_fn``); the first of them where it speaks, at index ``j``, gives
  ``frame_diff = -(j + 1)``, none gives ``-m``, and ``m = 0`` gives 0. TimeDiff uses
  ``|frame_diff|``.
* **Fluency** (turns with both LM tokens and stream targets): with ``n`` stream targets, ``L`` LM
  tokens and ``c`` leading-correct LM tokens: on time ``(n + c) / (n + L)``; early
  ``(n - frame_diff) / (n + L)``; late ``(n - 1) / (n + L)`` (a late last turn counts as on time,
  as in the reference).

Per sample each metric is the mean over the turns that have it; a sample without any gives the
reference's defaults (LM-PPL 1, frame_diff 0, Fluency 1, LM-Correctness 1; counted in
``samples_without_turns``). Over samples: the mean, and TimeDiff = mean frame_diff / fps.

The "speak" decision (:func:`speak_decision`) is the reference's: argmax of the frame-end
distribution is not the interval token, or, with a threshold > 0, P(interval) < threshold.
The reference's appended frames are found through a running frame count that skips unlabelled
turns; here they are the frames right after the turn's last stream target, which is the same in
every stream this project renders (each turn ends with a response to its last frame).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

METRICS = ("lm_ppl", "time_diff", "fluency", "lm_correctness")


def speak_decision(probs_v: np.ndarray, interval_id: int, threshold: float = 0.0) -> np.ndarray:
  """Whether the model speaks at a frame end (videollm-online's rule).

  Args:
    probs_v: float ``[..., V]``, the softmax distribution of the next token at the last vision
      token of a frame.
    interval_id: id of the interval token (the "stay silent, next frame" prediction).
    threshold: 0 → speak iff the argmax is not the interval token; > 0 → also speak when
      P(interval) < threshold (LIVE demo: 0.725).

  Returns:
    bool ``[...]``.

  Raises:
    ValueError: ``threshold`` outside [0, 1].
  """
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(
      f"threshold={threshold} must be in [0, 1] (a probability of the interval "
      f"token; 0 disables it)."
    )
  probs = np.asarray(probs_v)
  speak = np.argmax(probs, axis=-1) != interval_id
  if threshold > 0:
    speak = speak | (probs[..., interval_id] < threshold)
  return speak


@dataclasses.dataclass
class SampleStream:
  """One teacher-forced sample in the slot layout, with the model's outputs at each slot.

  Attributes:
    text_tokens: int ``[T]`` token ids of the text slots.
    text_positions: int ``[T]`` stream positions.
    text_weights: float ``[T]``; > 0 where the slot is labelled (``mod_jax.data.stream``).
    text_ce: float ``[T]`` cross-entropy (nats) of the target at each slot (used where weighted).
    text_correct: bool ``[T]``: the argmax at the slot is its target.
    frame_positions: int ``[F]`` position of each frame's first vision token.
    frame_weights: float ``[F]``; > 0 where the frame-end decision is labelled.
    frame_speak: bool ``[F]``: the decision at each frame end (:func:`speak_decision`).
  """

  text_tokens: np.ndarray
  text_positions: np.ndarray
  text_weights: np.ndarray
  text_ce: np.ndarray
  text_correct: np.ndarray
  frame_positions: np.ndarray
  frame_weights: np.ndarray
  frame_speak: np.ndarray


@dataclasses.dataclass
class SampleResult:
  """Per-sample metrics and what they came from.

  Attributes:
    lm_ppl, frame_diff, fluency, lm_correctness: the sample's means (reference defaults when a
      list is empty); ``frame_diff`` is the mean |frame_diff| in frames.
    turns: number of turns scored.
    frame_diffs: signed frame_diff per turn with stream targets (> 0 early, < 0 late).
    late_queries: how many times ``late_fn`` was called.
  """

  lm_ppl: float
  frame_diff: float
  fluency: float
  lm_correctness: float
  turns: int
  frame_diffs: list[int]
  late_queries: int


LateFn = Callable[[int, int], Sequence[bool]]


def evaluate_sample(sample: SampleStream, *, eos_id: int, late_fn: LateFn) -> SampleResult:
  """The four metrics of one sample (module docstring), as ``stream_evaluate`` computes them.

  Args:
    sample: the sample's slots and model outputs.
    eos_id: id of ``<eos>`` (turn boundaries).
    late_fn: ``late_fn(frame_index, m)`` → ``m`` speak decisions for the frames
      ``frame_index + 1 .. frame_index + m`` of the sample, each fed after an interval token,
      with the model's cache holding the stream up to the last vision token of frame
      ``frame_index`` (teacher-forced). Called only for late turns.

  Returns:
    A :class:`SampleResult`.

  Raises:
    ValueError: arrays of inconsistent lengths, or ``late_fn`` returning the wrong length.
  """
  s = sample
  t_order = np.argsort(s.text_positions, kind="stable")
  f_order = np.argsort(s.frame_positions, kind="stable")
  t_tok, t_pos = np.asarray(s.text_tokens)[t_order], np.asarray(s.text_positions)[t_order]
  t_w, t_ce = np.asarray(s.text_weights)[t_order], np.asarray(s.text_ce, np.float64)[t_order]
  t_ok = np.asarray(s.text_correct, bool)[t_order]
  f_pos, f_w = np.asarray(s.frame_positions)[f_order], np.asarray(s.frame_weights)[f_order]
  f_speak = np.asarray(s.frame_speak, bool)[f_order]
  if not (len(t_tok) == len(t_pos) == len(t_w) == len(t_ce) == len(t_ok)):
    raise ValueError("SampleStream text arrays have different lengths.")
  if not len(f_pos) == len(f_w) == len(f_speak):
    raise ValueError("SampleStream frame arrays have different lengths.")

  stops = t_pos[t_tok == eos_id] + 1
  starts = np.concatenate([[np.iinfo(np.int64).min], stops[:-1]])
  frames_in = [np.flatnonzero((f_pos >= a) & (f_pos < b)) for a, b in zip(starts, stops)]
  ppls, diffs, fluencies, correctness = [], [], [], []
  signed_diffs, late_queries = [], 0
  for r, (start, stop) in enumerate(zip(starts, stops)):
    lm = np.flatnonzero((t_pos >= start) & (t_pos < stop) & (t_w > 0))
    frames = frames_in[r]
    stream = frames[f_w[frames] > 0]
    if len(lm) == 0 and len(stream) == 0:
      continue
    if len(lm):
      ppls.append(math.exp(float(np.mean(t_ce[lm]))))
      wrong = np.flatnonzero(~t_ok[lm])
      n_correct = int(wrong[0]) if len(wrong) else len(lm)
      correctness.append(n_correct / len(lm))
    if len(stream):
      spoke = np.flatnonzero(f_speak[stream])
      if len(spoke):
        frame_diff = len(stream) - int(spoke[0]) - 1
      elif r == len(stops) - 1:
        frame_diff = 0
      else:
        m = min(len(frames_in[r + 1]), len(frames) - 1)
        if m == 0:
          frame_diff = 0
        else:
          late = np.asarray(late_fn(int(f_order[stream[-1]]), m), bool)
          late_queries += 1
          if late.shape != (m,):
            raise ValueError(f"late_fn returned {late.shape} decisions for {m} frames.")
          first = np.flatnonzero(late)
          frame_diff = -(int(first[0]) + 1) if len(first) else -m
      diffs.append(abs(frame_diff))
      signed_diffs.append(frame_diff)
      if len(lm):
        n, valid = len(stream), len(stream) + len(lm)
        if frame_diff == 0:
          fluencies.append((n + n_correct) / valid)
        elif frame_diff > 0:
          fluencies.append((n - frame_diff) / valid)
        else:
          fluencies.append((n - 1) / valid)
  mean = lambda xs, default: float(np.mean(xs)) if xs else default
  return SampleResult(
    lm_ppl=mean(ppls, 1.0),
    frame_diff=mean(diffs, 0.0),
    fluency=mean(fluencies, 1.0),
    lm_correctness=mean(correctness, 1.0),
    turns=max(len(ppls), len(diffs)),
    frame_diffs=signed_diffs,
    late_queries=late_queries,
  )


def aggregate(results: Sequence[SampleResult], fps: float) -> dict[str, float]:
  """Means over samples (``compute_metrics``): lm_ppl, time_diff (seconds), fluency,
  lm_correctness, plus ``samples``, ``turns`` and ``samples_without_turns``.

  Raises:
    ValueError: no result, or ``fps <= 0``.
  """
  if not results:
    raise ValueError("aggregate() needs at least one sample result.")
  if fps <= 0:
    raise ValueError(f"fps={fps} must be > 0 (frames per second of the stream).")
  col = lambda name: float(np.mean([getattr(r, name) for r in results]))
  return {
    "lm_ppl": col("lm_ppl"),
    "time_diff": col("frame_diff") / fps,
    "fluency": col("fluency"),
    "lm_correctness": col("lm_correctness"),
    "samples": len(results),
    "turns": int(sum(r.turns for r in results)),
    "samples_without_turns": int(sum(r.turns == 0 for r in results)),
  }
