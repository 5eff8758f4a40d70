"""Context-chunked row packing (mod_jax/data/packing.py) against independent oracles.

R = 1 gives grain's own first-fit rows; with R = 2 and 4 every row obeys the chunk rule of
``mod_jax/model/rows.py`` (checked slot by slot here, not with the packer's flow), one pass
over a split holds every window exactly once, and the padding the chunks cost is measured.
"""

import importlib.util
import pathlib

import grain
import numpy as np
import pytest

from configs import tiny
from mod_jax.config import ConfigError, context_axis_size
from mod_jax.data import packing, pipeline
from mod_jax.data import stream as stream_lib
from tests.test_data_pipeline import check_batch


def with_chunks(config, r):
  c = config.copy_and_resolve_references()
  c.mesh.shape = (1, 1, 1, r)
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  c = tiny.get_config()
  c.data.dir = str(tmp_path_factory.mktemp("procedural"))
  c.data.max_frames = 8  # 12 frames per clip: every clip is cut into windows
  pipeline.prepare_data(c)
  return c, pipeline.load_tokenizer(c)


def _sample(text_pos, frame_pos, seg):
  """A hand-made sample: text tokens = 100·seg + position, frames = position."""
  text_pos, frame_pos = np.asarray(text_pos, np.int32), np.asarray(frame_pos, np.int32)
  return {
    "text_tokens": 100 * seg + text_pos,
    "text_positions": text_pos,
    "frame_positions": frame_pos,
    "frames": frame_pos[:, None].astype(np.int32),
  }


def _pack_samples(samples, text, frames, chunks, bins=1):
  ds = grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0))
  return list(
    packing.pack_rows(
      ds,
      length_struct={
        "text_tokens": text,
        "text_positions": text,
        "frames": frames,
        "frame_positions": frames,
      },
      groups=(
        (("text_tokens", "text_positions"), "text_positions"),
        (("frames", "frame_positions"), "frame_positions"),
      ),
      chunks=chunks,
      num_packing_bins=bins,
      seed=0,
      shuffle_bins=False,
      padding_struct={
        "text_tokens": -1,
        "text_positions": -1,
        "frames": -1,
        "frame_positions": -1,
      },
    )
  )


def test_worked_example_of_the_module_docstring():
  """R = 2 chunks of 4 text slots and 2 frames, frames of N = 2 positions: A = 2 text, 1 frame,
  1 text; B = 2 text, 2 frames, 2 text. B starts in chunk 0's last text slot, continues in
  chunk 1; A's second frame slot and the last text slot are padding."""
  a = _sample([0, 1, 4], [2], seg=1)
  b = _sample([0, 1, 6, 7], [2, 4], seg=2)
  (row,) = _pack_samples([a, b], text=8, frames=4, chunks=2)
  np.testing.assert_array_equal(row["text_tokens_segment_ids"], [1, 1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(row["text_positions"], [0, 1, 4, 0, 1, 6, 7, -1])
  np.testing.assert_array_equal(row["text_tokens"], [100, 101, 104, 200, 201, 206, 207, -1])
  np.testing.assert_array_equal(row["frames_segment_ids"], [1, 0, 2, 2])
  np.testing.assert_array_equal(row["frame_positions"], [2, -1, 2, 4])
  # With one chunk (8 text, 4 frames) both fit whole: grain's layout, B after A.
  (row1,) = _pack_samples([a, b], text=8, frames=4, chunks=1)
  np.testing.assert_array_equal(row1["text_positions"], [0, 1, 4, 0, 1, 6, 7, -1])
  np.testing.assert_array_equal(row1["frame_positions"], [2, 2, 4, -1])


def test_a_sample_that_cannot_flow_into_the_chunks_is_refused():
  """8 text tokens before 4 frames fill both chunks' text; chunk 1 holds only 2 of the frames."""
  s = _sample(np.arange(8), [8, 10, 12, 14], seg=1)
  with pytest.raises(ValueError, match="does not fit a row of 2 context chunks"):
    _pack_samples([s], text=8, frames=4, chunks=2)
  assert len(_pack_samples([s], text=8, frames=4, chunks=1)) == 1


def test_r1_rows_are_grain_first_fit_rows(setup):
  """The pipeline's packer at R = 1 equals grain.experimental.FirstFitPackIterDataset on the
  same samples (bins shuffled with the seed, several windows per row), field by field."""
  c, tok = setup
  c = c.copy_and_resolve_references()
  c.data.max_frames, c.data.max_text = 5, 40
  index = pipeline.load_split(c, "train", tok)
  samples = [index.example(i) for i in range(len(index.windows))]

  def source():
    return grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0))

  ours = list(pipeline._pack(source(), c, tok.pad_id, shuffle_bins=True))
  padding = {k: 0 for k in pipeline._length_struct(c)}
  padding["text_tokens"] = tok.pad_id
  theirs = list(
    grain.experimental.FirstFitPackIterDataset(
      source(),
      length_struct=pipeline._length_struct(c),
      num_packing_bins=int(c.data.num_packing_bins),
      seed=int(c.seed),
      shuffle_bins=True,
      padding_struct=padding,
    )
  )
  assert len(ours) == len(theirs) > len(samples) // 3
  assert any(np.max(r["text_tokens_segment_ids"]) > 1 for r in ours)  # rows hold several
  for a, b in zip(ours, theirs):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _flows(window, text_cap, frame_cap, chunks):
  """Oracle: pour the window's tokens one by one, in stream order, into the chunks."""
  kinds = sorted(
    [(int(p), 0) for p in window.text_positions] + [(int(p), 1) for p in window.frame_positions]
  )
  chunk, used = 0, [0, 0]
  for _, kind in kinds:
    if used[kind] == (text_cap, frame_cap)[kind]:
      chunk, used = chunk + 1, [0, 0]
    used[kind] += 1
  return chunk < chunks


