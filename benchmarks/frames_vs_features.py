"""Training from frames vs from pre-extracted features, side by side in one process.

  python benchmarks/frames_vs_features.py [--config configs/demo.py] [--reps 12]

Both sides are the same model with a frozen vision tower (as VideoLLM-online trains: the tower
is SigLIP, frozen) and the same batch layout (``benchmarks/mod_vs_dense.py::random_batch``): one
side's batch carries ``frames`` uint8 ``[B, F, S, S, 3]`` and the step runs the tower forward;
the other's carries the tower's output ``features`` bf16 ``[B, F, N, d_vision]``
(``data.input="features"``, what ``mod-jax encode`` stores). Reported: the median step time
(ABBA rounds, the batch already on the device), the host->device bytes of one step's batch, and
the same bytes for one row of the paper's setup (1200 frames of 384 px vs 1200 x 10 x 1024 bf16).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_dtypes
import numpy as np

from benchmarks.mod_vs_dense import Side, load_config, random_batch
from mod_jax.config import validate


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ap.add_argument("--config", default=os.path.join(root, "configs", "demo.py"))
  ap.add_argument("--reps", type=int, default=12)
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args()

  frames_cfg = load_config(args.config)
  frames_cfg.model.vision.trainable = False
  validate(frames_cfg, 1)
  feats_cfg = frames_cfg.copy_and_resolve_references()
  feats_cfg.data.input = "features"
  m, d, b = frames_cfg.model, frames_cfg.data, frames_cfg.train.batch_size
  host_frames = random_batch(frames_cfg)
  host_feats = {k: v for k, v in host_frames.items() if k != "frames"}
  rng = np.random.default_rng(1)
  host_feats["features"] = rng.standard_normal(
    (b, d.max_frames, m.tokens_per_frame, m.vision.width), np.float32
  ).astype(ml_dtypes.bfloat16)
  bytes_frames = sum(v.nbytes for v in host_frames.values())
  bytes_feats = sum(v.nbytes for v in host_feats.values())
  t0 = time.perf_counter()
  batch_f, batch_x = jax.device_put(host_frames), jax.device_put(host_feats)
  sides = {"frames": Side(frames_cfg, batch_f), "features": Side(feats_cfg, batch_x)}
  compile_s = time.perf_counter() - t0
  batches = {"frames": batch_f, "features": batch_x}
  for _ in range(args.warmup):
    for k, s in sides.items():
      s.run(batches[k])
  names = list(sides)
  for r in range(args.reps):
    for k in names if r % 2 == 0 else names[::-1]:
      sides[k].times.append(sides[k].run(batches[k]))
  med = {k: statistics.median(s.times) for k, s in sides.items()}
  paper_frames = 1200 * 384 * 384 * 3
  paper_feats = 1200 * 10 * 1024 * 2
  result = {
    "frames_step_ms": med["frames"] * 1e3,
    "features_step_ms": med["features"] * 1e3,
    "time_ratio": med["features"] / med["frames"],
    "frames_batch_bytes": bytes_frames,
    "features_batch_bytes": bytes_feats,
    "bytes_ratio": bytes_feats / bytes_frames,
    "frames_vision_bytes": int(host_frames["frames"].nbytes),
    "features_vision_bytes": int(host_feats["features"].nbytes),
    "paper_row_frames_bytes": paper_frames,
    "paper_row_features_bytes": paper_feats,
    "paper_bytes_ratio": paper_feats / paper_frames,
    "frames_xla_gflop": sides["frames"].xla["flops"] / 1e9,
    "features_xla_gflop": sides["features"].xla["flops"] / 1e9,
    "reps": args.reps,
    "compile_s": compile_s,
    "config": os.path.relpath(args.config),
    "device": jax.devices()[0].device_kind,
    "loadavg": os.getloadavg(),
  }
  import json

  print(json.dumps(result))


if __name__ == "__main__":
  main()
