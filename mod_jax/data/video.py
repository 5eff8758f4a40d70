"""Video decoding with PyAV: fixed-fps frame sampling, aspect-preserving resize, letterbox.

A video of duration ``D`` seconds sampled at ``fps`` gives the frames displayed at
``t_i = i / fps`` for ``i = 0, 1, ...`` while ``t_i < D``: frame ``i`` is the last decoded frame
whose presentation time is ``<= t_i`` (what a viewer sees at that instant). Frames are scaled so
the longer side is ``size`` and padded with black to a square, as VideoLLM-online prepares its
2 fps videos with ffmpeg before encoding them (videollm-online ``data/utils.py::ffmpeg_once``:
``-r fps``, ``scale=...``, ``pad=size:size``).

Every failure to read a file (missing, not a container, no video stream, corrupt or truncated
stream) raises :class:`VideoError` naming the file and the reason, so that data sources can skip
and count it (docs/design.md §5, STYLE "never lose data").
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# A decoded stream that stops more than this many seconds (and more than 2 native frames) before
# the duration the container announces is reported as truncated.
_TRUNCATION_TOLERANCE_S = 0.5
# Presentation times are compared with this slack (seconds) against the sampling grid, so that a
# frame at exactly t_i is not lost to time-base rounding.
_PTS_EPS_S = 1e-6


class VideoError(Exception):
  """A video file that cannot be used: missing, unreadable, corrupt, truncated or without video.

  Attributes:
    path: the offending file.
    reason: what was wrong, in words.
  """

  def __init__(self, path: str | os.PathLike[str], reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")

  def __reduce__(self):  # picklable across grain worker processes
    return (VideoError, (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What the container says about a video's first video stream.

  Attributes:
    width: pixels.
    height: pixels.
    native_fps: the stream's average frame rate (frames per second); 0.0 when unknown.
    duration: seconds; from the stream, else the container, else 0.0 when neither knows.
    num_frames: frame count announced by the container (0 when unknown; not verified).
    codec: decoder name, e.g. ``"h264"``.
  """

  width: int
  height: int
  native_fps: float
  duration: float
  num_frames: int
  codec: str


def _open(path: str) -> Any:
  if not os.path.exists(path):
    raise VideoError(path, "file does not exist")
  try:
    container = av.open(path, mode="r")
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoError(path, f"cannot open as a media container ({type(e).__name__}: {e})") from e
  if not container.streams.video:
    container.close()
    raise VideoError(path, "the container has no video stream")
  return container


def _info(container: Any) -> VideoInfo:
  stream = container.streams.video[0]
  ctx = stream.codec_context
  duration = 0.0
  if stream.duration is not None and stream.time_base is not None:
    duration = float(stream.duration * stream.time_base)
  elif container.duration is not None:
    duration = container.duration / av.time_base
  rate = stream.average_rate or stream.guessed_rate
  return VideoInfo(
    width=int(ctx.width),
    height=int(ctx.height),
    native_fps=float(rate) if rate else 0.0,
    duration=max(duration, 0.0),
    num_frames=int(stream.frames or 0),
    codec=str(ctx.name),
  )


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
  """Reads a video's metadata without decoding it.

  Args:
    path: a video file PyAV/ffmpeg can open (mp4, mkv, avi, mpg, webm, ...).

  Returns:
    A :class:`VideoInfo` for the first video stream.

  Raises:
    VideoError: the file is missing, is not a media container, or has no video stream.
  """
  path = os.fspath(path)
  container = _open(path)
  try:
    return _info(container)
  finally:
    container.close()


def letterbox_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """Where a ``width x height`` picture goes inside a ``size x size`` letterboxed square.

  The picture is scaled by ``size / max(width, height)`` (aspect ratio kept, each side rounded to
  the nearest pixel, at least 1) and centred; the rest is zero padding.

  Returns:
    ``(new_width, new_height, left, top)`` in pixels.
  """
  scale = size / max(width, height)
  new_w = min(size, max(1, int(round(width * scale))))
  new_h = min(size, max(1, int(round(height * scale))))
  return new_w, new_h, (size - new_w) // 2, (size - new_h) // 2


