"""``mod-jax stream --workdir CKPT --video SOURCE [--fps 2] [--threshold 0.725] [--realtime]``.

Decodes the source incrementally (PyAV: a file, ``-`` for stdin, a capture device or a URL;
``mod_jax.data.video.iter_frames``) at ``fps``, feeds it frame by frame to the model of ``CKPT``
through the streaming engine (``mod_jax.infer.streaming``), prints each response with its video
time as it comes, and writes every turn as a JSON line (``{"role", "time", "frame", "text",
"token_ids", "p_interval", "truncated"}``) to ``--output``. The last stdout line is a JSON summary.
The model attends to a window of the training config's size (``--max_frames`` / ``--max_text``);
when it is full, ``--on_full=slide`` (default) drops the oldest frames and keeps the system
prompt; ``--on_full=stop`` ends the stream there with a message (exit status 0, and
``"stopped": "<reason>"`` in the summary). ``--realtime`` paces to the source clock, skips the
frames the model cannot keep up with, and reports the lag and the skipped frames. ``--pipeline``
encodes frame t+1 (vision tower) in a worker thread while the decoder handles frame t; the summary
reports the real-time factor (processing seconds per second of video). ``--compress
fastv:K=2,R=0.5`` / ``dycoke:K=0.7,P=0.7,L=3`` runs a training-free peer method on the checkpoint
(``mod_jax.compress.apply``; the summary names it in ``"compress"``).
"""

from __future__ import annotations

import itertools
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


class Pacer:
  """Paces a stream to its source clock (``--realtime``).

  The clock starts at the first frame. A frame due at ``t`` seconds waits until then; a frame
  that is already a whole frame interval late when its turn comes is skipped (the model is slower
  than real time), so the stream stays live instead of falling further behind.
  """

  def __init__(self, fps: float, clock=time.perf_counter, sleep=time.sleep):
    self.interval = 1.0 / fps
    self.clock, self.sleep = clock, sleep
    self.start: float | None = None
    self.skipped = 0
    self.lags: list[float] = []

  def admit(self, t: float) -> bool:
    """Whether the frame due at ``t`` seconds is fed (after waiting for it); counts skips/lag."""
    if self.start is None:
      self.start = self.clock() - t
    lag = self.clock() - self.start - t
    if lag >= self.interval:
      self.skipped += 1
      return False
    if lag < 0:
      self.sleep(-lag)
    self.lags.append(max(lag, 0.0))
    return True

  def report(self) -> dict:
    lags = self.lags or [0.0]
    return {
      "skipped_frames": self.skipped,
      "lag_mean_s": sum(lags) / len(lags),
      "lag_max_s": max(lags),
    }


