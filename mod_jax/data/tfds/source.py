"""Reading a built stream dataset in the training pipeline (``data.source="tfds"``).

A split is indexed from the build's ``metadata.json`` (the light part of every example: frame
count, narrations, queries; :mod:`mod_jax.data.tfds.common`), so no image is read up front. The
map step reads one example with ``builder.as_data_source()`` (random access into the array_record
files, opened lazily in each process / grain worker) and decodes only the window's frames.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from mod_jax.config import ConfigDict, ConfigError


@dataclasses.dataclass(frozen=True)
class TfdsRecord:
  """One example of a built split, as the pipeline's index sees it.

  Attributes:
    ref: its index in the split's data source.
    name: its id (``"<video>/<stream>"``).
    num_frames: frames in the example.
    narrations, queries: ``(seconds from the example's first frame, text)``.
    answers: COIN benchmark category indices (empty otherwise).
  """

  ref: int
  name: str
  num_frames: int
  narrations: tuple[tuple[float, str], ...]
  queries: tuple[tuple[float, str], ...]
  answers: tuple[int, ...] = ()


def dataset_dir(config: ConfigDict) -> str:
  """The version folder of ``data.tfds_name`` in ``data.tfds_dir``.

  ``data.tfds_name`` is ``NAME`` or ``NAME/CONFIG``; without a config the one matching
  ``data.fps`` and ``data.input`` (and ``model.vision.image_size`` for frames) is taken.

  Raises:
    ConfigError: unset fields, or no such built dataset (the message lists what is there).
  """
  d, m = config.data, config.model
  if not d.tfds_name or not d.tfds_dir:
    raise ConfigError(
      "data.source='tfds' needs data.tfds_name (ego4d_narration_stream | coin_stream) and "
      "data.tfds_dir (the --data_dir of `mod-jax prepare`)."
    )
  name, _, cfg_name = d.tfds_name.partition("/")
  root = os.path.join(os.path.abspath(os.path.expanduser(d.tfds_dir)), name)
  built = sorted(os.listdir(root)) if os.path.isdir(root) else []
  if not cfg_name:
    from mod_jax.data.tfds.common import config_name

    f = f"{float(d.fps):g}".replace(".", "p")
    if d.input == "features":
      cfg_name = config_name(
        d.fps, 0, "", {"tokens_per_frame": m.tokens_per_frame, "width": m.vision.width}
      )
    else:
      cfg_name = next(
        (c for c in built if c.startswith(f"{f}fps_{m.vision.image_size}px_")),
        f"{f}fps_{m.vision.image_size}px_jpeg",
      )
  cdir = os.path.join(root, cfg_name)
  versions = sorted(v for v in os.listdir(cdir) if v[:1].isdigit()) if os.path.isdir(cdir) else []
  if not versions:
    raise ConfigError(
      f"data.tfds_name={d.tfds_name!r}: no built dataset {cfg_name!r} in {root} (built: "
      f"{built or 'none'}). Build it with `mod-jax prepare --dataset {name} --manual_dir DIR "
      f"--data_dir {d.tfds_dir}` at data.fps / the tower's image size (or --features), or name "
      f"the config: data.tfds_name={name}/CONFIG."
    )
  return os.path.join(cdir, versions[-1])


def eval_split_name(splits: list[str], config: ConfigDict) -> str:
  d = config.data
  if d.tfds_eval_split:
    return d.tfds_eval_split
  for s in ("val", "validation", "test"):
    if s in splits:
      return s
  raise ConfigError(f"no val/test split among {splits}; set data.tfds_eval_split.")


class TfdsReader:
  """Reader of one split's examples (``ref`` = index): the window's frames decoded from JPEG /
  PNG, or its features. Picklable: the data source is opened on first use in each process."""

  def __init__(self, path: str, split: str, key: str):
    self.path, self.split, self.key = path, split, key
    self._source = None

  def __getstate__(self):
    return {"path": self.path, "split": self.split, "key": self.key, "_source": None}

  def source(self):
    if self._source is None:
      import tensorflow_datasets as tfds

      self._source = tfds.builder_from_directory(self.path).as_data_source(split=self.split)
    return self._source

  def __call__(self, ref: int, start: int, stop: int) -> np.ndarray:
    from mod_jax.data.tfds.common import decode_images

    ex = self.source()[int(ref)]
    if self.key == "features":
      return np.asarray(ex["features"][start:stop])
    return decode_images(ex["frames"][start:stop])


def index_split(config: ConfigDict, path: str, split: str) -> tuple[list[TfdsRecord], dict, Any]:
  """Records, source statistics and reader of pipeline split ``split`` ("train" / "eval").

  Raises:
    ConfigError: the build does not match the config (fps, image size, input), or has no such
      split.
  """
  import json

  with open(os.path.join(path, "metadata.json")) as f:
    meta = json.load(f)
  d, m = config.data, config.model
  params = meta.get("params", {})
  want_input = d.get("input", "frames")
  problems = []
  if float(params.get("fps", -1)) != float(d.fps):
    problems.append(f"fps {params.get('fps')} != data.fps {d.fps}")
  if params.get("input") != want_input:
    problems.append(f"input {params.get('input')!r} != data.input {want_input!r}")
  elif want_input == "frames" and params.get("image_size") != m.vision.image_size:
    problems.append(f"image_size {params.get('image_size')} != {m.vision.image_size}")
  elif want_input == "features" and (
    params.get("tokens_per_frame") != m.tokens_per_frame or params.get("width") != m.vision.width
  ):
    problems.append(
      f"features {params.get('tokens_per_frame')}x{params.get('width')} != "
      f"{m.tokens_per_frame}x{m.vision.width}"
    )
  if problems:
    raise ConfigError(f"{path} was built with {params}: {'; '.join(problems)}.")
  index = meta.get("index", {})
  name = d.tfds_train_split if split == "train" else eval_split_name(sorted(index), config)
  if name not in index:
    raise ConfigError(
      f"{path}: no split {name!r} (built: {sorted(index)}); set data.tfds_train_split / "
      f"data.tfds_eval_split."
    )
  records = [
    TfdsRecord(
      ref=i,
      name=e[0],
      num_frames=int(e[1]),
      narrations=tuple((float(t), x) for t, x in e[2]),
      queries=tuple((float(t), x) for t, x in e[3]),
      answers=tuple(int(a) for a in e[4]),
    )
    for i, e in enumerate(index[name])
  ]
  if not records:
    raise RuntimeError(f"{path}: split {name!r} has no example.")
  bstats = meta.get("stats", {}).get(name, {})
  stats = {
    "tfds_split": name,
    "videos": int(bstats.get("videos", 0)),
    "skipped_videos": int(bstats.get("skipped_videos", 0)),
    "skipped_paths": list(bstats.get("skipped_paths", []))[:50],
    "narrations": sum(len(r.narrations) for r in records),
    "queries": sum(len(r.queries) for r in records),
    "build": bstats,
  }
  return (
    records,
    stats,
    TfdsReader(path, name, "features" if want_input == "features" else "frames"),
  )
