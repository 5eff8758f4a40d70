"""``mod-jax serve --workdir CKPT [--port 8000] [--video FILE]``: a local live-narration demo page.

A small standard-library HTTP server (no web framework) around the streaming engine
(``mod_jax.infer.streaming``): the page plays a video and shows the model's narration lines with
their video times as they are produced, and takes typed queries.

Routes:
  ``GET /``                     the page (a source box, a ``<video>`` player, the narration list,
                                a query box); ``?autostart=1`` starts streaming on load,
                                ``&realtime=0`` streams as fast as the model runs
  ``GET /video?src=PATH``       the file's bytes, for the player (regular files only)
  ``GET /events?src=SOURCE``    Server-Sent Events: one ``turn`` event per turn (JSON: role, time,
                                frame, text, ...) as it is produced, then ``done`` (the summary);
                                SOURCE is anything ``iter_frames`` opens (a file, /dev/video0, a
                                URL), paced to the source clock unless ``realtime=0``
  ``POST /query``               ``{"text": "..."}``: a user query, entering before the next frame

One stream runs at a time (a second ``/events`` waits for the first). The server binds
127.0.0.1 by default and reads any path the user names: it is a local demo, not a service.
"""

from __future__ import annotations

import html
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from absl import app
from absl import logging as absl_logging

