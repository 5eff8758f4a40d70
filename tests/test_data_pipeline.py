"""The grain pipeline: packed rows respect both caps, segment ids agree, exact resume."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from mod_jax.data import pipeline

N_CHECK = 6  # batches inspected per test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  c = tiny.get_config()
  c.data.dir = str(tmp_path_factory.mktemp("procedural"))
  c.data.max_frames = 5  # < 12 frames per clip: clips are cut into windows
  c.data.max_text = 40
  pipeline.prepare_data(c)
  return c, pipeline.load_tokenizer(c)


def samples_of(batch, n):
  """Rebuilds each packed sample's stream from the slots: {(row, seg): {position: token}}."""
  out = {}
  for r in range(batch["text_tokens"].shape[0]):
    for seg in np.unique(batch["text_segment_ids"][r]):
      if seg == 0:
        continue
      t = batch["text_segment_ids"][r] == seg
      f = batch["frame_segment_ids"][r] == seg
      stream = dict(zip(batch["text_positions"][r][t].tolist(), batch["text_tokens"][r][t]))
      for p in batch["frame_positions"][r][f]:
        for j in range(n):
          assert p + j not in stream, "a position is used twice"
          stream[int(p + j)] = -1  # <v>
      out[(r, int(seg))] = (stream, t, f)
  return out


def check_batch(batch, config, tok):
  _d, n = config.data, config.model.tokens_per_frame
  rows = config.train.batch_size
  spec = pipeline.batch_spec(config, rows)
  assert set(batch) == set(spec)
  for k, (shape, dtype) in spec.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
  for (r, _seg), (stream, t, f) in samples_of(batch, n).items():
    assert f.any() and t.any(), "a sample has both text and frames"
    # The sample's slots tile its stream positions 0..L-1 exactly (no gap, no overlap).
    assert sorted(stream) == list(range(len(stream)))
    assert stream[0] == tok.bos_id
    for p, tgt, w in zip(
      batch["text_positions"][r][t], batch["text_targets"][r][t], batch["text_weights"][r][t]
    ):
      nxt = stream.get(int(p) + 1)
      assert tgt == (nxt if nxt is not None and nxt >= 0 else 0)
      assert w in (0.0, 1.0) and (w == 0 or tgt != 0)
    for p, tgt, w in zip(
      batch["frame_positions"][r][f], batch["frame_targets"][r][f], batch["frame_weights"][r][f]
    ):
      nxt = stream.get(int(p) + n)
      assert tgt in (0, tok.interval_id, tok.stream_close_ids[0])
      if nxt is not None and nxt >= 0:
        assert tgt == nxt and w == 1
      assert (w == 1) == (tgt != 0)
  # Padding: segment 0 slots carry nothing.
  pad_t, pad_f = batch["text_segment_ids"] == 0, batch["frame_segment_ids"] == 0
  assert (batch["text_tokens"][pad_t] == tok.pad_id).all()
  assert not batch["text_weights"][pad_t].any() and not batch["frame_weights"][pad_f].any()
  assert not batch["frames"][pad_f].any()


def test_packed_rows_respect_both_caps_and_agree_on_segments(setup):
  c, tok = setup
  data = pipeline.DataIndex(c, tok)
  ds = pipeline.make_dataset(c, "train", tok, index=data)
  it = iter(ds)
  packed = 0
  for _ in range(N_CHECK):
    b = next(it)
    check_batch(b, c, tok)
    packed += int((b["text_segment_ids"].max(axis=1) > 1).sum())
  assert packed > 0, "several windows share rows"
  stats = data.stats()["train"]
  assert stats["videos"] == c.data.procedural.num_train_videos and stats["skipped_videos"] == 0
  assert stats["windows"] >= 3 * stats["videos"]  # 12 frames per clip, 5 per window
  assert stats["truncated_tokens"] == 0 and stats["bad_annotations_total"] == 0


def test_iterator_state_resumes_exactly(setup, tmp_path):
  c, tok = setup
  it = iter(pipeline.make_dataset(c, "train", tok))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]

  fresh = iter(pipeline.make_dataset(c, "train", tok))
  fresh.set_state(state)
  for a in expected:
    b = next(fresh)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # The same through orbax with grain's checkpoint handler.
  mngr = ocp.CheckpointManager(
    str(tmp_path / "ckpt"), item_names=("data",), options=ocp.CheckpointManagerOptions(create=True)
  )
  it = iter(pipeline.make_dataset(c, "train", tok))
  for _ in range(5):
    next(it)
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  restored = iter(pipeline.make_dataset(c, "train", tok))
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for a in expected:
    b = next(restored)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_order_depends_on_the_seed(setup):
  c, tok = setup
  a = next(iter(pipeline.make_dataset(c, "train", tok)))
  c2 = c.copy_and_resolve_references()
  c2.seed = 7
  b = next(iter(pipeline.make_dataset(c2, "train", tok)))
  assert not np.array_equal(a["text_tokens"], b["text_tokens"])


@pytest.mark.parametrize("pad", ["<pad>", "<eos>"])
def test_eval_is_one_padded_pass_over_every_window(setup, pad):
  c, _ = setup
  c = c.copy_and_resolve_references()
  c.data.tokens.pad = pad  # padding slots carry the pad id, whatever it is
  tok = pipeline.load_tokenizer(c)
  index = pipeline.load_split(c, "eval", tok)
  seen = 0
  batches = list(pipeline.make_dataset(c, "eval", tok))
  for b in batches:
    check_batch(b, c, tok)
    seen += sum(len(np.unique(s[s > 0])) for s in b["text_segment_ids"])
  assert seen == len(index.windows)
  assert all(b["text_tokens"].shape[0] == c.train.batch_size for b in batches)
  rows = sum(int((b["text_segment_ids"] > 0).any(axis=1).sum()) for b in batches)
  assert rows == pipeline._count_packed_rows([w for _, w in index.windows], c)
  again = list(pipeline.make_dataset(c, "eval", tok))
  assert len(again) == len(batches)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["text_tokens"], b["text_tokens"])


@pytest.mark.parametrize("max_frames,batch_size", [(5, 2), (3, 4)])
def test_processes_split_the_windows_and_eval_counts_agree(setup, max_frames, batch_size):
  """With (5, 2) the two processes pack 5 and 6 rows: process 0 gets one all-padding batch."""
  c, tok = setup
  c = c.copy_and_resolve_references()
  c.data.max_frames, c.train.batch_size = max_frames, batch_size
  index = pipeline.load_split(c, "eval", tok)
  counts, seen = [], 0
  for p in range(2):
    batches = list(pipeline.make_dataset(c, "eval", tok, process_index=p, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert b["text_tokens"].shape[0] == c.train.batch_size // 2
      seen += sum(len(np.unique(s[s > 0])) for s in b["text_segment_ids"])
  assert counts[0] == counts[1] and seen == len(index.windows)
  assert counts[0] == -(
    -max(pipeline._count_packed_rows([w for _, w in index.windows[p::2]], c) for p in range(2))
    // (c.train.batch_size // 2)
  )
  b0 = next(iter(pipeline.make_dataset(c, "train", tok, process_index=0, process_count=2)))
  b1 = next(iter(pipeline.make_dataset(c, "train", tok, process_index=1, process_count=2)))
  assert b0["text_tokens"].shape[0] == c.train.batch_size // 2
  assert not np.array_equal(b0["text_tokens"], b1["text_tokens"])
