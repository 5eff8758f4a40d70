"""Dense vs MoD training steps, side by side in one process: FLOPs, memory and step time ratios.

Both models are built from the same config (default ``configs/bench_paper.py``: the paper's
proportions at CPU width), the MoD one as configured and the dense one with
``model.mod.insertion="none"``. Each real training step (``mod_jax.train.step.train_step``,
jitted as the train loop does, state donated) is compiled ahead of time; XLA's FLOPs and memory
come from that executable (``mod_jax.analysis.flops``). After warm-up the two steps are timed in
alternating order (dense, MoD, MoD, dense, ...) on the same random batch in the slot layout, and
the medians are compared (``time_ratio``), as is the median of per-round ratios, each MoD step
against the dense step next to it (``time_ratio_paired``, robust to slow drifts in machine
load). The spread (interquartile range) of each side is reported with the medians.

  python benchmarks/mod_vs_dense.py [--config configs/bench_paper.py] [--reps 12] [--warmup 2]
                                   [--probe_overhead]

``--probe_overhead`` adds a third side, the MoD model with r = 1 in the same layers: routing runs
(router, top-k, gather, scatter) but every token is kept, so its time over dense's is the
routing overhead at N tokens per frame (an upper bound for k < N).

The LAST stdout line is one JSON object with ``flops_ratio`` (XLA, MoD/dense), ``memory_ratio``
(compiled step peak bytes, MoD/dense), ``time_ratio`` (median step time, MoD/dense) and details.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from flax import nnx

from mod_jax.analysis import flops
from mod_jax.config import validate
from mod_jax.data import pipeline
from mod_jax.model.factory import build_model
from mod_jax.train.state import TrainState


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A full, well-formed batch: one stream per row, every slot used (no padding).

  Stream order per row: a 4-token prompt, then each frame followed by its interval token, with
  the remaining text slots spread as narrations after evenly spaced frames. Token ids, targets
  and pixels are random; every text and frame-end slot is labelled.
  """
  rng = np.random.default_rng(seed)
  m, d = config.model, config.data
  b, t_cap, f_cap, n = config.train.batch_size, d.max_text, d.max_frames, m.tokens_per_frame
  extra = t_cap - 4 - f_cap
  if extra < 0:
    raise ValueError(
      f"data.max_text={t_cap} must be >= 4 + max_frames={f_cap} (prompt and one "
      f"interval token per frame)."
    )
  text_pos, frame_pos, p = list(range(4)), [], 4
  per_frame = np.diff(np.linspace(0, extra, f_cap + 1).round().astype(int))
  for j in range(f_cap):
    frame_pos.append(p)
    p += n
    for _ in range(1 + per_frame[j]):
      text_pos.append(p)
      p += 1
  row = lambda x: np.broadcast_to(np.asarray(x, np.int32), (b, len(x))).copy()
  return {
    "text_tokens": rng.integers(1, m.vocab_size, (b, t_cap), dtype=np.int32),
    "text_positions": row(text_pos),
    "text_segment_ids": np.ones((b, t_cap), np.int32),
    "text_targets": rng.integers(1, m.vocab_size, (b, t_cap), dtype=np.int32),
    "text_weights": np.ones((b, t_cap), np.float32),
    **vision_input(config, rng),
    "frame_positions": row(frame_pos),
    "frame_segment_ids": np.ones((b, f_cap), np.int32),
    "frame_targets": rng.integers(1, m.vocab_size, (b, f_cap), dtype=np.int32),
    "frame_weights": np.ones((b, f_cap), np.float32),
  }


def vision_input(config, rng) -> dict[str, np.ndarray]:
  """Random ``frames`` (uint8 pixels) or ``features`` (bf16 tower output), per ``data.input``."""
  out = {}
  for key, (shape, dtype) in pipeline.batch_spec(config, config.train.batch_size).items():
    if key == "frames":
      out[key] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif key == "features":
      out[key] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
  return out


class Side:
  """One model: its train state, compiled step and XLA analysis."""

  def __init__(self, config, batch, *, xla_flops: bool = True):
    # Eager init (one device): jitting the init of 32 layers costs minutes of XLA compile on CPU.
    _, graphdef, tx = flops.abstract_train_state(config)
    self.state = TrainState.create(
      nnx.state(build_model(config.model, rngs=config.seed), nnx.Param), tx
    )
    self.step = (
      flops.jit_train_step(config, graphdef, tx, self.state.params)
      .lower(self.state, batch)
      .compile()
    )
    # FLOPs of the unrolled program (compiled separately) or only the step's memory.
    self.xla = (
      flops.xla_step_analysis(config, self.step) if xla_flops else flops.xla_analysis(self.step)
    )
    self.analytic = flops.analytic_flops(config)["total"]
    self.times: list[float] = []

  def run(self, batch) -> float:
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start