def frame_to_rgb(
  frame: av.VideoFrame, size: int, reformatter: VideoReformatter | None = None
) -> np.ndarray:
  """Resizes one decoded frame to ``size x size`` RGB, keeping aspect ratio, zero-padded.

  The resize is ffmpeg's swscale, as ``frame.reformat(width, height, format="rgb24",
  interpolation="AREA")`` (area averaging, the right filter for downscaling).

  Args:
    frame: a decoded PyAV video frame of any pixel format.
    size: output side in pixels.
    reformatter: reuse one ``VideoReformatter`` across the frames of a video (it caches the
      swscale context: ~50x faster than ``frame.reformat``, same pixels); None makes one.

  Returns:
    uint8 ``[size, size, 3]``.
  """
  new_w, new_h, left, top = letterbox_geometry(frame.width, frame.height, size)
  reformatter = reformatter or VideoReformatter()
  rgb = reformatter.reformat(frame, width=new_w, height=new_h, format="rgb24", interpolation="AREA")
  pixels = rgb.to_ndarray()
  if new_w == size and new_h == size:
    return np.ascontiguousarray(pixels, dtype=np.uint8)
  out = np.zeros((size, size, 3), np.uint8)
  out[top : top + new_h, left : left + new_w] = pixels
  return out


def num_sampled_frames(duration: float, fps: float) -> int:
  """Number of grid times ``t_i = i / fps`` with ``t_i < duration`` (seconds, frames/second)."""
  if duration <= 0:
    return 0
  n = int(math.ceil(duration * fps - 1e-9))
  return max(n, 1)


def _is_live(source) -> bool:
  """A source whose length is not known up front: a pipe, stdin, a device or a URL."""
  return not (isinstance(source, (str, os.PathLike)) and os.path.isfile(source))


def _open_source(source) -> tuple[Any, str]:
  """Opens a file path, ``-`` (stdin), a file object (a pipe), a capture device (``/dev/videoN``,
  through v4l2) or a URL (``rtsp://``, ``http://``, ...); returns (container, name)."""
  if hasattr(source, "read"):
    name, target, fmt = getattr(source, "name", "<pipe>"), source, None
  elif os.fspath(source) == "-":
    name, target, fmt = "<stdin>", sys.stdin.buffer, None
  else:
    name = target = os.fspath(source)
    if "://" not in name and not name.startswith("/dev/"):
      return _open(name), name
    fmt = "v4l2" if name.startswith("/dev/video") else None
  try:
    container = av.open(target, mode="r", format=fmt)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoError(name, f"cannot open as a media source ({type(e).__name__}: {e})") from e
  if not container.streams.video:
    container.close()
    raise VideoError(name, "the source has no video stream")
  return container, name


