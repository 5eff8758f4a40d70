"""``mod-jax encode --config X --videos DIR --out DIR``: pre-extract vision features.

Runs the config's frozen vision tower (+ pooling to 1 + p^2 tokens) once per video at
``data.fps`` and ``model.vision.image_size`` and writes ``[T, N, d_vision]`` per video
(:mod:`mod_jax.data.encode`): over all local devices, split across hosts, resumable, bad videos
skipped and counted. Prints the counts and the throughput as JSON (last line). Train from them
with ``--config.data.input=features`` and ``--config.data.features_dir=OUT`` (folder sources) or
``mod-jax prepare ... --features OUT`` (tfds).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags

from mod_jax import flags as mj_flags

_VIDEOS = flags.DEFINE_string("videos", None, "Folder of videos (searched recursively).")
_OUT = flags.DEFINE_string("out", None, "Features folder (created; resumed if it exists).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")
_BATCH = flags.DEFINE_integer("batch_frames", 64, "Frames per tower call (all local devices).")
_DISTRIBUTED = flags.DEFINE_bool(
  "encode_distributed", False, "Call jax.distributed.initialize() first (several hosts)."
)


def main(argv):
  config = mj_flags.config_from(argv, "encode", "configs/demo.py")
  if not (_VIDEOS.value and _OUT.value):
    raise app.UsageError("mod-jax encode needs --videos and --out.")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  import jax

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from mod_jax.data.encode import encode_videos

  try:
    out = encode_videos(
      config, _VIDEOS.value, _OUT.value, dtype=_DTYPE.value, batch_frames=_BATCH.value
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"mod-jax encode: error: {e}")
  print(json.dumps(out))