def _iqr(xs):
  q = np.percentile(xs, [25, 75])
  return float(q[1] - q[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--config",
    default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench_paper.py"
    ),
  )
  parser.add_argument("--reps", type=int, default=12, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
  parser.add_argument(
    "--probe_overhead",
    action="store_true",
    help="also time the MoD model at r = 1 (routing without savings)",
  )
  args = parser.parse_args()

  config = load_config(args.config)
  validate(config, 1)
  dense_config = flops.dense_counterpart(config)
  batch = jax.device_put(random_batch(config))
  load_start = os.getloadavg()
  t0 = time.perf_counter()
  dense, mod = Side(dense_config, batch), Side(config, batch)
  sides = [dense, mod]
  if args.probe_overhead:
    probe_config = flops.dense_counterpart(config)
    probe_config.model.mod.insertion = config.model.mod.insertion
    probe = Side(probe_config, batch)
    sides.append(probe)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    for side in sides:
      side.run(batch)
  for r in range(args.reps):  # ABBA order: drift in machine load hits all sides alike
    for side in sides if r % 2 == 0 else sides[::-1]:
      side.times.append(side.run(batch))
  med = {name: statistics.median(s.times) for name, s in (("dense", dense), ("mod", mod))}

  m, d = config.model, config.data
  seq = d.max_text + d.max_frames * m.tokens_per_frame
  print(
    f"config {args.config}: {m.n_layers} layers, d_model {m.d_model}, batch "
    f"{config.train.batch_size} x {seq} tokens ({d.max_frames} frames x {m.tokens_per_frame} "
    f"+ {d.max_text} text = {d.max_text / seq:.1%} text), insertion "
    f"{m.mod.insertion!r}, r {m.mod.keep_ratio}, selection {m.mod.selection!r}"
  )
  for name, s in (("dense", dense), ("MoD", mod)):
    print(
      f"{name:6s} step median {med['dense' if name == 'dense' else 'mod'] * 1e3:8.1f} ms "
      f"(IQR {_iqr(s.times) * 1e3:6.1f} ms, {len(s.times)} reps)  XLA "
      f"{s.xla['flops'] / 1e9:7.2f} GFLOP  analytic {s.analytic / 1e9:7.2f} GFLOP  peak "
      f"{s.xla['peak_bytes'] / 2**20:7.1f} MiB (temp {s.xla['temp_bytes'] / 2**20:7.1f})"
    )
  result = {
    "flops_ratio": mod.xla["flops"] / dense.xla["flops"],
    "memory_ratio": mod.xla["peak_bytes"] / dense.xla["peak_bytes"],
    "time_ratio": med["mod"] / med["dense"],
    # Median of the per-round ratios: each MoD step against the dense step next to it in time.
    "time_ratio_paired": statistics.median(a / b for a, b in zip(mod.times, dense.times)),
    "analytic_flops_ratio": mod.analytic / dense.analytic,
    "temp_memory_ratio": mod.xla["temp_bytes"] / dense.xla["temp_bytes"],
    "dense_step_ms": med["dense"] * 1e3,
    "mod_step_ms": med["mod"] * 1e3,
    "dense_iqr_ms": _iqr(dense.times) * 1e3,
    "mod_iqr_ms": _iqr(mod.times) * 1e3,
    "dense_times_ms": [round(x * 1e3, 1) for x in dense.times],
    "mod_times_ms": [round(x * 1e3, 1) for x in mod.times],
    "dense_xla_gflop": dense.xla["flops"] / 1e9,
    "mod_xla_gflop": mod.xla["flops"] / 1e9,
    "dense_peak_mib": dense.xla["peak_bytes"] / 2**20,
    "mod_peak_mib": mod.xla["peak_bytes"] / 2**20,
    "reps": args.reps,
    "warmup": args.warmup,
    "compile_s": compile_s,
    "config": os.path.relpath(args.config),
    "device": jax.devices()[0].device_kind,
    "cpu_count": os.cpu_count(),
    "loadavg_start": load_start,
    "loadavg_end": os.getloadavg(),
  }
  if args.probe_overhead:
    result.update(
      overhead_probe_time_ratio=statistics.median(probe.times) / med["dense"],
      overhead_probe_flops_ratio=probe.xla["flops"] / dense.xla["flops"],
      overhead_probe_times_ms=[round(x * 1e3, 1) for x in probe.times],
    )
    print(
      f"r=1 probe step median {statistics.median(probe.times) * 1e3:8.1f} ms: routing "
      f"overhead at k = N is {result['overhead_probe_time_ratio'] - 1:+.1%} of the dense "
      f"step (XLA FLOPs {result['overhead_probe_flops_ratio'] - 1:+.1%})"
    )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
