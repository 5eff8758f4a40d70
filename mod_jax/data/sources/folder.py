"""A folder of videos with a ``narrations.json`` (Ego4D-like names); the procedural data too.

Layout of one split (``{data.dir}/train``, ``{data.dir}/eval``)::

  narrations.json   {"<video path relative to this folder>": {
                       "narrations": [{"timestamp_sec": 3.5, "narration_text": "..."}, ...],
                       "queries":    [{"timestamp_sec": 1.0, "text": "..."}, ...]   # optional
                    }, ...}
  <the videos>      anything PyAV decodes (mp4, mkv, webm, avi, mpg, ...)

Indexing validates every video once by decoding it at ``data.fps`` (:func:`index_folder`; with
pre-extracted features it reads only each features file's header instead). A
missing, corrupt or truncated video is SKIPPED and COUNTED with a warning naming the file, or
raises with ``on_bad_video="fail"``. Bad annotations are dropped, COUNTED by reason and reported
in one warning per split, never silently lost:

* ``missing_video``: the entry's file does not exist (the video is also counted as skipped);
* ``malformed_entry``: the entry or its lists are not of the documented shape;
* ``bad_time``: timestamp missing or not a number; ``negative_time``: ``< 0``;
* ``time_beyond_duration``: later than the video's duration;
* ``non_string_text``: text missing or not a string;
* ``invalid_utf8``: a text (or the entry's video path) that is not valid UTF-8: raw invalid bytes
  in the file, or an escaped lone surrogate such as ``"\\udce9"``; each one is also named in a
  warning (file, video, list and index). The file is decoded with ``errors="surrogateescape"``,
  so such a text spoils neither the JSON parse nor the other entries;
* ``short_narration``: fewer than 2 words (videollm-online ``data/ego4d/narration.py`` keeps
  narrations of >= 2 words); ``empty_query``: a query with no words.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tqdm

from mod_jax.data.frame_cache import FrameCache
from mod_jax.data.video import VideoError, decode_video, probe_video

ANNOTATION_FILE = "narrations.json"


class DataWarning(UserWarning):
  """A video or annotation was skipped (and counted)."""


@dataclasses.dataclass(frozen=True)
class VideoRecord:
  """One usable video and its validated annotations.

  Attributes:
    path: absolute path of the video file.
    name: its key in ``narrations.json``.
    num_frames: T, frames at ``data.fps`` (from the validating decode).
    duration: seconds.
    narrations: ``(time_seconds, text)``, sorted by time.
    queries: ``(time_seconds, text)``, sorted by time.
  """

  path: str
  name: str
  num_frames: int
  duration: float
  narrations: tuple[tuple[float, str], ...]
  queries: tuple[tuple[float, str], ...]

  @property
  def ref(self) -> str:
    """What the pipeline's readers take for this video: its path."""
    return self.path


@dataclasses.dataclass
class FolderStats:
  """What indexing a split kept and dropped.

  Attributes:
    videos: usable videos.
    skipped_videos: entries whose video is missing, corrupt or truncated.
    skipped_paths: those files with the reason, ``"path: reason"``.
    narrations, queries: annotations kept.
    bad_annotations: dropped annotations by reason (see the module docstring).
  """

  videos: int = 0
  skipped_videos: int = 0
  skipped_paths: list[str] = dataclasses.field(default_factory=list)
  narrations: int = 0
  queries: int = 0
  bad_annotations: dict[str, int] = dataclasses.field(default_factory=dict)


def load_frames(path: str, fps: float, size: int, cache: FrameCache | None = None) -> np.ndarray:
  """Decoded frames uint8 ``[T, size, size, 3]`` of ``path`` at ``fps``, through ``cache``.

  Raises:
    VideoError: the file cannot be decoded (see :func:`mod_jax.data.video.decode_video`).
  """
  make = lambda: decode_video(path, fps, size)[0]
  return cache.get((path, float(fps), int(size)), make) if cache is not None else make()


def _decode_and_measure(
  path: str, fps: float, size: int, cache: FrameCache | None
) -> tuple[int, float]:
  """(frames at ``fps``, duration seconds) from a full decode (kept in ``cache``)."""
  num_frames = int(load_frames(path, fps, size, cache).shape[0])
  info = probe_video(path)
  return num_frames, (info.duration if info.duration > 0 else num_frames / fps)


def read_annotations(split_dir: str) -> dict[str, Any]:
  """Loads ``{split_dir}/narrations.json``.

  Raises:
    FileNotFoundError: no such file (the message shows the expected layout).
    ValueError: not valid JSON, or not an object mapping video paths to entries.

  Invalid UTF-8 bytes inside strings do not fail the parse: they are kept as lone surrogates
  (``errors="surrogateescape"``) for :func:`index_folder` to drop and count (``invalid_utf8``).
  """
  path = os.path.join(split_dir, ANNOTATION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found. A folder dataset has one subfolder per split ('train', 'eval'), each "
      f'with {ANNOTATION_FILE} = {{"<video>": {{"narrations": [{{"timestamp_sec": 1.5, '
      f'"narration_text": "..."}}], "queries": [...]}}}} and the videos.'
    )
  with open(path, "rb") as f:
    raw = f.read()
  try:
    data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(
      f"{path}: expected a JSON object mapping video paths to entries, got {type(data).__name__}."
    )
  return data


