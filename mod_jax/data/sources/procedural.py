"""The procedural dataset: rendered clips of coloured shapes with event narrations (docs/design.md §5).

The embedded default dataset, generated on first use, deterministically from
``data.procedural.seed``. Each clip is a plain background on which up to two objects (distinct
shapes and distinct colours) appear, move one grid cell left/right/up/down, change colour and
disappear; some clips also carry a user query ("where is the square") answered at the next
frame ("the square is at the top left"; positions are never narrated otherwise). Narrations say
what happened and when::

  a red circle appears / an orange square appears / the red circle moves left /
  the circle turns blue / the blue circle disappears / the square is in the centre

Events are placed on the ``data.fps`` frame grid at least 2 frames apart (at most one narration
per frame, with silent stretches between); an event's time is jittered on the native frame grid
inside ``((k-1)/fps, k/fps]`` so it is answered after frame ``k`` and is complete in that frame.
Moves are animated over ``min(0.25 s, 0.5 / fps)`` before the event time. The next event's
change starts after frame ``k``, so frame ``k`` shows exactly the narrated state. Colours,
shapes, directions and times are random: the narrations cannot be predicted from text alone.

Layout (exactly what a user gives as a folder, read back through
:mod:`mod_jax.data.sources.folder`)::

  {root}/train/clip_00000.mp4 ...    h264 yuv420p, native_fps, resolution x resolution
  {root}/train/narrations.json       {"clip_00000.mp4": {"narrations": [...], "queries": [...]}}
  {root}/eval/...
  {root}/tokenizer.json              word-level, the generator's full vocabulary
  {root}/procedural.json             the generation parameters

Written atomically (temporary directory, then rename), so an interrupted generation is never
mistaken for a complete one.
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any

import av
import numpy as np

from mod_jax.data.tokenizer import build_word_tokenizer

# Bump when the generator's output changes for the same parameters (invalidates cached data).
GENERATOR_VERSION = 3

COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 190, 60),
  "blue": (50, 90, 235),
  "yellow": (235, 215, 40),
  "purple": (150, 60, 200),
  "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Plain background shades (no colour name refers to them).
BACKGROUNDS = ((16, 16, 16), (48, 48, 48), (80, 80, 80), (24, 28, 40))
GRID = 3  # objects sit on a GRID x GRID lattice of cell centres
MOVE_SECONDS = 0.25  # a move is animated over this long (at most half a data.fps frame)
MAX_OBJECTS = 2
MIN_GAP_FRAMES = 2  # events are at least this many data.fps frames apart
MAX_GAP_FRAMES = 7
QUERY_PROBABILITY = 0.15

# Words of the default system prompt (data.system_prompt) so it encodes without <unk>.
PROMPT_WORDS = ("narrate", "what", "happens", "in", "the", "video", ".")
VOCABULARY = tuple(
  sorted(
    set(COLOURS)
    | set(SHAPES)
    | set(DIRECTIONS)
    | set(PROMPT_WORDS)
    | {"a", "an", "the", "appears", "disappears", "moves", "turns", "is", "where", "at", "in"}
    | {"top", "middle", "bottom", "centre"}
  )
)


@dataclasses.dataclass
class _Object:
  shape: str
  colour: str
  cell: tuple[int, int]  # (column, row) on the GRID lattice


@dataclasses.dataclass
class _Change:
  """A state change at ``time`` seconds (``kind``: appear / disappear / move / turn)."""

  time: float
  kind: str
  shape: str
  colour: str = ""
  cell: tuple[int, int] = (0, 0)  # appear: where; move: destination
  prev_cell: tuple[int, int] = (0, 0)  # move: origin


def params_of(config: Any) -> dict[str, Any]:
  """The generation parameters (``data.procedural`` + ``data.fps``) as a JSON-able dict."""
  p = config.data.procedural
  return {
    "num_train_videos": int(p.num_train_videos),
    "num_eval_videos": int(p.num_eval_videos),
    "seconds": float(p.seconds),
    "native_fps": float(p.native_fps),
    "resolution": int(p.resolution),
    "seed": int(p.seed),
    "fps": float(config.data.fps),
    "generator_version": GENERATOR_VERSION,
  }


def default_dir(params: dict[str, Any]) -> str:
  """``$XDG_CACHE_HOME/mod_jax/procedural-<hash>`` (default ``~/.cache``) for these parameters."""
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "mod_jax", f"procedural-{digest}")


def _cell_centre(cell: tuple[int, int], resolution: int) -> tuple[float, float]:
  step = resolution / GRID
  return ((cell[0] + 0.5) * step, (cell[1] + 0.5) * step)


def _shape_mask(
  shape: str, cx: float, cy: float, radius: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
  """Boolean [H, W] mask of ``shape`` centred at pixel (cx, cy) with half-extent ``radius``."""
  dx, dy = xx + 0.5 - cx, yy + 0.5 - cy  # pixel centres
  if shape == "circle":
    return dx * dx + dy * dy <= radius * radius
  if shape == "square":
    r = radius * 0.85
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= radius * 1.1
  if shape == "triangle":  # apex up, base at the bottom
    h = (dy + radius) / (2 * radius)  # 0 at apex, 1 at base
    return (h >= 0) & (h <= 1) & (np.abs(dx) <= h * radius)
  if shape == "cross":
    w = radius * 0.45
    return ((np.abs(dx) <= w) & (np.abs(dy) <= radius)) | (
      (np.abs(dy) <= w) & (np.abs(dx) <= radius)
    )
  raise ValueError(f"unknown shape {shape!r}")


class _Clip:
  """One clip's script: background, state changes and narrations."""

  def __init__(self, rng: np.random.Generator, *, seconds: float, fps: float, native_fps: float):
    self.background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    self.move_seconds = min(MOVE_SECONDS, 0.5 / fps)
    self.changes: list[_Change] = []
    self.narrations: list[tuple[float, str]] = []
    self.queries: list[tuple[float, str]] = []
    num_frames = int(math.ceil(seconds * fps - 1e-9))
    objects: dict[str, _Object] = {}  # shape -> object
    k = int(rng.integers(1, 5))  # first event frame
    while k < num_frames:
      kind = self._choose(rng, objects)
      if kind == "query":
        shape = sorted(objects)[int(rng.integers(len(objects)))]
        # Asked between frames k-1 and k (enters before frame k), answered after frame k.
        self.queries.append((round((k - 0.5) / fps, 6), f"where is the {shape}"))
        self.narrations.append((round(k / fps, 6), f"the {shape} is {_where(objects[shape].cell)}"))
      else:
        t = self._event_time(rng, k, fps, native_fps)
        self._apply(rng, kind, t, objects)
      k += int(rng.integers(MIN_GAP_FRAMES, MAX_GAP_FRAMES + 1))

  @staticmethod
  def _event_time(rng: np.random.Generator, k: int, fps: float, native_fps: float) -> float:
    """A native-frame time in ``((k-1)/fps, k/fps]`` (``k/fps`` when none exists)."""
    lo, hi = (k - 1) / fps, k / fps
    first = math.floor(lo * native_fps + 1e-9) + 1
    last = math.floor(hi * native_fps + 1e-9)
    if last < first:
      return hi
    return int(rng.integers(first, last + 1)) / native_fps

  @staticmethod
  def _choose(rng: np.random.Generator, objects: dict[str, _Object]) -> str:
    if not objects:
      return "appear"
    kinds, weights = ["move", "turn", "disappear", "query"], [0.35, 0.25, 0.15, QUERY_PROBABILITY]
    if len(objects) < MAX_OBJECTS:
      kinds.append("appear")
      weights.append(0.25)
    if not any(_free_moves(o, objects) for o in objects.values()):
      i = kinds.index("move")
      del kinds[i], weights[i]
    w = np.asarray(weights) / sum(weights)
    return kinds[int(rng.choice(len(kinds), p=w))]

  def _apply(
    self, rng: np.random.Generator, kind: str, t: float, objects: dict[str, _Object]
  ) -> None:
    t = round(t, 6)
    if kind == "appear":
      shape = _pick(rng, [s for s in SHAPES if s not in objects])
      colour = _pick(rng, [c for c in COLOURS if c not in {o.colour for o in objects.values()}])
      taken = {o.cell for o in objects.values()}
      cell = _pick(rng, [(x, y) for y in range(GRID) for x in range(GRID) if (x, y) not in taken])
      objects[shape] = _Object(shape, colour, cell)
      self.changes.append(_Change(t, "appear", shape, colour, cell))
      article = "an" if colour[0] in "aeiou" else "a"
      self.narrations.append((t, f"{article} {colour} {shape} appears"))
    elif kind == "disappear":
      shape = _pick(rng, sorted(objects))
      o = objects.pop(shape)
      self.changes.append(_Change(t, "disappear", shape, o.colour, o.cell))
      self.narrations.append((t, f"the {o.colour} {shape} disappears"))
    elif kind == "turn":
      shape = _pick(rng, sorted(objects))
      o = objects[shape]
      o.colour = _pick(rng, [c for c in COLOURS if c not in {p.colour for p in objects.values()}])
      self.changes.append(_Change(t, "turn", shape, o.colour, o.cell))
      self.narrations.append((t, f"the {shape} turns {o.colour}"))
    elif kind == "move":
      movable = [o for o in (objects[s] for s in sorted(objects)) if _free_moves(o, objects)]
      o = movable[int(rng.integers(len(movable)))]
      direction = _pick(rng, _free_moves(o, objects))
      dx, dy = DIRECTIONS[direction]
      prev, o.cell = o.cell, (o.cell[0] + dx, o.cell[1] + dy)
      self.changes.append(_Change(t, "move", o.shape, o.colour, o.cell, prev))
      self.narrations.append((t, f"the {o.colour} {o.shape} moves {direction}"))
    else:
      raise ValueError(kind)

  def render(self, num_native: int, native_fps: float, resolution: int) -> np.ndarray:
    """uint8 [num_native, R, R, 3]: the clip at native frame times ``n / native_fps``."""
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    radius = resolution / GRID * 0.36
    out = np.empty((num_native, resolution, resolution, 3), np.uint8)
    for n in range(num_native):
      t = n / native_fps + 1e-9
      img = out[n]
      img[...] = self.background
      for shape, colour, (cx, cy) in self._state_at(t, resolution):
        img[_shape_mask(shape, cx, cy, radius, yy, xx)] = COLOURS[colour]
    return out

  def _state_at(self, t: float, resolution: int) -> list[tuple[str, str, tuple[float, float]]]:
    """Visible objects at ``t`` seconds: (shape, colour, centre in pixels), in appearance order."""
    state: dict[str, list[Any]] = {}
    for c in self.changes:
      if c.kind == "move" and c.time - self.move_seconds < t < c.time and c.shape in state:
        a = np.asarray(_cell_centre(c.prev_cell, resolution))
        b = np.asarray(_cell_centre(c.cell, resolution))
        f = (t - (c.time - self.move_seconds)) / self.move_seconds
        state[c.shape][1] = tuple(a + f * (b - a))
        continue
      if c.time > t:
        break
      if c.kind == "appear":
        state[c.shape] = [c.colour, _cell_centre(c.cell, resolution)]
      elif c.kind == "disappear":
        state.pop(c.shape, None)
      elif c.kind == "turn":
        state[c.shape][0] = c.colour
      elif c.kind == "move":
        state[c.shape][1] = _cell_centre(c.cell, resolution)
    return [(s, v[0], v[1]) for s, v in state.items()]


