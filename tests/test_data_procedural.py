"""The procedural dataset: deterministic, and every narration matches the decoded pixels."""

import json
import math
import os

import numpy as np
import pytest
import scipy.ndimage

from configs import tiny
from mod_jax.data import pipeline
from mod_jax.data.sources import folder, procedural
from mod_jax.data.video import decode_video

PALETTE = {name: np.asarray(rgb, np.float32) for name, rgb in procedural.COLOURS.items()}


def make_config(root, **procedural_overrides):
  c = tiny.get_config()
  c.data.dir = str(root)
  for k, v in procedural_overrides.items():
    c.data.procedural[k] = v
  return c


def colour_masks(frame):
  """{colour: bool [H, W]}: pixels whose nearest reference (palette or background) is it."""
  refs = list(PALETTE.values()) + [np.asarray(b, np.float32) for b in procedural.BACKGROUNDS]
  dist = np.linalg.norm(frame.astype(np.float32)[..., None, :] - np.stack(refs), axis=-1)
  nearest = dist.argmin(-1)
  return {name: nearest == i for i, name in enumerate(PALETTE)}


def blob(mask):
  """The largest connected blob of ``mask`` (drops stray pixels at other objects' edges)."""
  labels, n = scipy.ndimage.label(mask)
  return labels == 1 + np.argmax(scipy.ndimage.sum(mask, labels, range(1, n + 1)))


def shape_of(mask):
  """Names the shape of one object's pixel mask: the best IoU among ideal shapes in its box."""
  ys, xs = np.nonzero(mask)
  box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
  h, w = box.shape
  v, u = np.meshgrid(
    (np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij"
  )  # [-1, 1] box coordinates, v down
  ideal = {
    "square": np.ones_like(u, bool),
    "circle": u * u + v * v <= 1,
    "diamond": np.abs(u) + np.abs(v) <= 1,
    "triangle": np.abs(u) <= (v + 1) / 2,  # apex up
    "cross": (np.abs(u) <= 0.4) | (np.abs(v) <= 0.4),
  }
  iou = {k: (box & m).sum() / (box | m).sum() for k, m in ideal.items()}
  return max(iou, key=iou.get)


def test_generation_is_deterministic(tmp_path):
  a = procedural.ensure_procedural(make_config(tmp_path / "a"))
  b = procedural.ensure_procedural(make_config(tmp_path / "b"))
  for rel in (
    "train/narrations.json",
    "eval/narrations.json",
    "tokenizer.json",
    "train/clip_00003.mp4",
    "eval/clip_00001.mp4",
  ):
    assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read(), rel
  c = procedural.ensure_procedural(make_config(tmp_path / "c", seed=1))
  assert (
    open(os.path.join(a, "train/narrations.json")).read()
    != open(os.path.join(c, "train/narrations.json")).read()
  )
  # An existing complete dataset is reused; a foreign non-empty directory is never overwritten.
  assert procedural.ensure_procedural(make_config(tmp_path / "a")) == a
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not the procedural dataset"):
    procedural.ensure_procedural(make_config(tmp_path / "other"))
  # No temporary directory is left behind.
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "other"]


def test_narrations_match_the_pixels(tmp_path):
  c = make_config(
    tmp_path / "d", num_train_videos=12, num_eval_videos=1, seconds=12.0, resolution=64
  )
  root = procedural.ensure_procedural(c)
  fps = c.data.fps
  split = os.path.join(root, "train")
  annotations = json.load(open(os.path.join(split, "narrations.json")))
  tok = pipeline.load_tokenizer(c)
  checked = {"appears": 0, "disappears": 0, "moves": 0, "turns": 0, "is": 0}
  for name, entry in annotations.items():
    frames, _ = decode_video(os.path.join(split, name), fps, 64)
    masks = [colour_masks(f) for f in frames]
    present = lambda k, colour: masks[k][colour].sum() >= 12  # noqa: B023 (used in-loop)
    narrations = entry["narrations"]
    frames_used = [math.ceil(n["timestamp_sec"] * fps - 1e-6) for n in narrations]
    assert len(set(frames_used)) == len(frames_used), "at most one narration per frame"
    assert frames_used[0] >= 1 and not any(masks[0][c].any() for c in PALETTE), "starts empty"
    for n, k in zip(narrations, frames_used):
      words = n["narration_text"].split()
      assert tok.count_unknown(tok.encode(n["narration_text"])) == 0
      if words[-1] == "appears":  # a(n) <colour> <shape> appears
        colour, shape = words[1], words[2]
        assert present(k, colour) and not present(k - 1, colour)
        assert shape_of(blob(masks[k][colour])) == shape
      elif words[-1] == "disappears":  # the <colour> <shape> disappears
        colour, shape = words[1], words[2]
        assert present(k - 1, colour) and not present(k, colour)
        assert shape_of(blob(masks[k - 1][colour])) == shape
      elif words[-2] == "moves":  # the <colour> <shape> moves <direction>
        colour, shape, direction = words[1], words[2], words[4]
        (y0, x0), (y1, x1) = (np.argwhere(blob(masks[j][colour])).mean(0) for j in (k - 1, k))
        dx, dy = x1 - x0, y1 - y0
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        assert np.sign(round(dx / 10)) == expected[0] and np.sign(round(dy / 10)) == expected[1]
        assert shape_of(blob(masks[k][colour])) == shape
      elif words[-2] == "turns":  # the <shape> turns <colour>
        shape, colour = words[1], words[3]
        assert present(k, colour) and not present(k - 1, colour)
        assert shape_of(blob(masks[k][colour])) == shape
      else:  # the <shape> is at the <row> <col> / in the centre
        assert words[2] == "is"  # (the answer to "where is the <shape>")
        shape = words[1]
        where = " ".join(words[3:])
        objects = [blob(masks[k][c]) for c in PALETTE if present(k, c)]
        (obj,) = [m for m in objects if shape_of(m) == shape]
        y, x = np.argwhere(obj).mean(0)
        row, col = (
          ("top", "middle", "bottom")[int(y // (64 / 3))],
          ("left", "centre", "right")[int(x // (64 / 3))],
        )
        assert where == (
          "in the centre" if (row, col) == ("middle", "centre") else f"at the {row} {col}"
        )
        (q,) = [q for q in entry["queries"] if math.ceil(q["timestamp_sec"] * fps - 1e-6) == k]
        assert q["text"] == f"where is the {shape}"
      checked[
        words[-1] if words[-1] in checked else words[-2] if words[-2] in checked else "is"
      ] += 1
  assert all(v > 0 for v in checked.values()), checked


def test_read_back_through_the_folder_source(tmp_path):
  c = make_config(tmp_path / "e")
  root = pipeline.prepare_data(c)
  records, stats = folder.index_folder(os.path.join(root, "eval"), fps=c.data.fps, size=24)
  assert stats.videos == c.data.procedural.num_eval_videos and stats.skipped_videos == 0
  assert not stats.bad_annotations
  assert all(r.num_frames == 12 for r in records)  # 6 s at 2 fps
  assert pipeline.load_tokenizer(c).vocab_size <= c.model.vocab_size
