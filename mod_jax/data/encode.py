"""Pre-extracting vision features: the frozen tower runs once per video (``mod-jax encode``).

VideoLLM-online encodes every video once with its frozen SigLIP tower and trains from the stored
``[T, 1 + p^2, d_vision]`` tokens (videollm-online ``data/preprocess/encode.py``,
``data/utils.py::distributed_encode``; 7.1 TB of Ego4D video -> ~1.1 TB of features). Here:

* **which tower**: the config's ``model.vision`` tower at its step-0 parameters, i.e. the
  pretrained SigLIP of ``model.vision.init_from`` when set (the real use), else the seeded random
  initialisation the training run of the same config starts from (``config.seed``; what the
  tests use: the same frozen tower either way).
* **what**: every video under ``--videos`` (recursively; mp4, mkv, webm, avi, mpg, mov, m4v),
  decoded at ``data.fps`` and letterboxed to ``model.vision.image_size``
  (:func:`mod_jax.data.video.decode_video`, as the training pipeline does), the tower's pooled
  token + p x p average-pooled grid per frame, stored per video as :mod:`mod_jax.data.features`
  describes (bfloat16 by default).
* **where it runs**: the frames of a video are encoded ``batch_frames`` at a time, the batch
  split over all local devices (a 1-D mesh, data parallel); hosts take every
  ``process_count``-th video (``videos[process_index::process_count]``).
* **resume**: a video whose features file exists is not encoded again (files are renamed into
  place when complete), so an interrupted encode continues where it stopped.
* **bad videos** are skipped, counted and listed with their reason in ``bad_videos.json``
  (``bad_videos-{p}-of-{n}.json`` per host on several hosts); a later run retries them.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from mod_jax.data import features as features_lib
from mod_jax.data.video import VideoError, decode_video

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".mov", ".m4v")


def find_videos(videos_dir: str) -> list[str]:
  """Video files under ``videos_dir`` (recursive), as sorted relative paths (no decoding)."""
  out = []
  for dirpath, _, files in os.walk(videos_dir):
    for name in files:
      if name.lower().endswith(VIDEO_EXTENSIONS):
        out.append(os.path.relpath(os.path.join(dirpath, name), videos_dir))
  return sorted(out)


def build_tower(config):
  """The config's vision tower at step 0 and its parameters.

  Built alone with the same ``nnx.Rngs(params=config.seed)`` the full model uses (the tower is
  the model's first submodule, so it draws the same keys), then ``model.vision.init_from`` loaded.

  Returns:
    ``(graphdef, params)`` of a :class:`mod_jax.model.vision.VisionEncoder`.
  """
  from mod_jax.model.vision import VisionEncoder

  m = config.model
  vision_cfg = m.vision.copy_and_resolve_references()
  with vision_cfg.unlocked():  # as VideoLLM builds it: one kernel choice for the whole model
    vision_cfg.attention = m.get("attention", "xla")
    vision_cfg.attention_block_size = m.get("attention_block_size", 512)
    vision_cfg.attention_platform = m.get("attention_platform", "")
  tower = VisionEncoder(vision_cfg, rngs=nnx.Rngs(params=int(config.seed)))
  graphdef, params = nnx.split(tower, nnx.Param)
  if m.vision.get("init_from"):
    from mod_jax.convert import pretrained

    pretrained.check_vision(m.vision, m.vision.init_from)
    pretrained.load_vision(params, m.vision, m.vision.init_from)
  return graphdef, params


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tokens(params, frames, *, graphdef):
  return nnx.merge(graphdef, params).tokens(frames).astype(jnp.float32)


def encode_videos(
  config,
  videos_dir: str,
  out_dir: str,
  *,
  dtype: str = "bfloat16",
  batch_frames: int = 64,
  process_index: int | None = None,
  process_count: int | None = None,
  progress: bool = True,
  max_videos: int | None = None,
) -> dict[str, Any]:
  """Encodes this host's share of the videos under ``videos_dir`` into ``out_dir``.

  Args:
    config: full config (``data.fps``, ``model.vision``, ``model.tokens_per_frame``, ``seed``).
    videos_dir: folder of videos (searched recursively).
    out_dir: features folder (:mod:`mod_jax.data.features` layout); created if needed.
    dtype: stored dtype, ``"bfloat16"`` (VideoLLM-online) or ``"float32"``.
    batch_frames: frames per tower call, rounded up to a multiple of the local device count.
    process_index, process_count: this host's share (default ``jax.process_index()`` /
      ``jax.process_count()``).
    progress: show a tqdm bar.
    max_videos: stop after encoding this many videos (an interruption, for tests).

  Returns:
    ``{"videos" (this host's), "encoded", "already_done", "bad_videos", "bad" {path: reason},
    "frames", "seconds", "compile_seconds" (the tower's one batch shape, before the loop),
    "decode_seconds" (of "seconds"), "frames_per_second" (encoded frames / "seconds":
    decoding included, compilation not)}``.

  Raises:
    ValueError: bad dtype, or ``out_dir`` holds features of another fps / tower shape.
    FileNotFoundError: ``videos_dir`` does not exist.
  """
  if dtype not in features_lib.DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {features_lib.DTYPES}.")
  if not os.path.isdir(videos_dir):
    raise FileNotFoundError(f"--videos {videos_dir} is not a folder.")
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  d, m = config.data, config.model
  manifest = {
    "fps": float(d.fps),
    "image_size": int(m.vision.image_size),
    "tokens_per_frame": int(m.tokens_per_frame),
    "width": int(m.vision.width),
    "dtype": dtype,
    "tower_init": m.vision.get("init_from") or f"seed {int(config.seed)}",
  }
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, features_lib.MANIFEST)
  if os.path.isfile(path):
    old = features_lib.read_manifest(out_dir)
    if old != manifest:
      raise ValueError(
        f"{out_dir} holds features made with {old}; this encode would make {manifest}. Use "
        f"another --out folder."
      )
  elif pi == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)

  videos = find_videos(videos_dir)[pi::pc]
  graphdef, params = build_tower(config)
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("frames",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("frames"))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  n_dev = len(devices)
  chunk = -(-max(1, int(batch_frames)) // n_dev) * n_dev
  size = int(m.vision.image_size)
  stats: dict[str, Any] = {"videos": len(videos), "encoded": 0, "already_done": 0, "frames": 0}
  bad: dict[str, str] = {}
  t0 = time.perf_counter()  # compile the one batch shape first, so throughput excludes it
  zeros = np.zeros((chunk, size, size, 3), np.uint8)
  jax.block_until_ready(_tokens(params, jax.device_put(zeros, shard), graphdef=graphdef))
  compile_seconds = time.perf_counter() - t0
  decode_seconds = 0.0
  start = time.perf_counter()
  for rel in tqdm.tqdm(videos, desc=f"encode {videos_dir}", disable=not progress):
    out = features_lib.features_path(out_dir, rel)
    if os.path.isfile(out):
      stats["already_done"] += 1
      continue
    if max_videos is not None and stats["encoded"] >= max_videos:
      break
    t0 = time.perf_counter()
    try:
      frames = decode_video(os.path.join(videos_dir, rel), float(d.fps), size)[0]
    except VideoError as e:
      bad[rel] = e.reason
      continue
    finally:
      decode_seconds += time.perf_counter() - t0
    parts = []
    for i in range(0, len(frames), chunk):
      x = frames[i : i + chunk]
      n = len(x)
      if n < chunk:  # one compiled shape: pad the last batch
        x = np.concatenate([x, np.zeros((chunk - n, *x.shape[1:]), x.dtype)])
      y = _tokens(params, jax.device_put(x, shard), graphdef=graphdef)
      parts.append(np.asarray(jax.device_get(y))[:n])
    features_lib.write_features(out, np.concatenate(parts), dtype)
    stats["encoded"] += 1
    stats["frames"] += len(frames)
  seconds = time.perf_counter() - start
  if bad:
    name = features_lib.BAD_VIDEOS if pc == 1 else f"bad_videos-{pi}-of-{pc}.json"
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(bad, f, indent=2)
  return {
    **stats,
    "bad_videos": len(bad),
    "bad": bad,
    "seconds": seconds,
    "compile_seconds": compile_seconds,
    "decode_seconds": decode_seconds,
    "frames_per_second": stats["frames"] / seconds if seconds > 0 else 0.0,
  }
