"""tensorflow-datasets builders for real data, built and read without TensorFlow.

* :mod:`.ego4d_narration_stream` — Ego4D v2 narrations, one stream per video and annotator pass.
* :mod:`.coin_stream` — COIN procedures as streams, plus the five COIN benchmark sample sets.
* :mod:`.common` — the shared example schema (frames as JPEG/PNG bytes, or pre-extracted
  features), video loading, build statistics.
* :mod:`.source` — the training side: a built dataset's split as the pipeline's records and a
  reader of frames / features (``builder.as_data_source()``).

Both are ``tfds.core.GeneratorBasedBuilder`` with ``MANUAL_DOWNLOAD_INSTRUCTIONS`` (nothing is
downloaded) writing array_record files. ``tfds build`` needs TensorFlow, so datasets are built
with :func:`prepare` (``mod-jax prepare --dataset NAME --manual_dir DIR --data_dir OUT``).
"""

from __future__ import annotations

import os
from typing import Any

DATASETS = ("ego4d_narration_stream", "coin_stream")


def builder_class(name: str):
  """The builder class of dataset ``name``.

  Raises:
    ValueError: unknown name.
  """
  if name == "ego4d_narration_stream":
    from mod_jax.data.tfds.ego4d_narration_stream import Ego4dNarrationStream

    return Ego4dNarrationStream
  if name == "coin_stream":
    from mod_jax.data.tfds.coin_stream import CoinStream

    return CoinStream
  raise ValueError(f"dataset {name!r}; choose one of {DATASETS}.")


def prepare(
  name: str,
  manual_dir: str,
  data_dir: str,
  *,
  features_dir: str = "",
  fps: float = 2.0,
  image_size: int = 384,
  frame_format: str = "jpeg",
  max_frames: int = 1200,
) -> dict[str, Any]:
  """Builds dataset ``name`` from ``manual_dir`` into ``data_dir`` (tfds Python API).

  Args:
    name: ``"ego4d_narration_stream"`` or ``"coin_stream"``.
    manual_dir: the user-downloaded data (each builder's ``MANUAL_DOWNLOAD_INSTRUCTIONS``).
    data_dir: output root; the dataset lands in ``{data_dir}/{name}/{config}/{version}``.
    features_dir: store these pre-extracted features (``mod-jax encode``) instead of frames.
    fps: frames per second sampled (2 in the papers).
    image_size: stored frame side in pixels (the tower's image size; unused with features).
    frame_format: ``"jpeg"`` or ``"png"``.
    max_frames: frames per sample at most (1200 in videollm-online).

  Returns:
    ``{"dataset", "config", "path", "splits": {split: examples}, "stats": {split: counts}}``
    (COIN adds ``"annotation_stats"``: COIN.json's bad entries by reason).

  Raises:
    FileNotFoundError: the annotations are not in ``manual_dir`` (the message says what to
      download and where to put it).
    RuntimeError: a split whose every video was bad (the counts are in the message).
    ValueError: bad parameters or dataset name.
  """
  import tensorflow_datasets as tfds

  from mod_jax.data.tfds import common

  cls = builder_class(name)
  cfg = common.stream_config(
    fps=fps,
    image_size=image_size,
    frame_format=frame_format,
    max_frames=max_frames,
    features_dir=features_dir,
  )
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  known = {c.name for c in cls.BUILDER_CONFIGS}  # tfds refuses a custom config of a known name
  builder = cls(
    data_dir=os.path.abspath(data_dir),
    config=cfg.name if cfg.name in known else cfg,
    file_format="array_record",
  )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except AssertionError as e:
    stats = builder.info.metadata.get("stats", {}) if builder.info.metadata else {}
    raise RuntimeError(
      f"{name}: a split produced no example ({e}); every video in it was bad or had no usable "
      f"annotation. Build statistics so far: {stats}"
    ) from e
  meta = builder.info.metadata
  return {
    "dataset": name,
    "config": cfg.name,
    "path": os.fspath(builder.data_dir),
    "splits": {k: v.num_examples for k, v in builder.info.splits.items()},
    "stats": dict(meta.get("stats", {})),
    **({"annotation_stats": meta["annotation_stats"]} if "annotation_stats" in meta else {}),
  }
