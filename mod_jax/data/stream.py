"""The LIVE stream format: one video with timestamped narrations/queries -> token windows.

Source: docs/design.md §2; videollm-online ``models/tokenization_live.py`` (chat template, learn ranges),
``data/ego4d/narration.py`` (narration times ceiled to the frame grid, later narration wins on a
shared frame), ``data/utils.py::ceil_time_by_fps``.

A video of ``T`` frames (sampled at ``fps``) is rendered as one stream (``N`` = tokens_per_frame)::

  <bos>{system}\\n[<v>*N,<v>*N]\\nAssistant: a red circle appears<eos>\\n[<v>*N,<v>*N ...

* **Frames** are ``N`` placeholder tokens ``<v>`` joined by the interval token ``,``.
* **Narrations** (assistant responses): a narration at ``t`` seconds is answered after frame
  ``k = ceil(t * fps)`` (rounded up to the frame grid, clamped to ``[0, T-1]``): the stream is
  closed with ``]\\n``, then ``Assistant: {text}<eos>``, then ``\\n[`` re-opens it (nothing
  re-opens after the last frame). When two narrations fall on one frame the later one is kept (as
  videollm-online does) and the replaced one is COUNTED in :class:`StreamStats`.
* **User queries** at ``t`` seconds enter before the first frame at/after ``t``, i.e. before frame
  ``j = ceil(t * fps)`` (clamped to ``[0, T-1]``): after frame ``j-1`` as
  ``]\\nUser: {q}\\n[``; at ``j = 0`` right after the system prompt:
  ``<bos>{system}\\nUser: {q}\\n[``.
  A narration answered after frame ``j-1`` comes first: ``]\\nAssistant: r<eos>\\nUser: q\\n[``.
  Several queries before one frame follow each other: ``]\\nUser: q1\\nUser: q2\\n[``.

Labels (the split slot layout the model consumes; positions are stream positions, 0-based, and
``<v>`` tokens occupy positions too). They are videollm-online's: ``get_learn_ranges`` marks
character ranges of the text (a response from ``Assistant:`` through its ``<eos>``; after a
stream's last frame its whole ``]\\n``) and ``data_collator`` labels the token BEFORE each token of
a range with that token, i.e. a slot is learned iff its next token lies in a range:

* text slots: ``text_tokens`` / ``text_positions``; ``text_targets`` is the next stream token when
  it is text, else 0; ``text_weights`` is 1.0 at the slots whose target is a token of
  ``Assistant: {text}<eos>``: the last token of the ``]\\n`` before it (target: the first token of
  ``Assistant:``), each token of ``Assistant:``, and each response word (the last one's target is
  ``<eos>``). When ``]\\n`` is several tokens (SmolLM2's BPE splits it into ``]`` ``\\n``), the
  slots of its tokens but the last are learned too, before a response and before a query alike
  (their targets are the rest of ``]\\n``, in the reference's stream range); with a one-token
  ``]\\n`` there is no such slot. Everything else has weight 0: the system prompt,
  ``,``, ``[``, ``\\n``, ``<eos>`` (target ``\\n``), queries with their ``User:`` tag, and the slot
  before ``User:`` (a query is not a response).
* frame slots: ``frame_positions`` is the position of the frame's first ``<v>``; ``frame_targets``
  is the stream decision at its last ``<v>``: the interval token when another frame follows,
  ``]\\n``'s first id when a response or query follows; ``frame_weights`` is 1.0 where that is
  defined, 0.0 for the last frame of a video with nothing after it.

Windows: a stream longer than ``max_frames`` frames or ``max_text`` text tokens is cut into
consecutive windows (greedy, as many frames as fit; with R context chunks per row, as many as
flow into the R chunks, ``mod_jax/data/packing.py``), each a sample that starts with
``<bos>{system}\\n`` and, for the window's first frame, the queries entering before it, then
``[``. A window ending after frame ``i`` keeps frame ``i``'s response (it belongs to what was seen;
labelled as above, its ``]\\n`` slot included, also when frame ``i`` is the window's first) but
not the ``,`` / ``\\n[`` re-opening; frame ``i``'s target still comes from the full stream (interval
token with weight 1 when the next frame is in the next window). Queries entering before frame
``i+1`` move to the next window's prefix. A single frame whose prefix and response exceed
``max_text`` is kept with its text truncated to the first ``max_text`` tokens; the dropped tokens
are COUNTED (targets of kept tokens still name the true next token).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mod_jax.data.packing import ChunkFlow
from mod_jax.data.tokenizer import StreamTokenizer

# Feature names of one rendered sample (and of a packed row, which adds the segment ids).
TEXT_FEATURES = ("text_tokens", "text_positions", "text_targets", "text_weights")
FRAME_FEATURES = ("frames", "frame_positions", "frame_targets", "frame_weights")


def frame_features(key: str = "frames") -> tuple[str, ...]:
  """The frame-slot feature names when the vision field is ``key`` ("frames" / "features")."""
  return (key,) + FRAME_FEATURES[1:]


_TIME_EPS = 1e-6  # seconds * fps; so t = k / fps exactly maps to frame k despite float error


def time_to_frame(t: float, fps: float, num_frames: int) -> int:
  """Frame index ``ceil(t * fps)`` clamped to ``[0, num_frames - 1]`` (seconds -> frames)."""
  k = int(math.ceil(t * fps - _TIME_EPS))
  return min(max(k, 0), num_frames - 1)


@dataclasses.dataclass
class StreamStats:
  """Counts from rendering streams into windows (summable with ``+``).

  Attributes:
    windows: samples produced.
    truncated_windows: windows whose text exceeded ``max_text`` even with a single frame.
    truncated_tokens: text tokens dropped from those windows.
    replaced_narrations: narrations dropped because a later one fell on the same frame.
    unknown_tokens: ``<unk>`` ids produced when encoding prompt / narrations / queries.
  """

  windows: int = 0
  truncated_windows: int = 0
  truncated_tokens: int = 0
  replaced_narrations: int = 0
  unknown_tokens: int = 0

  def __add__(self, other: StreamStats) -> StreamStats:
    return StreamStats(
      *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))
    )


@dataclasses.dataclass
class StreamWindow:
  """One sample's text and frame slots, without pixels (frames are attached at load time).

  Attributes:
    frame_start, frame_stop: the window covers video frames ``[frame_start, frame_stop)``.
    text_tokens: int32 [n_text].
    text_positions: int32 [n_text].
    text_targets: int32 [n_text].
    text_weights: float32 [n_text].
    frame_positions: int32 [n_frames].
    frame_targets: int32 [n_frames].
    frame_weights: float32 [n_frames].
    truncated_tokens: text tokens dropped from this window (0 unless it overflowed).
  """

  frame_start: int
  frame_stop: int
  text_tokens: np.ndarray
  text_positions: np.ndarray
  text_targets: np.ndarray
  text_weights: np.ndarray
  frame_positions: np.ndarray
  frame_targets: np.ndarray
  frame_weights: np.ndarray
  truncated_tokens: int = 0

  @property
  def num_frames(self) -> int:
    return self.frame_stop - self.frame_start

  @property
  def num_text(self) -> int:
    return len(self.text_tokens)

  def to_example(self, vision: np.ndarray, key: str = "frames") -> dict[str, np.ndarray]:
    """The sample as a dict of arrays (the packer's input).

    Args:
      vision: the window's frames uint8 ``[n_frames, S, S, 3]`` (video frames
        ``[frame_start, frame_stop)``), or their pre-extracted features ``[n_frames, N, d]``.
      key: its field name, ``"frames"`` or ``"features"``.

    Returns:
      ``{"text_tokens", "text_positions", "text_targets", "text_weights": [n_text],
      key: vision, "frame_positions", "frame_targets", "frame_weights": [n_frames]}`` with the
      dtypes of the attributes (frames uint8, features as given).

    Raises:
      ValueError: ``vision`` does not hold exactly the window's frames.
    """
    if vision.shape[0] != self.num_frames:
      raise ValueError(
        f"window [{self.frame_start}, {self.frame_stop}) needs {self.num_frames} frames of "
        f"{key} but got {vision.shape[0]} (the video is shorter than its index says?)."
      )
    if key == "frames":
      vision = np.ascontiguousarray(vision, np.uint8)
    return {
      "text_tokens": self.text_tokens,
      "text_positions": self.text_positions,
      "text_targets": self.text_targets,
      "text_weights": self.text_weights,
      key: np.ascontiguousarray(vision),
      "frame_positions": self.frame_positions,
      "frame_targets": self.frame_targets,
      "frame_weights": self.frame_weights,
    }


class _Piece:
  """A run of stream tokens: ``ids`` and, per token, whether it is learned as the target of the
  slot before it (the reference's learn ranges, module docstring)."""

  __slots__ = ("ids", "learn")

  def __init__(self, ids: Sequence[int] = (), learn: Sequence[bool] | bool = False):
    self.ids = list(ids)
    self.learn = list(learn) if not isinstance(learn, bool) else [learn] * len(self.ids)

  def __iadd__(self, other: _Piece) -> _Piece:
    self.ids += other.ids
    self.learn += other.learn
    return self

  def __len__(self) -> int:
    return len(self.ids)


def render_stream(
  tokenizer: StreamTokenizer,
  *,
  num_frames: int,
  narrations: Sequence[tuple[float, str]],
  queries: Sequence[tuple[float, str]] = (),
  fps: float,
  system_prompt: str,
  tokens_per_frame: int,
  max_frames: int,
  max_text: int,
  chunks: int = 1,
) -> tuple[list[StreamWindow], StreamStats]:
  """Renders one video's annotations into LIVE-format windows (the module docstring has the rules).

  Args:
    tokenizer: the stream tokenizer.
    num_frames: T, frames of the video sampled at ``fps``.
    narrations: ``(time_seconds, text)`` assistant responses (validated by the caller: time in
      ``[0, duration]``, text of >= 2 words), any order.
    queries: ``(time_seconds, text)`` user queries, any order.
    fps: frames per second of the sampled frames.
    system_prompt: text after ``<bos>``.
    tokens_per_frame: N, ``<v>`` tokens per frame.
    max_frames: F_cap, frames per window.
    max_text: T_cap, text tokens per window.
    chunks: R, context chunks per packed row (docs/design.md §6): a window grows only while it
      flows into R chunks of ``max_text / R`` text slots and ``max_frames / R`` frames
      (``mod_jax/data/packing.py``); R = 1: while it has at most ``max_text`` text tokens and
      ``max_frames`` frames.

  Returns:
    ``(windows, stats)``: windows in stream order covering all ``T`` frames.

  Raises:
    ValueError: ``num_frames < 1``, ``max_frames < 1`` or ``max_text < 1``, or ``max_frames`` /
      ``max_text`` not divisible by ``chunks``.
  """
  if num_frames < 1 or max_frames < 1 or max_text < 1:
    raise ValueError(
      f"render_stream: num_frames={num_frames}, max_frames={max_frames} and "
      f"max_text={max_text} must all be >= 1."
    )
  if chunks < 1 or max_frames % chunks or max_text % chunks:
    raise ValueError(
      f"render_stream: max_frames={max_frames} and max_text={max_text} must be divisible by "
      f"the context chunks {chunks} (>= 1)."
    )
  tok = tokenizer
  stats = StreamStats()

  def encode(text: str) -> list[int]:
    ids = tok.encode(text)
    stats.unknown_tokens += tok.count_unknown(ids)
    return ids

  # --- annotations on the frame grid.
  response_at: dict[int, list[int]] = {}
  for t, text in sorted(narrations, key=lambda x: x[0]):  # stable: later entries win ties
    k = time_to_frame(t, fps, num_frames)
    if k in response_at:
      stats.replaced_narrations += 1
    response_at[k] = encode(text)
  queries_before: dict[int, list[list[int]]] = {}
  for t, text in sorted(queries, key=lambda x: x[0]):
    queries_before.setdefault(time_to_frame(t, fps, num_frames), []).append(encode(text))

  nl = _Piece(tok.newline_ids)
  system = _Piece([tok.bos_id] + encode(system_prompt)) if system_prompt else _Piece([tok.bos_id])

  def user_turns(frame: int) -> _Piece:  # "User: q1\nUser: q2\n" (each ends with \n)
    p = _Piece()
    for q in queries_before.get(frame, ()):
      p += _Piece(list(tok.user_ids) + q)
      p += nl
    return p

  def stream_close() -> _Piece:  # "]\n" after a frame: its first id is the frame's target
    close = tok.stream_close_ids
    return _Piece(close, [False] + [True] * (len(close) - 1))

  def response(frame: int) -> _Piece:  # "]\nAssistant: text<eos>" (or empty)
    if frame not in response_at:
      return _Piece()
    p = stream_close()
    p += _Piece(list(tok.assistant_ids) + response_at[frame] + [tok.eos_id], learn=True)
    return p

  def prefix(frame: int) -> _Piece:  # window start before `frame`: "<bos>{sys}\n{queries}["
    p = _Piece(system.ids)
    p += nl
    p += user_turns(frame)
    p += _Piece(tok.stream_open_ids)
    return p

  # After-text of frame i: A_i (stream continues) and H_i (window cut after frame i).
  after_full: list[_Piece] = []
  after_cut: list[_Piece] = []
  for i in range(num_frames):
    head = response(i)
    nxt = user_turns(i + 1) if i + 1 < num_frames else _Piece()
    if len(head) == 0 and len(nxt) == 0:
      full = _Piece([tok.interval_id] if i + 1 < num_frames else [])
    else:
      full = _Piece(head.ids, head.learn)
      if len(head) == 0:
        full += stream_close()
      elif len(nxt) or i + 1 < num_frames:
        full += nl
      full += nxt
      if i + 1 < num_frames:
        full += _Piece(tok.stream_open_ids)
    after_full.append(full)
    after_cut.append(head if i + 1 < num_frames else full)
  frame_target = [a.ids[0] if len(a) else 0 for a in after_full]

  # --- greedy windows: grow while the next frame (with the cut tail) still flows into the row's
  # chunks; with one chunk: frames <= F_cap and text <= T_cap.
  chunk_caps = np.tile([[max_text // chunks, max_frames // chunks]], (chunks, 1))
  text, frame = 0, 1
  windows = []
  start = 0
  while start < num_frames:
    pre = prefix(start)
    flow = ChunkFlow(chunk_caps)  # the window's flow up to its last frame, without that tail
    flow.add(text, len(pre))
    flow.add(frame, 1)
    stop = start + 1
    while stop < num_frames:
      grown = flow.copy()
      if not (grown.add(text, len(after_full[stop - 1])) and grown.add(frame, 1)):
        break
      if not grown.copy().add(text, len(after_cut[stop])):
        break
      flow = grown
      stop += 1
    windows.append(
      _build_window(
        tok, pre, after_full, after_cut, frame_target, start, stop, tokens_per_frame, max_text
      )
    )
    start = stop
  stats.windows = len(windows)
  for w in windows:
    if w.truncated_tokens:
      stats.truncated_windows += 1
      stats.truncated_tokens += w.truncated_tokens
  return windows, stats


def _build_window(
  tok: StreamTokenizer,
  pre: _Piece,
  after_full: list[_Piece],
  after_cut: list[_Piece],
  frame_target: list[int],
  start: int,
  stop: int,
  tokens_per_frame: int,
  max_text: int,
) -> StreamWindow:
  """Lays out window ``[start, stop)`` and derives positions, targets and weights."""
  ids: list[int] = list(pre.ids)
  learn = list(pre.learn)
  is_text = [True] * len(pre)
  frame_pos = []
  for i in range(start, stop):
    frame_pos.append(len(ids))
    ids += [tok.vision_id] * tokens_per_frame
    learn += [False] * tokens_per_frame
    is_text += [False] * tokens_per_frame
    tail = after_full[i] if i + 1 < stop else after_cut[i]
    ids += tail.ids
    learn += tail.learn
    is_text += [True] * len(tail)
  ids_a = np.asarray(ids, np.int32)
  text_mask = np.asarray(is_text, bool)
  learn_a = np.asarray(learn, bool)
  pos = np.flatnonzero(text_mask)
  nxt = pos + 1
  in_range = nxt < len(ids_a)
  nxt_c = np.minimum(nxt, len(ids_a) - 1)
  nxt_is_text = in_range & text_mask[nxt_c]
  targets = np.where(nxt_is_text, ids_a[nxt_c], 0).astype(np.int32)
  weights = (in_range & learn_a[nxt_c]).astype(np.float32)  # the collator's one-token shift
  truncated = max(0, len(pos) - max_text)
  if truncated:
    pos, targets, weights = pos[:max_text], targets[:max_text], weights[:max_text]
  f_targets = np.asarray(frame_target[start:stop], np.int32)
  return StreamWindow(
    frame_start=start,
    frame_stop=stop,
    text_tokens=ids_a[pos].astype(np.int32),
    text_positions=pos.astype(np.int32),
    text_targets=targets,
    text_weights=weights,
    frame_positions=np.asarray(frame_pos, np.int32),
    frame_targets=f_targets,
    frame_weights=(f_targets != 0).astype(np.float32),
    truncated_tokens=truncated,
  )