def _valid_time(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_utf8(text: str) -> bool:
  """False for a string holding lone surrogates (invalid bytes or escapes like "\\udce9")."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _parse_items(
  items: Any,
  *,
  text_key: str,
  min_words: int,
  short_reason: str,
  duration: float,
  bad: collections.Counter,
  where: str,
  invalid: list[str],
) -> list[tuple[float, str]]:
  """Valid ``(time, text)`` items of one list; drops are counted in ``bad`` (and, for invalid
  UTF-8, described in ``invalid`` as ``{where}[{index}]: {text!r}``)."""
  if items is None:
    return []
  if not isinstance(items, list):
    bad["malformed_entry"] += 1
    return []
  out = []
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      bad["malformed_entry"] += 1
      continue
    t, text = item.get("timestamp_sec"), item.get(text_key)
    if not _valid_time(t):
      bad["bad_time"] += 1
    elif t < 0:
      bad["negative_time"] += 1
    elif t > duration:
      bad["time_beyond_duration"] += 1
    elif not isinstance(text, str):
      bad["non_string_text"] += 1
    elif not _is_utf8(text):
      bad["invalid_utf8"] += 1
      invalid.append(f"{where}[{i}]: {text[:60]!r}")
    elif len(text.split()) < min_words:
      bad[short_reason] += 1
    else:
      out.append((float(t), " ".join(text.split())))
  return sorted(out, key=lambda x: x[0])


def index_folder(
  split_dir: str,
  *,
  fps: float,
  size: int,
  on_bad_video: str = "skip",
  cache: FrameCache | None = None,
  progress: bool = True,
  measure: Callable[[str], tuple[int, float]] | None = None,
) -> tuple[list[VideoRecord], FolderStats]:
  """Validates a split's videos and annotations (each video decoded once, into ``cache``).

  Args:
    split_dir: folder holding ``narrations.json`` and the videos it names.
    fps: frame rate the videos are sampled at (frames/second).
    size: frame side in pixels (decoded frames go to ``cache`` for the pipeline).
    on_bad_video: ``"skip"`` (count and warn) or ``"fail"`` (raise).
    cache: where the validating decodes are kept (None: not kept).
    progress: show a tqdm bar (only drawn for more than 64 videos).
    measure: ``path -> (num_frames at fps, duration seconds)`` raising ``VideoError`` for an
      unusable video; None decodes the video (the validating decode, kept in ``cache``). The
      pre-extracted features path (:func:`mod_jax.data.features.measure_fn`) reads only the
      header of the video's features file instead.

  Returns:
    ``(records, stats)``: usable videos in sorted key order, and the counts.

  Raises:
    VideoError: a bad video with ``on_bad_video="fail"``.
    FileNotFoundError / ValueError: see :func:`read_annotations`.
  """
  if on_bad_video not in ("skip", "fail"):
    raise ValueError(f"on_bad_video={on_bad_video!r}; choose 'skip' or 'fail'.")
  annotations = read_annotations(split_dir)
  stats = FolderStats()
  bad: collections.Counter[str] = collections.Counter()
  invalid: list[str] = []  # invalid-UTF-8 entries, named in a warning
  records = []
  names = sorted(annotations)
  for name in tqdm.tqdm(
    names, desc=f"index {split_dir}", disable=not progress or len(names) <= 64, leave=False
  ):
    entry = annotations[name]
    if not _is_utf8(name):
      bad["invalid_utf8"] += 1
      invalid.append(f"video path {name!r} (the whole entry)")
      continue
    path = os.path.abspath(os.path.join(split_dir, name))
    if not isinstance(entry, dict):
      bad["malformed_entry"] += 1
      continue
    try:
      if measure is None:
        if not os.path.exists(path):
          bad["missing_video"] += 1
        num_frames, duration = _decode_and_measure(path, fps, size, cache)
      else:
        num_frames, duration = measure(path)
    except VideoError as e:
      if on_bad_video == "fail":
        raise
      stats.skipped_videos += 1
      stats.skipped_paths.append(f"{e.path}: {e.reason}")
      warnings.warn(
        f"skipping video {e.path}: {e.reason} (data.on_bad_video='skip'; set "
        f"'fail' to stop instead)",
        DataWarning,
        stacklevel=2,
      )
      continue
    narrations = _parse_items(
      entry.get("narrations"),
      text_key="narration_text",
      min_words=2,
      short_reason="short_narration",
      duration=duration,
      bad=bad,
      where=f"{name!r} narrations",
      invalid=invalid,
    )
    queries = _parse_items(
      entry.get("queries"),
      text_key="text",
      min_words=1,
      short_reason="empty_query",
      duration=duration,
      bad=bad,
      where=f"{name!r} queries",
      invalid=invalid,
    )
    records.append(
      VideoRecord(
        path=path,
        name=name,
        num_frames=num_frames,
        duration=duration,
        narrations=tuple(narrations),
        queries=tuple(queries),
      )
    )
    stats.narrations += len(narrations)
    stats.queries += len(queries)
  stats.videos = len(records)
  stats.bad_annotations = dict(sorted(bad.items()))
  if invalid:
    shown = "; ".join(invalid[:10]) + (
      f"; and {len(invalid) - 10} more" if len(invalid) > 10 else ""
    )
    warnings.warn(
      f"{split_dir}/{ANNOTATION_FILE}: dropped {len(invalid)} entries that are not "
      f"valid UTF-8 ('invalid_utf8'; the rest of the file is used): {shown}",
      DataWarning,
      stacklevel=2,
    )
  if bad:
    warnings.warn(
      f"{split_dir}/{ANNOTATION_FILE}: dropped {sum(bad.values())} bad annotations "
      f"{dict(bad)} (see mod_jax/data/sources/folder.py for the rules).",
      DataWarning,
      stacklevel=2,
    )
  return records, stats