def _where(cell: tuple[int, int]) -> str:
  """Words for a lattice cell: "at the top left", ..., "in the centre" (GRID = 3)."""
  row = ("top", "middle", "bottom")[cell[1]]
  col = ("left", "centre", "right")[cell[0]]
  return "in the centre" if (row, col) == ("middle", "centre") else f"at the {row} {col}"


def _pick(rng: np.random.Generator, options):
  options = list(options)
  return options[int(rng.integers(len(options)))]


def _free_moves(o: _Object, objects: dict[str, _Object]) -> list[str]:
  taken = {p.cell for p in objects.values()}
  out = []
  for name, (dx, dy) in DIRECTIONS.items():
    x, y = o.cell[0] + dx, o.cell[1] + dy
    if 0 <= x < GRID and 0 <= y < GRID and (x, y) not in taken:
      out.append(name)
  return out


def write_mp4(path: str, frames: np.ndarray, native_fps: float) -> None:
  """Encodes uint8 ``[T, H, W, 3]`` RGB frames as h264 yuv420p mp4 at ``native_fps`` (PyAV).

  Single-threaded x264 at high quality (crf 12) so that the output is deterministic and colours
  survive chroma subsampling.
  """
  rate = fractions.Fraction(native_fps).limit_denominator(1001)
  with av.open(path, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.time_base = 1 / rate
    stream.codec_context.thread_count = 1
    stream.options = {"crf": "12", "preset": "veryfast", "threads": "1"}
    for n, img in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      frame.pts = n
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _write_split(split_dir: str, split_id: int, count: int, params: dict[str, Any]) -> None:
  os.makedirs(split_dir)
  seconds, native_fps, fps = params["seconds"], params["native_fps"], params["fps"]
  num_native = int(math.ceil(seconds * native_fps - 1e-9))
  annotations = {}
  for i in range(count):
    rng = np.random.default_rng([params["seed"], split_id, i])
    clip = _Clip(rng, seconds=seconds, fps=fps, native_fps=native_fps)
    name = f"clip_{i:05d}.mp4"
    write_mp4(
      os.path.join(split_dir, name),
      clip.render(num_native, native_fps, params["resolution"]),
      native_fps,
    )
    entry: dict[str, Any] = {
      "narrations": [{"timestamp_sec": t, "narration_text": s} for t, s in clip.narrations]
    }
    if clip.queries:
      entry["queries"] = [{"timestamp_sec": t, "text": s} for t, s in clip.queries]
    annotations[name] = entry
  with open(os.path.join(split_dir, "narrations.json"), "w") as f:
    json.dump(annotations, f, indent=1, sort_keys=True)


def _is_complete(root: str, params: dict[str, Any]) -> bool:
  try:
    with open(os.path.join(root, "procedural.json")) as f:
      return json.load(f) == params
  except (OSError, ValueError):
    return False


def ensure_procedural(config: Any) -> str:
  """Generates the procedural dataset unless it already exists; returns its root directory.

  The root is ``data.dir`` when set, else :func:`default_dir` of the parameters. Generation
  takes a few seconds for the demo's 192 + 24 clips (single process).

  Args:
    config: the full config (reads ``data.procedural``, ``data.fps``, ``data.dir``).

  Returns:
    The root directory (see the module docstring for its layout).

  Raises:
    FileExistsError: ``data.dir`` exists, is not empty and is not this procedural dataset (it is
      never overwritten).
    ValueError: impossible parameters (resolution odd or < 16, non-positive sizes or rates).
  """
  params = params_of(config)
  if params["resolution"] < 16 or params["resolution"] % 2:
    raise ValueError(
      f"data.procedural.resolution={params['resolution']} must be even and >= 16 (h264 yuv420p)."
    )
  if (
    min(params["seconds"], params["native_fps"], params["fps"]) <= 0
    or params["num_train_videos"] < 1
    or params["num_eval_videos"] < 1
  ):
    raise ValueError(
      f"data.procedural: seconds, native_fps, data.fps must be > 0 and video "
      f"counts >= 1; got {params}."
    )
  root = config.data.dir or default_dir(params)
  root = os.path.abspath(os.path.expanduser(root))
  if _is_complete(root, params):
    return root
  if os.path.exists(root) and os.listdir(root):
    try:
      with open(os.path.join(root, "procedural.json")) as f:
        found = f"a procedural dataset made with {json.load(f)}"
    except (OSError, ValueError):
      found = "no procedural.json"
    raise FileExistsError(
      f"data.dir={root!r} exists but is not the procedural dataset for {params} (it has "
      f"{found}); it is never overwritten. Delete it to regenerate, point data.dir at an empty "
      f"or new directory, or set data.source='folder' to read it as a folder dataset."
    )
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
  try:
    _write_split(os.path.join(tmp, "train"), 0, params["num_train_videos"], params)
    _write_split(os.path.join(tmp, "eval"), 1, params["num_eval_videos"], params)
    build_word_tokenizer(VOCABULARY, os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "procedural.json"), "w") as f:
      json.dump(params, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o755)
    try:
      if os.path.isdir(root):
        os.rmdir(root)  # an empty directory the user named; rename needs it gone
      os.rename(tmp, root)
    except OSError:
      # Another process finished first: use its copy if it is complete.
      if not _is_complete(root, params):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root
