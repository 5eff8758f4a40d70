"""Packing efficiency of context-chunked rows: padding at R = 1, 2, 4 chunks per row.

  python benchmarks/context_packing.py [--config configs/demo.py[:arg]] [--chunks 1,2,4]
      [--split train|eval]

For each R, the split's streams are cut into windows for rows of R context chunks
(``mod_jax/data/packing.py``) and packed in the training order (shuffled with ``config.seed``,
bins shuffled) or, with ``--split eval``, in index order; every row of the pass is counted.
Prints one JSON line per R and policy (``continue``: the pipeline's, a sample continues in the
next chunk; ``cut``: the alternative, streams cut into windows of one chunk's size): ``windows``, ``frames_per_window`` (mean sample length in frames:
how much of a stream one sample sees), ``rows``, ``real_tokens`` (text tokens + frames × N of
all windows), ``padding_fraction`` = 1 − real / (rows × L) with L = T + F·N, the text-slot and
frame-slot padding separately, and ``padding_increase`` against R = 1 (the efficiency loss).
Runs on the CPU in seconds (no model; frames are not decoded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mod_jax.data import pipeline
from mod_jax.data import stream as stream_lib


def load_config(spec: str):
  """``path[:arg]`` → ``get_config(arg)`` of that config file."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def packing_stats(config, tokenizer, split: str, chunks: int, policy: str = "continue") -> dict:
  """Windows and packed rows of one pass over ``split`` with rows of ``chunks`` chunks.

  ``policy="continue"`` is the pipeline's (samples continue across chunks); ``"cut"`` is the
  alternative: streams cut into windows of one chunk (T/R text, F/R frames), packed into
  chunk-sized rows, R of them per row.

  Returns the JSON-able dict described in the module docstring (without ``padding_increase``).
  """
  c = config.copy_and_resolve_references()
  shape = list(c.mesh.shape) + [1] * (len(c.mesh.axes) - len(c.mesh.shape))
  shape[list(c.mesh.axes).index("context")] = chunks
  c.mesh.shape = tuple(shape)
  full_text, full_frames = int(c.data.max_text), int(c.data.max_frames)
  if policy == "cut":
    shape[list(c.mesh.axes).index("context")] = 1
    c.mesh.shape = tuple(shape)
    c.data.max_text, c.data.max_frames = full_text // chunks, full_frames // chunks
  index = pipeline.load_split(c, split, tokenizer)
  windows = [w for _, w in index.windows]
  key = "frames"

  def placeholder(w):
    text = {k: np.zeros(w.num_text, np.int8) for k in stream_lib.TEXT_FEATURES}
    frame = {k: np.zeros(w.num_frames, np.int8) for k in stream_lib.frame_features(key)}
    text["text_positions"], frame["frame_positions"] = w.text_positions, w.frame_positions
    text["text_tokens"] = np.ones(w.num_text, np.int8)  # 1 = a real slot
    frame["frame_targets"] = np.ones(w.num_frames, np.int8)
    return {**text, **frame}

  ds = grain.MapDataset.source(windows)
  if split == "train":
    ds = ds.shuffle(seed=int(c.seed))
  ds = ds.map(placeholder).to_iter_dataset(grain.ReadOptions(num_threads=0))
  n = int(c.model.tokens_per_frame)
  rows = text_real = frame_real = 0
  for row in pipeline._pack(ds, c, 0, shuffle_bins=split == "train"):
    rows += 1
    text_real += int(row["text_tokens"].sum())
    frame_real += int(row["frame_targets"].sum())
  assert text_real == sum(w.num_text for w in windows)
  assert frame_real == sum(w.num_frames for w in windows)
  if policy == "cut":
    rows = -(-rows // chunks)  # R chunk-sized rows make a row
  length = full_text + full_frames * n
  real = text_real + frame_real * n
  return {
    "policy": policy,
    "chunks": chunks,
    "windows": len(windows),
    "frames_per_window": frame_real / len(windows),
    "rows": rows,
    "real_tokens": real,
    "padding_fraction": 1.0 - real / (rows * length),
    "text_slot_padding": 1.0 - text_real / (rows * full_text),
    "frame_slot_padding": 1.0 - frame_real / (rows * full_frames),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--chunks", default="1,2,4")
  p.add_argument("--split", default="train", choices=("train", "eval"))
  args = p.parse_args(argv)
  config = load_config(args.config)
  pipeline.prepare_data(config)
  tok = pipeline.load_tokenizer(config)
  base = None
  for policy in ("continue", "cut"):
    for r in (int(x) for x in args.chunks.split(",")):
      if policy == "cut" and r == 1:
        continue  # the same rows as "continue" at R = 1
      s = packing_stats(config, tok, args.split, r, policy)
      base = s["padding_fraction"] if base is None else base
      s["padding_increase"] = s["padding_fraction"] - base
      print(json.dumps({"config": args.config, "split": args.split, **s}), flush=True)


if __name__ == "__main__":
  main()
