"""Pre-extracted vision features: one ``[T, N, d_vision]`` array per video, written by
``mod-jax encode`` and read by the data pipeline and the tfds builders instead of decoding video.

VideoLLM-online trains from the frozen SigLIP tower's output stored per video (``[T, 10, 1024]``
bf16 at 2 fps; videollm-online ``data/preprocess/encode.py``, ``data/utils.py::distributed_encode``).
Layout of a features folder (``--out`` of ``mod-jax encode``)::

  manifest.json            {"fps", "image_size", "tokens_per_frame", "width", "dtype", "config"}
  <video relpath>.npy      the tower output of <video relpath> under --videos, one row per frame
                           sampled at fps: [T, N, d_vision]; bfloat16 is stored as its uint16 bits
                           (``.npy`` has no bfloat16), float32 as is
  bad_videos.json          {"<video relpath>": "reason"} of the videos that could not be decoded
                           (bad_videos-{p}-of-{n}.json per host when several hosts encode)

A features file is written to ``<name>.tmp.npy`` and renamed when complete, so an interrupted
encode leaves no partial file that a resumed one would mistake for a finished video.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from mod_jax.data.video import VideoError

MANIFEST = "manifest.json"
BAD_VIDEOS = "bad_videos.json"
SUFFIX = ".npy"
DTYPES = ("bfloat16", "float32")


def features_path(features_dir: str, video_relpath: str) -> str:
  """Where the features of ``video_relpath`` (relative to the encoded videos folder) live."""
  return os.path.join(features_dir, video_relpath + SUFFIX)


def write_features(path: str, features: np.ndarray, dtype: str) -> None:
  """Writes ``features`` [T, N, d] atomically in ``dtype`` ("bfloat16" or "float32").

  Raises:
    ValueError: unknown dtype or not a 3-D array.
  """
  if dtype not in DTYPES or features.ndim != 3:
    raise ValueError(f"write_features: dtype={dtype!r} (one of {DTYPES}), shape {features.shape}.")
  arr = np.asarray(features, np.float32)
  if dtype == "bfloat16":
    arr = arr.astype(ml_dtypes.bfloat16).view(np.uint16)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path[: -len(SUFFIX)] + ".tmp" + SUFFIX
  np.save(tmp, arr)
  os.replace(tmp, path)


def read_manifest(features_dir: str) -> dict[str, Any]:
  """``{features_dir}/manifest.json``.

  Raises:
    FileNotFoundError: no manifest (the folder was not written by ``mod-jax encode``).
  """
  path = os.path.join(features_dir, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: a features folder is written by `mod-jax encode --config X "
      f"--videos DIR --out {features_dir}`."
    )
  with open(path) as f:
    return json.load(f)


def check_manifest(manifest: dict, *, fps: float, tokens_per_frame: int, width: int, where: str):
  """Raises ValueError when the features were encoded at another fps / token count / width."""
  want = {"fps": float(fps), "tokens_per_frame": int(tokens_per_frame), "width": int(width)}
  have = {k: manifest.get(k) for k in want}
  if have != want:
    raise ValueError(
      f"{where}: features were encoded with {have} but the config needs {want} (data.fps, "
      f"model.tokens_per_frame, model.vision.width). Re-run `mod-jax encode` with this config."
    )


def load_features(path: str, dtype: str, mmap: bool = True) -> np.ndarray:
  """The ``[T, N, d]`` features of one video (bfloat16 or float32; memory-mapped by default).

  Raises:
    VideoError: the file is missing or is not a 3-D array (named in the message).
  """
  if not os.path.isfile(path):
    raise VideoError(path, "no features file (encode the video with `mod-jax encode`)")
  try:
    arr = np.load(path, mmap_mode="r" if mmap else None)
  except (OSError, ValueError) as e:
    raise VideoError(path, f"unreadable features file ({type(e).__name__}: {e})") from e
  if arr.ndim != 3 or arr.shape[0] < 1:
    raise VideoError(path, f"features of shape {arr.shape}; expected [T >= 1, N, d]")
  if dtype == "bfloat16":
    return arr.view(ml_dtypes.bfloat16)
  return arr


def num_frames_of(path: str) -> int:
  """T of a features file, from its header only (no data read).

  Raises:
    VideoError: missing or malformed file.
  """
  if not os.path.isfile(path):
    raise VideoError(path, "no features file (encode the video with `mod-jax encode`)")
  try:
    shape = np.load(path, mmap_mode="r").shape  # maps the file: only the header is read
  except (OSError, ValueError) as e:
    raise VideoError(path, f"unreadable features file ({type(e).__name__}: {e})") from e
  if len(shape) != 3 or shape[0] < 1:
    raise VideoError(path, f"features of shape {shape}; expected [T >= 1, N, d]")
  return int(shape[0])


def measure_fn(features_dir: str, split_dir: str, fps: float) -> Callable[[str], tuple[int, float]]:
  """A ``measure`` for :func:`mod_jax.data.sources.folder.index_folder`: a video's frame count
  and duration (T / fps seconds) from its features file under ``features_dir``, keyed by the
  video's path relative to ``os.path.dirname(split_dir)`` (the encoded videos folder is the
  data root, so ``train/clip.mp4`` -> ``{features_dir}/train/clip.mp4.npy``)."""
  root = os.path.dirname(os.path.abspath(split_dir))

  def measure(video_path: str) -> tuple[int, float]:
    t = num_frames_of(features_path(features_dir, os.path.relpath(video_path, root)))
    return t, t / fps

  return measure