@pytest.mark.parametrize("chunks", [2, 4])
def test_chunked_rows_keep_every_window_once_in_stream_order(setup, chunks):
  """One eval pass at R chunks: each chunk ends with its padding, a sample's tokens in chunk r
  come before its tokens in chunk r + 1, samples are whole streams (labels as in
  test_data_pipeline), and the samples are the split's windows, each once, pixels included;
  the eval row count computed from the windows alone is the pass's."""
  c, tok = setup
  c = with_chunks(c, chunks)
  n = c.model.tokens_per_frame
  t_cap, f_cap = c.data.max_text // chunks, c.data.max_frames // chunks
  index = pipeline.load_split(c, "eval", tok)
  assert all(_flows(w, t_cap, f_cap, chunks) for _, w in index.windows)
  assert [w.frame_start for _, w in index.windows if w.frame_start == 0]  # streams start
  spans = rows = 0
  found = []
  for batch in pipeline.make_dataset(c, "eval", tok, index=index):
    check_batch(batch, c, tok)
    rows += int(np.sum(batch["text_segment_ids"].max(1) > 0))
    for row in range(batch["text_tokens"].shape[0]):
      text_seg = batch["text_segment_ids"][row].reshape(chunks, t_cap)
      frame_seg = batch["frame_segment_ids"][row].reshape(chunks, f_cap)
      text_pos = batch["text_positions"][row].reshape(chunks, t_cap)
      frame_pos = batch["frame_positions"][row].reshape(chunks, f_cap)
      for seg_c in (*text_seg, *frame_seg):  # padding only at the end of each chunk
        real = seg_c > 0
        assert not np.any(real[1:] & ~real[:-1]), seg_c
      for seg in np.unique(text_seg[text_seg > 0]):
        last = -1
        chunks_of_seg = 0
        for r in range(chunks):
          pos = np.concatenate([text_pos[r][text_seg[r] == seg], frame_pos[r][frame_seg[r] == seg]])
          if len(pos):
            assert pos.min() > last, (row, seg, r)
            last = pos.max()
            chunks_of_seg += 1
        spans += chunks_of_seg > 1
        t = batch["text_segment_ids"][row] == seg
        f = batch["frame_segment_ids"][row] == seg
        found.append(
          (
            tuple(batch["text_tokens"][row][t]),
            tuple(batch["text_positions"][row][t]),
            tuple(batch["frame_positions"][row][f]),
            batch["frames"][row][f].tobytes(),
          )
        )
  assert spans > 0  # some samples do continue across chunks
  # The row count that pads multi-process eval passes (from the windows alone) agrees.
  assert rows == pipeline._count_packed_rows([w for _, w in index.windows], c)
  expected = []
  for i, (_, w) in enumerate(index.windows):
    frames = index.example(i)["frames"]
    expected.append(
      (tuple(w.text_tokens), tuple(w.text_positions), tuple(w.frame_positions), frames.tobytes())
    )
  assert sorted(found) == sorted(expected)
  assert n > 1


def test_render_stream_and_config_errors(setup):
  c, tok = setup
  with pytest.raises(ValueError, match="divisible by the context chunks 3"):
    stream_lib.render_stream(
      tok, num_frames=4, narrations=[], fps=2.0, system_prompt="x", tokens_per_frame=2,
      max_frames=8, max_text=64, chunks=3,
    )  # fmt: skip
  assert context_axis_size(with_chunks(c, 4)) == 4
  c2 = c.copy_and_resolve_references()
  c2.mesh.shape = (2, -1)  # context left out: 1
  assert context_axis_size(c2) == 1
  c2.mesh.shape = (2, 1, 1, -1)
  assert context_axis_size(c2, 8) == 4
  with pytest.raises(ConfigError, match="leaves the context axis to the device count"):
    context_axis_size(c2)


def _packing_benchmark():
  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "context_packing.py"
  spec = importlib.util.spec_from_file_location("context_packing", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_padding_cost_of_context_chunks(setup):
  """benchmarks/context_packing.py on the procedural test split: every real token is packed
  once (the function asserts it), and R = 2 / 4 chunks cost at most 6 points of padding."""
  c, tok = setup
  bench = _packing_benchmark()
  stats = {r: bench.packing_stats(c, tok, "train", r) for r in (1, 2, 4)}
  base = stats[1]["padding_fraction"]
  assert 0 < base < 0.5
  for r in (2, 4):
    assert stats[r]["padding_fraction"] - base <= 0.06, stats[r]
    assert stats[r]["rows"] <= stats[1]["rows"] * 1.1 + 1, stats[r]
