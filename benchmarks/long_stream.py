"""Long-stream behaviour of a trained checkpoint: does the speak rate hold for half an hour?

  python benchmarks/long_stream.py --workdir CKPT [--minutes 30] [--clips 64]
      [--max_frames F --max_text T] [--norebase]      # the window (default: the training caps)

The stream is the held-out procedural clips of CKPT's config (``mod_jax.data.sources.
procedural``, regenerated from the config's seed when missing) cycled end to end into one mp4 at
the model's fps (``--clips`` clips per cycle, 12 s each: 64 clips recur every 12:48), written once
under ``CKPT/long_stream/`` by a child process and then streamed through ``mod-jax stream``'s
path: incremental PyAV decoding (``iter_frames``), the engine at its defaults (threshold 0.725,
greedy, 100-token responses, the window of the training config, positions re-based), with five
user queries of different lengths inserted. The true narrations of the clips give the truth rate.

Fields of the last stdout line (one JSON object):

* ``minutes``, ``frames``, ``fps`` (frames per wall second over the whole stream), ``fps_first2``,
  ``realtime_factor`` (wall seconds per second of video), ``pipeline`` (``--pipeline``: the vision
  tower encodes frame t+1 in a worker thread while the decoder handles frame t);
* ``speak_per_min_first2`` (responses per minute in the first 2 minutes), ``speak_per_min_late``
  (the same 2 minutes of content at their last recurrence that fits the stream, starting at
  ``late_start_s``), ``speak_rate_ratio`` (late / first 2), ``speak_per_min`` (one value per
  minute), ``truth_per_min`` (true narrations per minute), ``frames_spoken`` (share of frames
  after which the model spoke), ``truncated_responses``;
* ``max_position`` (largest RoPE position fed), ``trained_max_position`` (max_text +
  max_frames·N - 1 of the training config);
* ``compiles_after_warmup`` (XLA compilations after the engine's warm-up), ``queries``;
* ``peak_rss_bytes`` (the streaming process's peak resident memory; the video is written by a
  child process).

Targets (issue 14): speak_rate_ratio <= 1.2, max_position <= trained_max_position,
compiles_after_warmup = 0, peak RSS independent of the stream's length, fps >= 0.9 × fps_first2.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUERIES = (  # five lengths (words of the procedural vocabulary)
  "where",
  "where is the square",
  "where is the red circle",
  "what happens to the blue square in the video",
  "where is the green triangle . where is the circle . what happens",
)
CLIP_SECONDS = 12.0


def _clips(config, count: int) -> tuple[list[str], list[list[float]]]:
  """The first ``count`` held-out clips (paths) and their narration times (seconds)."""
  from mod_jax.data.sources import procedural

  root = procedural.ensure_procedural(config)
  with open(os.path.join(root, "eval", "narrations.json")) as f:
    notes = json.load(f)
  names = sorted(notes)[:count]
  if len(names) < count:
    raise ValueError(f"--clips={count}: the held-out split has only {len(names)} clips.")
  times = [[float(n["timestamp_sec"]) for n in notes[name]["narrations"]] for name in names]
  return [os.path.join(root, "eval", name) for name in names], times


def _write_stream(paths: list[str], minutes: float, fps: float, out: str) -> None:
  """Cycles the clips (decoded at ``fps``, one at a time) into an h264 mp4 of ``minutes``."""
  import fractions

  import av

  from mod_jax.data.video import decode_video

  total = int(round(minutes * 60 * fps))
  tmp = out + ".part"
  rate = fractions.Fraction(fps).limit_denominator(1001)
  with av.open(tmp, mode="w", format="mp4") as container:
    stream = None
    n = 0
    while n < total:
      for path in paths:
        frames, _ = decode_video(path, fps, 64)
        if stream is None:
          stream = container.add_stream("libx264", rate=rate)
          stream.width, stream.height = frames.shape[2], frames.shape[1]
          stream.pix_fmt = "yuv420p"
          stream.time_base = 1 / rate
          stream.options = {"crf": "12", "preset": "veryfast", "threads": "1"}
        for img in frames[: total - n]:
          frame = av.VideoFrame.from_ndarray(img, format="rgb24")
          frame.pts = n
          container.mux(stream.encode(frame))
          n += 1
        if n >= total:
          break
    container.mux(stream.encode(None))
  os.replace(tmp, out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trained checkpoint (mod-jax train workdir)")
  p.add_argument("--minutes", type=float, default=30.0)
  p.add_argument("--clips", type=int, default=64, help="held-out clips per cycle (12 s each)")
  p.add_argument("--max_frames", type=int, default=None, help="window (default: data.max_frames)")
  p.add_argument("--max_text", type=int, default=None, help="window (default: data.max_text)")
  p.add_argument("--norebase", action="store_true", help="absolute RoPE positions")
  p.add_argument("--threshold", type=float, default=0.725)
  p.add_argument(
    "--pipeline", action="store_true", help="encode frame t+1 while the decoder handles frame t"
  )
  a = p.parse_args(argv)

  from mod_jax.convert import pretrained

  config = pretrained.native_config(a.workdir)
  fps = float(config.data.fps)
  paths, times = _clips(config, a.clips)
  cycle = a.clips * CLIP_SECONDS
  video = os.path.join(a.workdir, "long_stream", f"cycled_{a.clips}x_{a.minutes:g}min.mp4")
  if not os.path.exists(video):
    os.makedirs(os.path.dirname(video), exist_ok=True)
    child = multiprocessing.get_context("spawn").Process(
      target=_write_stream, args=(paths, a.minutes, fps, video)
    )
    child.start()
    child.join()
    if child.exitcode:
      raise RuntimeError(f"writing {video} failed (exit code {child.exitcode}).")

  import jax

  from mod_jax.data import pipeline
  from mod_jax.data.video import iter_frames
  from mod_jax.infer import streaming

  config, graphdef, params, step = pretrained.restore_params(a.workdir)
  tokenizer = pipeline.load_tokenizer(config)
  engine = streaming.StreamEngine.create(
    graphdef,
    params,
    config,
    tokenizer,
    max_frames=a.max_frames,
    max_text=a.max_text,
    rebase=not a.norebase,
    threshold=a.threshold,
  )
  session = engine.session
  engine.warmup(encoded=a.pipeline)
  seconds = a.minutes * 60
  query_times = [seconds * (i + 1) / (len(QUERIES) + 1) for i in range(len(QUERIES))]
  for t, q in zip(query_times, QUERIES):
    engine.add_query(t, q)
  print(
    f"streaming {video} ({a.minutes:g} min, cycle {cycle:g} s) through {a.workdir} (step {step}), "
    f"window {session.window[1]} frames + {session.window[0]} text, rebase {session.rebase}, "
    f"backend {jax.default_backend()}",
    flush=True,
  )
  counter = streaming.CompileCounter()
  spoken_at: list[float] = []
  start = time.perf_counter()
  first2_wall = None
  size = int(config.model.vision.image_size)
  source = iter_frames(video, fps, size)
  if a.pipeline:
    items = streaming.encode_ahead(session, source)
  else:
    items = ((t, frame, None) for t, frame in source)
  for t, frame, features in items:
    for turn in engine.push_frame(frame, time_s=t, features=features):
      if turn.role == "assistant":
        spoken_at.append(turn.time)
    if first2_wall is None and engine.frames_seen == int(120 * fps):
      first2_wall = time.perf_counter() - start
    if engine.frames_seen % int(60 * fps) == 0:
      minute = engine.frames_seen / fps / 60
      print(
        f"  {minute:5.1f} min: {len(spoken_at)} responses, max position "
        f"{session.max_position}, {engine.frames_seen / (time.perf_counter() - start):.1f} fps",
        flush=True,
      )
  wall = time.perf_counter() - start
  frames = engine.frames_seen
  minutes = frames / fps / 60

  def rate(t0: float, t1: float) -> float:
    return sum(t0 <= s < t1 for s in spoken_at) / ((t1 - t0) / 60)

  late_start = 0.0
  while late_start + cycle + 120 <= frames / fps:
    late_start += cycle
  truth = sum(
    sum(
      1 for c in range(len(paths)) for x in times[c] if k * cycle + c * CLIP_SECONDS + x < seconds
    )
    for k in range(int(seconds // cycle) + 1)
  )
  first2 = rate(0, 120)
  late = rate(late_start, late_start + 120) if late_start > 0 else None
  result = {
    "minutes": minutes,
    "frames": frames,
    "fps": frames / wall,
    "realtime_factor": wall / (frames / fps),
    "pipeline": a.pipeline,
    "fps_first2": int(120 * fps) / first2_wall if first2_wall else None,
    "speak_per_min_first2": first2,
    "speak_per_min_late": late,
    "late_start_s": late_start if late_start > 0 else None,
    "speak_rate_ratio": late / first2 if late is not None and first2 > 0 else None,
    "speak_per_min": [rate(60 * m, 60 * (m + 1)) for m in range(int(minutes))],
    "truth_per_min": truth / (seconds / 60),
    "frames_spoken": len(spoken_at) / max(frames, 1),
    "responses": len(spoken_at),
    "truncated_responses": engine.truncated_responses,
    "max_position": session.max_position,
    "trained_max_position": int(config.data.max_text)
    + int(config.data.max_frames) * int(config.model.tokens_per_frame)
    - 1,
    "window_frames": session.window[1],
    "window_text": session.window[0],
    "rebase": session.rebase,
    "evicted_chunks": engine.evicted_chunks,
    "compiles_after_warmup": counter.count,
    "queries": len(QUERIES),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "threshold": a.threshold,
    "step": step,
    "backend": jax.default_backend(),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
