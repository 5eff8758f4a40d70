"""What the two stream builders share: builder config, example schema, video loading, statistics.

An example is one **sample**: a run of consecutive frames of one video (sampled at ``fps``) with
the annotations that fall on it, in seconds from the sample's first frame (exactly on the frame
grid, ``k / fps``)::

  id               text     "<video>/<stream or benchmark sample>"
  video            text     the video's file name under the videos folder
  frame_start      int32    first frame (index at fps into the whole video)
  num_frames       int32    T_s, frames in the sample (<= max_frames)
  frames           T_s encoded images (JPEG or PNG bytes of size x size RGB, letterboxed)
    or features    [T_s, N, d] bfloat16/float32 pre-extracted tower output (``--features``)
  narration_times  float32 [n] seconds;  narration_texts  n texts   (assistant responses)
  query_times      float32 [q] seconds;  query_texts      q texts   (user turns)
  answers          int32 [a]  category indices of a COIN benchmark sample's answer(s), else []

The light part (everything but ``frames`` / ``features``) of every example is also stored in the
build's ``metadata.json`` under ``"index"`` (per split, in example order: builds keep generation
order), so a training run indexes a split without reading any image: see
:mod:`mod_jax.data.tfds.source`. ``"stats"`` holds the build statistics per split (videos used,
skipped with reasons, streams and narrations kept and dropped by rule), ``"params"`` the build
parameters.

Bad videos (missing, undecodable, truncated, or without a features file) are SKIPPED and COUNTED
in the statistics with their reason, never a crash and never silent. Videos are decoded one at
a time while examples are written (a build does not decode everything up front).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mod_jax.data import features as features_lib
from mod_jax.data.video import VideoError, decode_video

FRAME_FORMATS = ("jpeg", "png")
_EPS = 1e-6  # seconds * fps slack so that t = k / fps maps to frame k despite float error


class BuildWarning(UserWarning):
  """A video or annotation was skipped while building (and counted in the statistics)."""


@dataclasses.dataclass(eq=False)
class StreamConfig(tfds.core.BuilderConfig):
  """How samples are stored. Use :func:`stream_config` to make one (it sets the name).

  Attributes:
    fps: frames per second sampled from the videos (VideoLLM-online: 2).
    image_size: frame side in pixels (letterboxed square; the tower's image size).
    frame_format: ``"jpeg"`` or ``"png"`` (lossless) encoding of stored frames.
    max_frames: frames per sample at most (videollm-online ``max_num_frames`` = 1200).
    features_dir: "" stores frames; else the ``mod-jax encode`` output whose per-video
      features are stored instead (then ``image_size`` / ``frame_format`` are unused).
    jpeg_quality: JPEG quality (1-100).
  """

  fps: float = 2.0
  image_size: int = 384
  frame_format: str = "jpeg"
  max_frames: int = 1200
  features_dir: str = ""
  jpeg_quality: int = 95


def config_name(fps: float, image_size: int, frame_format: str, features: dict | None) -> str:
  """The builder-config name: ``2fps_384px_jpeg``, or ``2fps_features_10x1024`` for features."""
  f = f"{fps:g}".replace(".", "p")
  if features is not None:
    return f"{f}fps_features_{features['tokens_per_frame']}x{features['width']}"
  return f"{f}fps_{image_size}px_{frame_format}"


def stream_config(
  *,
  fps: float = 2.0,
  image_size: int = 384,
  frame_format: str = "jpeg",
  max_frames: int = 1200,
  features_dir: str = "",
) -> StreamConfig:
  """A :class:`StreamConfig` named by :func:`config_name` (plus ``_max{max_frames}`` when not
  1200).

  Raises:
    ValueError: bad fps / size / format / max_frames, or a features folder without a manifest.
  """
  if fps <= 0 or image_size < 1 or max_frames < 1 or frame_format not in FRAME_FORMATS:
    raise ValueError(
      f"fps={fps} (> 0), image_size={image_size} (>= 1), max_frames={max_frames} (>= 1), "
      f"frame_format={frame_format!r} (one of {FRAME_FORMATS})."
    )
  manifest = None
  if features_dir:
    manifest = features_lib.read_manifest(features_dir)
    if float(manifest["fps"]) != float(fps):
      raise ValueError(
        f"--features {features_dir} was encoded at {manifest['fps']} fps but the build uses "
        f"fps={fps}; encode at the build's fps."
      )
  name = config_name(fps, image_size, frame_format, manifest)
  if max_frames != 1200:
    name += f"_max{max_frames}"
  return StreamConfig(
    name=name,
    description=f"samples at {fps:g} fps, <= {max_frames} frames, "
    + (f"features from {features_dir}" if manifest else f"{image_size}px {frame_format} frames"),
    fps=float(fps),
    image_size=int(image_size),
    frame_format=frame_format,
    max_frames=int(max_frames),
    features_dir=os.path.abspath(features_dir) if features_dir else "",
  )


def ceil_frame(t: float, fps: float, num_frames: int | None = None) -> int:
  """Frame index ``ceil(t * fps)`` (>= 0; <= num_frames - 1 when given): videollm-online
  ``data/utils.py::ceil_time_by_fps`` in frame units."""
  k = max(int(math.ceil(t * fps - _EPS)), 0)
  return k if num_frames is None else min(k, num_frames - 1)


def load_json(path: str) -> Any:
  """A JSON file whose invalid UTF-8 bytes become lone surrogates (dropped per entry later).

  Raises:
    FileNotFoundError: missing file. ValueError: not valid JSON (the message names the file).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return json.loads(raw.decode("utf-8", errors="surrogateescape"))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def is_utf8(text: str) -> bool:
  """False for a string holding lone surrogates (invalid bytes or escapes like "\\udce9")."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def list_videos(videos_dir: str) -> dict[str, str]:
  """``{file stem: file name}`` of the files directly in ``videos_dir`` (no decoding)."""
  if not os.path.isdir(videos_dir):
    return {}
  out = {}
  for name in sorted(os.listdir(videos_dir)):
    stem = name.split(".", 1)[0]
    if not name.endswith((".tmp", ".part")) and stem not in out:
      out[stem] = name
  return out


def video_files(videos_dir: str, features_dir: str = "") -> dict[str, str]:
  """``{video id: video file name}``: the files in ``videos_dir``, or with features the videos
  whose features file ``<name>.npy`` is in ``features_dir`` (listings only, nothing decoded)."""
  if not features_dir:
    return list_videos(videos_dir)
  suffix = features_lib.SUFFIX
  names = {k: v for k, v in list_videos(features_dir).items() if v.endswith(suffix)}
  return {k: v[: -len(suffix)] for k, v in names.items() if not v.endswith(".tmp" + suffix)}


def example_features(cfg: StreamConfig) -> tfds.features.FeaturesDict:
  """The tfds schema of one sample (module docstring)."""
  f = tfds.features
  vision: dict[str, Any]
  if cfg.features_dir:
    m = features_lib.read_manifest(cfg.features_dir)
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if m["dtype"] == "bfloat16" else np.float32
    vision = {
      "features": f.Tensor(
        shape=(None, int(m["tokens_per_frame"]), int(m["width"])),
        dtype=dtype,
        encoding=f.Encoding.ZLIB,
      )
    }
  else:
    vision = {"frames": f.Sequence(f.Tensor(shape=(), dtype=np.object_))}
  return f.FeaturesDict(
    {
      "id": f.Text(),
      "video": f.Text(),
      "frame_start": f.Scalar(dtype=np.int32),
      "num_frames": f.Scalar(dtype=np.int32),
      **vision,
      "narration_times": f.Tensor(shape=(None,), dtype=np.float32),
      "narration_texts": f.Sequence(f.Text()),
      "query_times": f.Tensor(shape=(None,), dtype=np.float32),
      "query_texts": f.Sequence(f.Text()),
      "answers": f.Tensor(shape=(None,), dtype=np.int32),
    }
  )


def encode_image(frame: np.ndarray, fmt: str, quality: int = 95) -> bytes:
  """uint8 ``[S, S, 3]`` -> JPEG / PNG bytes (Pillow)."""
  from PIL import Image

  buf = io.BytesIO()
  if fmt == "jpeg":
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  else:
    Image.fromarray(frame).save(buf, format="PNG")
  return buf.getvalue()


def decode_images(images) -> np.ndarray:
  """Encoded frames (bytes) -> uint8 ``[T, S, S, 3]`` RGB (Pillow)."""
  from PIL import Image

  return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


@dataclasses.dataclass
class Sample:
  """One example before its vision part is attached.

  Attributes:
    id: unique id within the split.
    frame_start, frame_stop: frames ``[frame_start, frame_stop)`` of the video at fps.
    narrations: ``(frame relative to frame_start, text)``.
    queries: ``(frame relative to frame_start, text)`` (entering before that frame).
    answers: category indices (COIN benchmarks).
  """

  id: str
  frame_start: int
  frame_stop: int
  narrations: list[tuple[int, str]]
  queries: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  answers: list[int] = dataclasses.field(default_factory=list)


class VideoLoader:
  """Loads one video at a time for a build: decoded frames or its features file.

  ``load(name)`` returns ``(T, vision)``: frames uint8 ``[T, S, S, 3]`` or features
  ``[T, N, d]``; raises :class:`VideoError` for a missing or unusable video.
  """

  def __init__(self, cfg: StreamConfig, videos_dir: str):
    self.cfg, self.videos_dir = cfg, videos_dir
    self.dtype = features_lib.read_manifest(cfg.features_dir)["dtype"] if cfg.features_dir else ""

  def load(self, name: str) -> np.ndarray:
    if self.cfg.features_dir:
      return features_lib.load_features(
        features_lib.features_path(self.cfg.features_dir, name), self.dtype, mmap=False
      )
    return decode_video(os.path.join(self.videos_dir, name), self.cfg.fps, self.cfg.image_size)[0]


class Stats:
  """Build statistics of one split (JSON-able counts; reasons of skipped videos)."""

  def __init__(self):
    self.counts: collections.Counter[str] = collections.Counter()
    self.skipped: list[str] = []

  def skip_video(self, name: str, reason: str, streams: int) -> None:
    self.counts["skipped_videos"] += 1
    self.counts["skipped_samples"] += streams
    self.skipped.append(f"{name}: {reason}")
    warnings.warn(f"skipping video {name}: {reason} (counted)", BuildWarning, stacklevel=3)

  def as_dict(self) -> dict[str, Any]:
    return {**dict(sorted(self.counts.items())), "skipped_paths": self.skipped[:100]}


def write_samples(
  builder: tfds.core.GeneratorBasedBuilder,
  split: str,
  videos_dir: str,
  videos: list[tuple[str, Any]],
  make_samples,
  stats: Stats,
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields the examples of ``split``; records the light index and the statistics.

  Args:
    builder: the builder (its ``builder_config`` and ``info.metadata`` are used).
    split: split name.
    videos_dir: where the video files are (unused with features).
    videos: ``(video file name, payload)`` in order; the payload is the video's annotations.
    make_samples: ``(payload, num_frames, stats) -> list[Sample]`` (counts what it drops).
    stats: this split's statistics (filled here).
  """
  cfg: StreamConfig = builder.builder_config
  loader = VideoLoader(cfg, videos_dir)
  index: list[list[Any]] = []
  fps = cfg.fps
  for name, payload in videos:
    try:
      vision = loader.load(name)
    except VideoError as e:
      stats.skip_video(name, e.reason, len(make_samples(payload, None, Stats())))
      continue
    samples = make_samples(payload, int(vision.shape[0]), stats)
    stats.counts["videos"] += 1
    stats.counts["frames_decoded" if not cfg.features_dir else "feature_frames"] += int(
      vision.shape[0]
    )
    for s in samples:
      part = vision[s.frame_start : s.frame_stop]
      if cfg.features_dir:
        vis = {"features": np.asarray(part)}
      else:
        vis = {"frames": [encode_image(f, cfg.frame_format, cfg.jpeg_quality) for f in part]}
      n = s.frame_stop - s.frame_start
      nt = [k / fps for k, _ in s.narrations]
      qt = [k / fps for k, _ in s.queries]
      stats.counts["samples"] += 1
      stats.counts["sample_frames"] += n
      stats.counts["narrations"] += len(s.narrations)
      index.append(
        [
          s.id,
          n,
          [[t, x] for t, (_, x) in zip(nt, s.narrations)],
          [[t, x] for t, (_, x) in zip(qt, s.queries)],
          list(s.answers),
        ]
      )
      yield (
        s.id,
        {
          "id": s.id,
          "video": name,
          "frame_start": s.frame_start,
          "num_frames": n,
          **vis,
          "narration_times": np.asarray(nt, np.float32),
          "narration_texts": [x for _, x in s.narrations],
          "query_times": np.asarray(qt, np.float32),
          "query_texts": [x for _, x in s.queries],
          "answers": np.asarray(s.answers, np.int32),
        },
      )
  builder.info.metadata.setdefault("index", {})[split] = index
  builder.info.metadata.setdefault("stats", {})[split] = stats.as_dict()
