"""Flags of ``mod-jax stream`` and ``mod-jax eval`` (one module, so both commands can be imported
in one process); ``--workdir`` is the shared flag of :mod:`mod_jax.flags`."""

from absl import flags

# Both commands.
STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
THRESHOLD = flags.DEFINE_float(
  "threshold",
  None,
  "Speak when P(interval token) at a frame end is below this (0: argmax "
  "rule only). Default: 0.725 for stream (LIVE demo), 0.0 for eval (videollm-online).",
)
COMPRESS = flags.DEFINE_string(
  "compress",
  None,
  "Training-free peer method applied to the checkpoint: 'fastv:K=2,R=0.5' (FastV) or "
  "'dycoke:K=0.7,P=0.7,L=3' (DyCoke: TTM rate K, KV pruning rate P from layer L; the "
  "KV pruning acts on streaming steps only). Default: none.",
)
OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "Output file. Default: {workdir}/stream/{video name}.jsonl (stream), "
  "{workdir}/stream_eval.json (eval).",
)

# mod-jax stream
VIDEO = flags.DEFINE_string(
  "video",
  None,
  "Video source, decoded incrementally: a file (anything PyAV/ffmpeg reads), '-' (stdin, e.g. a "
  "pipe), a capture device (/dev/video0) or a URL (rtsp://, http://, ...).",
)
FPS = flags.DEFINE_float(
  "fps", None, "Frames per second fed to the model (default: the training config's data.fps, 2)."
)
QUERY = flags.DEFINE_multi_string(
  "query",
  [],
  "User query 'SECONDS:TEXT'; it enters before the first frame at or after SECONDS. Repeatable.",
)
MAX_FRAMES = flags.DEFINE_integer(
  "max_frames",
  None,
  "Window (KV cache) in frames. Default: the training config's data.max_frames, so the model "
  "never attends to more than a training row held (docs/streaming.md).",
)
MAX_TEXT = flags.DEFINE_integer(
  "max_text",
  None,
  "Window in text tokens, the system prompt, one interval token per frame, queries and "
  "responses included. Default: the training config's data.max_text.",
)
REBASE = flags.DEFINE_boolean(
  "rebase",
  True,
  "Re-base RoPE positions to the window so they stay in the trained range "
  "(--norebase: absolute positions that grow with the stream).",
)
REALTIME = flags.DEFINE_boolean(
  "realtime",
  False,
  "Pace to the source clock: wait for a frame's time, skip frames that are already late "
  "(the model slower than real time); reports lag and skipped frames.",
)
ON_FULL = flags.DEFINE_enum(
  "on_full",
  "slide",
  ["slide", "stop"],
  "When the window is full: 'slide' drops the oldest "
  "frames and keeps the system prompt; 'stop' ends the stream there with a message.",
)
PIPELINE = flags.DEFINE_boolean(
  "pipeline",
  False,
  "Encoder || decoder pipelining: a worker thread decodes and encodes frame t+1 (vision tower) "
  "while the decoder handles frame t.",
)
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 100, "Response length limit (tokens).")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy decoding; > 0: sampling.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass when temperature > 0.")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

# mod-jax eval
MAX_SAMPLES = flags.DEFINE_integer("max_samples", None, "Evaluate only the first N windows.")
BENCHMARK = flags.DEFINE_enum(
  "benchmark",
  None,
  ["coin_step", "coin_next", "coin_task", "coin_procedure", "coin_taskprocedure"],
  "Offline COIN benchmark accuracy instead of the streaming metrics (needs a built coin_stream).",
)
BENCHMARK_DIR = flags.DEFINE_string(
  "benchmark_dir", "", "tfds data_dir holding coin_stream (default: the config's data.tfds_dir)."
)
BENCHMARK_SPLIT = flags.DEFINE_string("benchmark_split", "test", "COIN subset: test or train.")

# mod-jax serve
PORT = flags.DEFINE_integer("port", 8000, "mod-jax serve: HTTP port (0: any free port).")
HOST = flags.DEFINE_string("host", "127.0.0.1", "mod-jax serve: address to bind.")
