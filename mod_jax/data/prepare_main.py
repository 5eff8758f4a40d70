"""``mod-jax prepare --dataset NAME --manual_dir DIR --data_dir OUT [--features FEATURES_DIR]``.

Builds a tensorflow-datasets stream dataset (:mod:`mod_jax.data.tfds`) from user-downloaded
data, through the tfds Python API (``tfds build`` needs TensorFlow). Frames are sampled at the
``--config``'s ``data.fps`` and stored at its ``model.vision.image_size`` (defaults: 2 fps,
384 px, as VideoLLM-online's SigLIP-L/16@384), or with ``--features`` the pre-extracted features
of ``mod-jax encode`` are stored instead. Prints the build statistics as JSON (last line):
examples per split, videos used and skipped (with reasons), annotations dropped by rule.
Train on it with ``--config.data.source=tfds --config.data.tfds_name=NAME
--config.data.tfds_dir=OUT``.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags

from mod_jax import flags as mj_flags

_DATASET = flags.DEFINE_enum(
  "dataset", None, ["ego4d_narration_stream", "coin_stream"], "Dataset to build."
)
_MANUAL_DIR = flags.DEFINE_string(
  "manual_dir", None, "The downloaded data (see the builder's manual download instructions)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output root of the built dataset.")
_FEATURES = flags.DEFINE_string(
  "features", "", "Store these pre-extracted features (mod-jax encode --out) instead of frames."
)
_FRAME_FORMAT = flags.DEFINE_enum("frame_format", "jpeg", ["jpeg", "png"], "Stored frames.")
_MAX_FRAMES = flags.DEFINE_integer(  # not --max_frames: that is `mod-jax stream`'s cache size
  "max_sample_frames", 1200, "Frames per sample at most (videollm-online: 1200)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not (_DATASET.value and _MANUAL_DIR.value and _DATA_DIR.value):
    raise app.UsageError("mod-jax prepare needs --dataset, --manual_dir and --data_dir.")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  from mod_jax.data import tfds as mj_tfds

  config = mj_flags.CONFIG.value
  fps = float(config.data.fps) if config is not None else 2.0
  size = int(config.model.vision.image_size) if config is not None else 384
  try:
    out = mj_tfds.prepare(
      _DATASET.value,
      _MANUAL_DIR.value,
      _DATA_DIR.value,
      features_dir=_FEATURES.value,
      fps=fps,
      image_size=size,
      frame_format=_FRAME_FORMAT.value,
      max_frames=_MAX_FRAMES.value,
    )
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    sys.exit(f"mod-jax prepare: error: {e}")
  print(json.dumps(out))