def run_stream(
  workdir: str,
  video,
  *,
  output: str | None = None,
  fps: float | None = None,
  threshold: float = 0.725,
  queries=(),
  max_frames: int | None = None,
  max_text: int | None = None,
  on_full: str = "slide",
  rebase: bool = True,
  realtime: bool = False,
  pipeline: bool = False,
  max_new_tokens: int = 100,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  step: int | None = None,
  progress: bool = True,
  echo=print,
  compress: str | None = None,
) -> dict:
  """Streams ``video`` (a source :func:`~mod_jax.data.video.iter_frames` opens) through the model
  of ``workdir``; returns the summary dict. ``max_frames`` / ``max_text``: the window (default:
  the training config's ``data.max_frames`` / ``data.max_text``).

  ``compress``: a ``--compress`` spec (``mod_jax.compress.apply.parse``) or None.

  Raises:
    VideoError: the video cannot be opened (checked before the model is loaded) or decoded.
    FileNotFoundError: ``workdir`` has no config.json / checkpoint.
    ValueError: a bad ``compress`` spec, or one the checkpoint cannot run.
  """
  import jax
  import tqdm

  from mod_jax.compress import apply
  from mod_jax.convert import pretrained
  from mod_jax.data import pipeline as data_pipeline
  from mod_jax.data.video import iter_frames, probe_video
  from mod_jax.infer import streaming

  compression = apply.parse(compress)  # a bad spec fails before the video and the model load
  config = pretrained.native_config(workdir)
  fps = float(config.data.fps if fps is None else fps)
  frames = iter_frames(video, fps, int(config.model.vision.image_size))
  first = next(frames, None)  # opens the source: a bad one fails before the model loads
  name = video if isinstance(video, str) else getattr(video, "name", "<pipe>")
  total = None
  if isinstance(video, str) and os.path.isfile(video):
    info = probe_video(video)
    total = int(round(info.duration * fps)) or None
  config, graphdef, params, ckpt_step = pretrained.restore_params(workdir, step)
  tokenizer = data_pipeline.load_tokenizer(config)
  engine = streaming.StreamEngine.create(
    graphdef,
    params,
    config,
    tokenizer,
    max_frames=max_frames,
    max_text=max_text,
    on_full=on_full,
    rebase=rebase,
    sampler=streaming.Sampler(temperature, top_p),
    seed=seed,
    fps=fps,
    threshold=threshold,
    max_new_tokens=max_new_tokens,
    compression=compression,
  )
  start = time.perf_counter()
  engine.warmup(encoded=pipeline)  # compile before the clock of the live stream starts
  compile_seconds = time.perf_counter() - start
  for t, q in queries:
    engine.add_query(t, q)
  if output is None:
    stem = os.path.splitext(os.path.basename(name))[0] or "stream"
    output = os.path.join(workdir, "stream", f"{stem}.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  session = engine.session
  echo(
    f"streaming {name} at {fps:g} fps through {workdir} (step {ckpt_step}, threshold "
    f"{threshold:g}, window {session.window[1]} frames + {session.window[0]} text, backend "
    f"{jax.default_backend()})"
  )
  stopped, turns, decoded = None, 0, 0
  pacer = Pacer(fps) if realtime else None
  counter = streaming.CompileCounter()
  start = time.perf_counter()
  bar = tqdm.tqdm(
    total=total, unit="frame", disable=not progress, dynamic_ncols=True, file=sys.stderr
  )
  source = itertools.chain([first] if first is not None else [], frames)
  if pipeline:  # the vision tower on frame t+1 while the decoder handles frame t
    items = streaming.encode_ahead(session, source)
  else:
    items = ((t_s, frame, None) for t_s, frame in source)
  with open(output, "w", encoding="utf-8") as out:
    for t_s, frame, features in items:
      decoded += 1
      bar.update(1)
      if pacer is not None and not pacer.admit(t_s):
        continue
      try:
        new = engine.push_frame(frame, time_s=t_s, features=features)
      except streaming.CacheFull as e:
        stopped = f"at {t_s:.2f}s (frame {engine.frames_seen}): {e}"
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
  bar.close()
  seconds = time.perf_counter() - start
  summary = {
    "video": name,
    "output": output,
    "frames": engine.frames_seen,
    "video_frames": decoded,
    "seconds": seconds,
    "frames_per_second": engine.frames_seen / seconds if seconds > 0 else 0.0,
    "realtime_factor": seconds / (decoded / fps) if decoded else None,
    "pipeline": pipeline,
    "compile_seconds": compile_seconds,
    "compiles_after_warmup": counter.count,
    "responses": engine.responses,
    "truncated_responses": engine.truncated_responses,
    "turns": turns,
    "evicted_chunks": engine.evicted_chunks,
    "max_position": session.max_position,
    "trained_max_position": session.trained_max_position,
    "stopped": stopped,
    "step": ckpt_step,
    "compress": str(compression or "none"),
  }
  if pacer is not None:
    summary.update(pacer.report())
  return summary


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
      rebase=f.REBASE.value,
      realtime=f.REALTIME.value,
      pipeline=f.PIPELINE.value,
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