from mod_jax import flags as mj_flags
from mod_jax.infer import flags as f

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mod-jax live narration</title>
<style>
body { font-family: sans-serif; margin: 1.5em; max-width: 60em; }
#player { width: 24em; background: #000; }
#lines { font-family: monospace; }
.assistant { color: #0a4; } .user { color: #06c; }
</style></head>
<body>
<h1>mod-jax live narration</h1>
<p>Model: <code>__WORKDIR__</code></p>
<p><input id="src" size="60" value="__VIDEO__"> <button id="start">Stream</button>
<span id="status">idle</span></p>
<video id="player" muted playsinline></video>
<form id="ask"><input id="q" size="40" placeholder="ask about the video">
<button>Ask</button></form>
<ol id="lines"></ol>
<script>
const $ = (id) => document.getElementById(id);
const opts = new URLSearchParams(location.search);
$("start").onclick = () => {
  const src = encodeURIComponent($("src").value);
  $("player").src = "/video?src=" + src;
  $("player").play().catch(() => {});
  $("status").textContent = "streaming";
  const pace = opts.get("realtime") === "0" ? "&realtime=0" : "";
  const es = new EventSource("/events?src=" + src + pace);
  es.addEventListener("turn", (e) => {
    const t = JSON.parse(e.data);
    const li = document.createElement("li");
    li.className = "turn " + t.role;
    const who = t.role === "assistant" ? "Assistant" : "User";
    li.textContent = "[" + t.time.toFixed(2) + "s] " + who + ": " + t.text;
    $("lines").appendChild(li);
  });
  es.addEventListener("done", (e) => {
    const s = JSON.parse(e.data);
    $("status").textContent = "done: " + s.frames + " frames, " + s.responses + " responses";
    es.close();
  });
  es.onerror = () => { $("status").textContent = "stream closed"; es.close(); };
};
$("ask").onsubmit = (e) => {
  e.preventDefault();
  fetch("/query", {method: "POST", body: JSON.stringify({text: $("q").value})});
  $("q").value = "";
};
if (opts.get("autostart") === "1") $("start").click();
</script></body></html>
"""


class DemoServer:
  """The engine behind the page: loads ``workdir`` once, compiles, streams one source at a time.

  Args:
    workdir: a trained checkpoint (``mod-jax train`` workdir).
    video: the source the page proposes.
    threshold, max_new_tokens: the engine's (``StreamEngine``).
    step: checkpoint step (default: the latest).
  """

  def __init__(
    self,
    workdir: str,
    *,
    video: str = "",
    threshold: float = 0.725,
    max_new_tokens: int = 100,
    step: int | None = None,
  ):
    from mod_jax.convert import pretrained
    from mod_jax.data import pipeline
    from mod_jax.infer import streaming

    self.workdir, self.video = workdir, video
    config, graphdef, params, self.step = pretrained.restore_params(workdir, step)
    self.size = int(config.model.vision.image_size)
    self.engine = streaming.StreamEngine.create(
      graphdef,
      params,
      config,
      pipeline.load_tokenizer(config),
      threshold=threshold,
      max_new_tokens=max_new_tokens,
    )
    self.engine.warmup()
    self.fps = self.engine.fps
    self._lock = threading.Lock()
    self._queries: list[str] = []
    self._now = 0.0

  def page(self) -> bytes:
    return (
      PAGE.replace("__WORKDIR__", html.escape(self.workdir))
      .replace("__VIDEO__", html.escape(self.video, quote=True))
      .encode()
    )

  def add_query(self, text: str) -> float:
    """Queues a query for the running (or next) stream; returns the video time it enters at."""
    if not text.strip():
      raise ValueError("empty query.")
    self._queries.append(text.strip())
    return self._now

  def stream(self, source: str, emit, *, realtime: bool = True) -> dict:
    """Streams ``source`` from its start, calling ``emit(event, dict)`` for each turn; returns
    (and emits as ``done``) the summary."""
    from mod_jax.data.video import iter_frames
    from mod_jax.infer.stream_main import Pacer

    with self._lock:
      engine = self.engine
      engine.reset()
      pacer = Pacer(self.fps) if realtime else None
      for t, frame in iter_frames(source, self.fps, self.size):
        self._now = t
        if pacer is not None and not pacer.admit(t):
          continue
        while self._queries:
          engine.add_query(t, self._queries.pop(0))
        for turn in engine.push_frame(frame, time_s=t):
          emit("turn", turn.to_json())
      summary = {
        "frames": engine.frames_seen,
        "responses": engine.responses,
        "max_position": engine.session.max_position,
        **(pacer.report() if pacer else {}),
      }
      emit("done", summary)
      return summary


def make_server(demo: DemoServer, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
  """An HTTP server for ``demo`` (routes in the module docstring); ``serve_forever()`` runs it."""

  class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet: the page is the output
      pass

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
      self.send_response(code)
      self.send_header("Content-Type", kind)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):
      url = urllib.parse.urlparse(self.path)
      args = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
      if url.path == "/":
        return self._send(200, demo.page(), "text/html; charset=utf-8")
      if url.path == "/video":
        path = args.get("src", "")
        if not os.path.isfile(path):
          return self._send(404, json.dumps({"error": f"no file {path!r}"}).encode())
        with open(path, "rb") as fh:
          return self._send(200, fh.read(), "video/mp4")
      if url.path == "/events":
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def emit(event: str, data: dict) -> None:
          self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
          self.wfile.flush()

        try:
          demo.stream(args.get("src", demo.video), emit, realtime=args.get("realtime") != "0")
        except Exception as e:  # noqa: BLE001 - reported to the page, the server stays up
          emit("error", {"error": f"{type(e).__name__}: {e}"})
        return None
      return self._send(404, b'{"error": "not found"}')

    def do_POST(self):
      if self.path != "/query":
        return self._send(404, b'{"error": "not found"}')
      body = self.rfile.read(int(self.headers.get("Content-Length", 0)) or 0)
      try:
        at = demo.add_query(json.loads(body or b"{}").get("text", ""))
      except (ValueError, AttributeError) as e:
        return self._send(400, json.dumps({"error": str(e)}).encode())
      return self._send(200, json.dumps({"time": at}).encode())

  return ThreadingHTTPServer((host, port), Handler)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.ERROR)
  if not mj_flags.WORKDIR.value:
    raise app.UsageError("mod-jax serve needs --workdir (a trained model).")
  threshold = 0.725 if f.THRESHOLD.value is None else f.THRESHOLD.value
  try:
    demo = DemoServer(
      mj_flags.WORKDIR.value,
      video=f.VIDEO.value or "",
      threshold=threshold,
      max_new_tokens=f.MAX_NEW_TOKENS.value,
      step=f.STEP.value,
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"mod-jax serve: error: {e}")
  server = make_server(demo, f.HOST.value, f.PORT.value)
  host, port = server.server_address[:2]
  print(f"mod-jax serve: http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
