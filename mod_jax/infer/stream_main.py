"""``mod-jax stream --workdir CKPT --video FILE [--fps 2] [--threshold 0.725] [--compress SPEC]``:
live narration (``--compress``: a training-free peer method, as ``mod-jax eval``).

Decodes the video (PyAV) at ``fps``, feeds it frame by frame to the model of ``CKPT`` through the
streaming engine (``mod_jax.infer.streaming``), prints each response with its video time as it
comes, and writes every turn as a JSON line (``{"role", "time", "frame", "text", "token_ids",
"p_interval", "truncated"}``) to ``--output``. The last stdout line is a JSON summary.
When the KV cache is full, ``--on_full=slide`` (default) drops the oldest frames and keeps the
system prompt; ``--on_full=stop`` ends the stream there with a message (exit status 0, and
``"stopped": "<reason>"`` in the summary).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import logging as absl_logging

from mod_jax import flags as mj_flags
from mod_jax.infer import flags as f


def parse_query(text: str) -> tuple[float, str]:
  """``'SECONDS:TEXT'`` -> (seconds, text). Raises ValueError naming the bad value."""
  head, sep, body = text.partition(":")
  try:
    seconds = float(head)
  except ValueError:
    seconds = None
  if not sep or seconds is None or seconds < 0 or not body.strip():
    raise ValueError(
      f"--query={text!r}: expected 'SECONDS:TEXT' with SECONDS >= 0, e.g. "
      f"--query='4.5:where is the red circle?'."
    )
  return seconds, body.strip()


def run_stream(
  workdir: str,
  video: str,
  *,
  output: str | None = None,
  fps: float | None = None,
  threshold: float = 0.725,
  queries=(),
  max_frames: int = 1200,
  max_text: int = 4096,
  on_full: str = "slide",
  max_new_tokens: int = 100,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  step: int | None = None,
  progress: bool = True,
  echo=print,
  compress: str | None = None,
) -> dict:
  """Streams ``video`` through the model of ``workdir``; returns the summary dict.

  Raises:
    VideoError: the video cannot be decoded (checked before the model is loaded).
    FileNotFoundError: ``workdir`` has no config.json / checkpoint.
  """
  import jax
  import tqdm

  from mod_jax.compress import apply
  from mod_jax.data import pipeline
  from mod_jax.data.video import decode_video
  from mod_jax.infer import streaming
  from mod_jax.train import checkpoint

  compression = apply.parse(compress)
  config = checkpoint.load_config(workdir)
  fps = float(config.data.fps if fps is None else fps)
  frames, times = decode_video(video, fps, int(config.model.vision.image_size))
  config, graphdef, params, ckpt_step = checkpoint.restore_params(workdir, step)
  tokenizer = pipeline.load_tokenizer(config)
  engine = streaming.StreamEngine.create(
    graphdef,
    params,
    config,
    tokenizer,
    max_frames=max_frames,
    max_text=max_text,
    on_full=on_full,
    sampler=streaming.Sampler(temperature, top_p),
    seed=seed,
    fps=fps,
    threshold=threshold,
    max_new_tokens=max_new_tokens,
    compression=compression,
  )
  start = time.perf_counter()
  engine.warmup()  # compile before the clock of the live stream starts
  compile_seconds = time.perf_counter() - start
  for t, q in queries:
    engine.add_query(t, q)
  if output is None:
    stem = os.path.splitext(os.path.basename(video))[0]
    output = os.path.join(workdir, "stream", f"{stem}.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  echo(
    f"streaming {video}: {len(frames)} frames at {fps:g} fps through {workdir} "
    f"(step {ckpt_step}, threshold {threshold:g}, backend {jax.default_backend()})"
  )
  stopped, turns = None, 0
  start = time.perf_counter()
  bar = tqdm.tqdm(
    total=len(frames), unit="frame", disable=not progress, dynamic_ncols=True, file=sys.stderr
  )
  with open(output, "w", encoding="utf-8") as out:
    for i, frame in enumerate(frames):
      try:
        new = engine.push_frame(frame)
      except streaming.CacheFull as e:
        stopped = f"at frame {i} ({times[i]:.2f}s): {e}"
        tqdm.tqdm.write(f"stopped {stopped}", file=sys.stderr)
        break
      for turn in new:
        label = "Assistant" if turn.role == "assistant" else "User"
        line = f"[{turn.time:7.2f}s] {label}: {turn.text}"
        if progress:
          tqdm.tqdm.write(line)
        else:
          echo(line)
        out.write(json.dumps(turn.to_json()) + "\n")
        out.flush()
        turns += 1
      bar.update(1)
  bar.close()
  seconds = time.perf_counter() - start
  return {
    "video": video,
    "output": output,
    "frames": engine.frames_seen,
    "video_frames": len(frames),
    "seconds": seconds,
    "frames_per_second": engine.frames_seen / seconds if seconds > 0 else 0.0,
    "compile_seconds": compile_seconds,
    "responses": engine.responses,
    "truncated_responses": engine.truncated_responses,
    "turns": turns,
    "evicted_chunks": engine.evicted_chunks,
    "stopped": stopped,
    "step": ckpt_step,
    "compress": str(compression or "none"),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only checkpoint notices
  if not mj_flags.WORKDIR.value or not f.VIDEO.value:
    raise app.UsageError("mod-jax stream needs --workdir (a trained model) and --video.")
  try:
    queries = [parse_query(q) for q in f.QUERY.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from mod_jax.data.video import VideoError

  threshold = 0.725 if f.THRESHOLD.value is None else f.THRESHOLD.value
  try:
    summary = run_stream(
      mj_flags.WORKDIR.value,
      f.VIDEO.value,
      output=f.OUTPUT.value,
      fps=f.FPS.value,
      threshold=threshold,
      queries=queries,
      max_frames=f.MAX_FRAMES.value,
      max_text=f.MAX_TEXT.value,
      on_full=f.ON_FULL.value,
      max_new_tokens=f.MAX_NEW_TOKENS.value,
      temperature=f.TEMPERATURE.value,
      top_p=f.TOP_P.value,
      seed=f.SEED.value,
      step=f.STEP.value,
      compress=f.COMPRESS.value,
    )
  except (VideoError, FileNotFoundError, ValueError) as e:
    sys.exit(f"mod-jax stream: error: {e}")
  print(json.dumps(summary))
