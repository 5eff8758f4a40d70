"""Indexing cost of the Ego4D narration stream at the paper's scale, without decoding anything.

  python benchmarks/data_index.py [--videos 10000] [--narrations_per_pass 40]

Writes a synthetic ``annotations/narration.json`` in the Ego4D v2 format (``--videos`` videos,
two annotator passes each, narrations every ~2.5 s with Ego4D-style ``#C C ...`` texts, a few
one-word ones that the >= 2-word rule drops) and measures the three steps that touch every
annotation, none of which opens a video:

1. **build index** (``mod-jax prepare``'s first step, ``ego4d_narration_stream.index_annotations``):
   parse the JSON, split, clean texts, apply the >= 2-word rule, group by pass;
2. **samples**: ceil to 2 fps, dedupe/replace, 1200-frame clip (``stream_samples``) for every
   stream, with each video's frame count known (as a build knows it);
3. **training index** (every host, at start): render every sample into LIVE windows
   (``mod_jax.data.stream.render_stream``; word tokenizer, 1200 frames + 4096 text slots per
   row as ``configs/videollm_mod_llama3_8b.py``).

Each step is timed (wall seconds); the peak Python allocation of steps 1-2 is measured with
tracemalloc in a separate run, and step 3's memory as the bytes of the arrays the index keeps per
window; ``ru_maxrss_mb`` is the process's peak resident size at the end. Last stdout line: one
JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mod_jax.data import stream as stream_lib
from mod_jax.data.tfds import ego4d_narration_stream as ego
from mod_jax.data.tokenizer import build_word_tokenizer

VERBS = ["picks up", "puts down", "opens", "closes", "cuts", "washes", "holds", "moves", "looks at"]
OBJECTS = ["the cup", "a knife", "the door", "the onion", "a plate", "the tap", "a box", "the pan"]


def write_annotations(root: str, videos: int, per_pass: int) -> tuple[str, int]:
  """The synthetic narration.json; returns (path, narrations written)."""
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  path = os.path.join(root, "annotations", "narration.json")
  n = 0
  with open(path, "w") as f:
    f.write("{")
    for v in range(videos):
      entry = {}
      for p in ego.PASSES:
        items = []
        for i in range(per_pass):
          t = 2.5 * i + (0.3 if p.endswith("2") else 0.0) + (v % 7) * 0.1
          text = "#C C" if i % 17 == 5 else f"#C C {VERBS[(i + v) % 9]} {OBJECTS[(i * 3 + v) % 8]}"
          items.append(
            {
              "timestamp_sec": t,
              "timestamp_frame": int(t * 30),
              "narration_text": text,
              "annotation_uid": f"{v}-{p}",
            }
          )
        n += len(items)
        entry[p] = {"narrations": items, "summaries": []}
      f.write(("," if v else "") + json.dumps(f"{v:08x}-synthetic") + ":" + json.dumps(entry))
    f.write("}")
  return path, n


def steps(root: str, fps: float, video_seconds: float, tokenizer):
  """The three measured steps as closures over shared state."""
  state: dict = {}

  def build_index():
    state["idx"] = ego.index_annotations(root, fps=fps)

  def samples():
    counts: collections.Counter = collections.Counter()
    out = []
    t = int(video_seconds * fps)
    for uid, streams in state["idx"]["splits"]["train"]:
      out += ego.stream_samples(uid, streams, t, fps=fps, max_frames=1200, counts=counts)
    state["samples"] = out

  def training_index():
    windows = []
    for s in state["samples"]:
      ws, _ = stream_lib.render_stream(
        tokenizer,
        num_frames=s.frame_stop - s.frame_start,
        narrations=[(k / fps, x) for k, x in s.narrations],
        fps=fps,
        system_prompt="narrate the video.",
        tokens_per_frame=10,
        max_frames=1200,
        max_text=4096,
      )
      windows += ws
    state["windows"] = windows

  return state, [
    ("build_index", build_index),
    ("samples", samples),
    ("training_index", training_index),
  ]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--videos", type=int, default=10_000)
  ap.add_argument("--narrations_per_pass", type=int, default=40)
  ap.add_argument("--video_seconds", type=float, default=480.0)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as root:
    path, n = write_annotations(root, args.videos, args.narrations_per_pass)
    words = set(re.findall(r"\w+|[^\w\s]+", " ".join(VERBS + OBJECTS) + " C. narrate the video."))
    tok = build_word_tokenizer(words, os.path.join(root, "tokenizer.json"))
    result = {
      "videos": args.videos,
      "narrations": n,
      "annotation_mb": os.path.getsize(path) / 2**20,
      "videos_decoded": 0,
    }
    state, fns = steps(root, 2.0, args.video_seconds, tok)
    for name, fn in fns:  # timed run
      t0 = time.perf_counter()
      fn()
      result[f"{name}_seconds"] = time.perf_counter() - t0
    state2, fns2 = steps(root, 2.0, args.video_seconds, tok)
    for name, fn in fns2[:2]:  # memory run (tracemalloc slows Python down: not timed)
      tracemalloc.start()
      fn()
      result[f"{name}_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
      tracemalloc.stop()
    idx = state["idx"]
    windows = state["windows"]
    result.update(
      streams=len(state["samples"]),
      windows=len(windows),
      # what the index keeps per window: its rendered text and frame-slot arrays
      training_index_arrays_mb=sum(
        sum(
          getattr(w, f).nbytes
          for f in (
            "text_tokens",
            "text_positions",
            "text_targets",
            "text_weights",
            "frame_positions",
            "frame_targets",
            "frame_weights",
          )
        )
        for w in windows
      )
      / 2**20,
      kept_narrations=sum(len(s.narrations) for s in state["samples"]),
      dropped_short=int(idx["counts"]["train"]["short_narration"]),
      ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