def iter_frames(source, fps: float, size: int) -> Iterator[tuple[float, np.ndarray]]:
  """Decodes a video source incrementally at a fixed frame rate: yields ``(t_i, frame_i)``.

  Frame ``i`` is the picture displayed at ``t_i = i / fps`` seconds (the last decoded frame whose
  presentation time, relative to the first frame's, is ``<= t_i``), yielded as soon as a later
  frame arrives, so only one decoded picture is held at a time: a camera, a network stream or a
  pipe streams without its length being known, and a long file is never held in memory.

  A regular file is checked as :func:`decode_video` checks it: the grid ends at the duration the
  container announces and a stream that stops early raises (after its frames were yielded).
  Any other source (``-`` for stdin, a file object such as a pipe, ``/dev/videoN``, a URL) ends
  where its stream ends.

  Args:
    source: a file path, ``-``, a readable binary file object, a device path or a URL.
    fps: sampling rate in frames per second.
    size: output side in pixels (letterboxed RGB, :func:`frame_to_rgb`).

  Yields:
    ``(seconds, uint8 [size, size, 3])``.

  Raises:
    VideoError: the source cannot be opened or has no video stream, a decoding error, no
      decodable frame, or a truncated file.
    ValueError: ``fps <= 0`` or ``size < 1``.
  """
  if fps <= 0 or size < 1:
    raise ValueError(f"iter_frames({source!r}): fps={fps} must be > 0 and size={size} >= 1.")
  live = _is_live(source)
  container, name = _open_source(source)
  try:
    info = _info(container)
    stream = container.streams.video[0]
    if info.width * info.height >= 320 * 240:  # frame threads pay off only for larger pictures
      stream.thread_type = "AUTO"
    reformatter = VideoReformatter()
    emitted = 0
    prev = None  # last decoded frame with time <= the next grid time
    first_time = None
    last_time = 0.0
    n_decoded = 0
    duration = 0.0 if live else info.duration
    # The number of grid times is fixed by the announced duration when there is one; otherwise
    # by the decoded stream's end.
    n_target = num_sampled_frames(duration, fps) if duration > 0 else None
    try:
      for frame in container.decode(stream):
        if frame.pts is None or frame.time is None:
          continue
        t = float(frame.time)
        if first_time is None:
          first_time = t
        t -= first_time
        n_decoded += 1
        # Emit every grid time that this frame's arrival closes (the previous frame was shown).
        while (
          prev is not None
          and (n_target is None or emitted < n_target)
          and t > emitted / fps + _PTS_EPS_S
        ):
          yield emitted / fps, frame_to_rgb(prev, size, reformatter)
          emitted += 1
        prev = frame
        last_time = t
    except av.error.FFmpegError as e:
      raise VideoError(
        name, f"decoding failed after {n_decoded} frames ({type(e).__name__}: {e})"
      ) from e
    if prev is None:
      raise VideoError(name, "no decodable video frame")
    frame_dur = 1.0 / info.native_fps if info.native_fps > 0 else 0.0
    if duration <= 0:  # no announced duration: the stream's own end
      n_target = num_sampled_frames(last_time + frame_dur, fps)
    while emitted < n_target:  # grid times after the last frame change
      yield emitted / fps, frame_to_rgb(prev, size, reformatter)
      emitted += 1
    if duration > 0 and last_time + frame_dur < duration - max(
      _TRUNCATION_TOLERANCE_S, 2 * frame_dur
    ):
      raise VideoError(
        name,
        f"truncated: frames stop at {last_time + frame_dur:.2f}s but the container "
        f"announces {duration:.2f}s",
      )
  finally:
    container.close()


def decode_video(
  path: str | os.PathLike[str], fps: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a video at a fixed frame rate into letterboxed RGB frames, all in memory.

  Frame ``i`` is the picture displayed at ``t_i = i / fps`` seconds: the last decoded frame whose
  presentation time is ``<= t_i``, for every ``t_i < duration``. Presentation times are taken
  relative to the stream's first frame. The whole stream is decoded (every frame is checked, so a
  corrupt or truncated file raises here rather than later), but only sampled frames are resized.
  :func:`iter_frames` is the incremental form (live sources, long streams).

  Args:
    path: video file.
    fps: sampling rate in frames per second (VideoLLM-online: 2.0).
    size: output side in pixels (the vision tower's ``image_size``).

  Returns:
    ``(frames, timestamps)``: frames uint8 ``[T, size, size, 3]`` and timestamps float64 ``[T]``
    in seconds (``timestamps[i] == i / fps``), ``T = ceil(duration * fps)``.

  Raises:
    VideoError: missing file, not a container, no video stream, a decoding error, no decodable
      frame, or a stream that ends more than 0.5 s (and 2 native frames) before the announced
      duration (truncated file).
    ValueError: ``fps <= 0`` or ``size < 1``.
  """
  path = os.fspath(path)
  if fps <= 0 or size < 1:
    raise ValueError(f"decode_video({path!r}): fps={fps} must be > 0 and size={size} >= 1.")
  if not os.path.exists(path):
    raise VideoError(path, "file does not exist")
  frames = [frame for _, frame in iter_frames(path, fps, size)]
  timestamps = np.arange(len(frames), dtype=np.float64) / fps
  return np.stack(frames).astype(np.uint8, copy=False), timestamps
