"""The grain input pipeline: indexed streams -> decoded windows -> packed rows -> batches.

::

  index (validate videos, render text windows)      once per process, cached
  -> MapDataset.source(windows)[process_index::process_count]
  -> shuffle(seed, reshuffled every epoch) -> repeat()            (train only)
  -> map(attach decoded frames)                    in-memory LRU cache of clips
  -> to_iter_dataset (threads) [-> mp_prefetch(worker_count)]
  -> FirstFitPackIterDataset(text: T_cap, frames: F_cap)           several windows per row
  -> map(check + rename segment ids) -> batch(rows)

A row has exactly ``T_cap = data.max_text`` text slots and ``F_cap = data.max_frames`` frame slots
(SPEC §1.2, the slot layout in :mod:`mod_jax.config`); the fields of a batch of ``B`` rows are

  ==================== ======= ====================== =========================================
  text_tokens          int32   [B, T_cap]             pad id in padding
  text_positions       int32   [B, T_cap]             stream position (0-based, per sample)
  text_targets         int32   [B, T_cap]             next token if text, else 0
  text_weights         float32 [B, T_cap]             1 where the target is in "Assistant: ...<eos>"
  text_segment_ids     int32   [B, T_cap]             1.. per packed sample, 0 = padding
  frames               uint8   [B, F_cap, S, S, 3]    S = model.vision.image_size, RGB (or
                                                      ``features`` [B, F_cap, N, w] bf16 with
                                                      data.input="features"; batch_spec only)
  frame_positions      int32   [B, F_cap]             position of the frame's first <v>
  frame_targets        int32   [B, F_cap]             interval id / ']\\n' first id / 0
  frame_weights        float32 [B, F_cap]             1 where the target is defined
  frame_segment_ids    int32   [B, F_cap]             same id as the sample's text slots
  ==================== ======= ====================== =========================================

(:mod:`mod_jax.data.stream` defines the values.) A frame's N vision tokens are at positions
``frame_positions .. frame_positions + N - 1``. Positions restart at 0 in every packed sample.

The text of every window is rendered at index time (so windowing, truncation and all counts are
known before training, see :func:`data_stats`); the map step only attaches pixels. Every process
indexes (and so validates) the whole split, so that all processes agree on the window list they
slice (on a large folder this repeats the validating decode on every host: no validation
index is stored yet).
Decoded clips are kept in a per-process LRU cache of ``data.cache_mb`` MiB (the demo's 216 clips
at 48 px are ~36 MiB); larger data decodes each window's video when it is needed.
``data.worker_count > 0`` decodes in grain worker processes (``mp_prefetch``; each worker has its
own cache; absl flags are marked parsed if the program has not parsed them, as grain's workers
read them).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mod_jax.config import ConfigDict, ConfigError
from mod_jax.data import stream as stream_lib
from mod_jax.data.sources import folder, procedural
from mod_jax.data.tokenizer import StreamTokenizer

SPLITS = ("train", "eval")
SOURCES = ("procedural", "folder")


# --------------------------------------------------------------------------------- data root
def prepare_data(config: ConfigDict) -> str:
  """Makes the data available and returns its root directory.

  ``data.source="procedural"``: generates the clips on first use (atomically) into ``data.dir``
  or the cache dir (``~/.cache/mod_jax/procedural-<hash>``). ``"folder"``: checks that
  ``data.dir`` exists.

  Raises:
    ConfigError: unknown ``data.source``, or ``"folder"`` with a missing ``data.dir``.
  """
  d = config.data
  if d.source == "procedural":
    return procedural.ensure_procedural(config)
  if d.source == "folder":
    if not d.dir or not os.path.isdir(os.path.expanduser(d.dir)):
      raise ConfigError(
        f"data.source='folder' needs data.dir to be an existing folder with "
        f"train/ and eval/ subfolders; got data.dir={d.dir!r}."
      )
    return os.path.abspath(os.path.expanduser(d.dir))
  raise ConfigError(f"data.source={d.source!r}; choose one of {SOURCES}.")


def load_tokenizer(config: ConfigDict) -> StreamTokenizer:
  """The stream tokenizer: ``data.tokenizer``, else ``{data root}/tokenizer.json``.

  Token strings come from ``data.tokens`` (pad, bos, eos, vision).

  Raises:
    TokenizerError: missing file or a required token absent (message names it).
  """
  path = config.data.tokenizer or os.path.join(prepare_data(config), "tokenizer.json")
  t = config.data.tokens
  return StreamTokenizer.from_file(
    os.path.expanduser(path), pad=t.pad, bos=t.bos, eos=t.eos, vision=t.vision
  )


# --------------------------------------------------------------------------------- index
@dataclasses.dataclass
class SplitIndex:
  """A split's usable videos and rendered windows (global: the same in every process).

  Attributes:
    split: ``"train"`` or ``"eval"``.
    records: usable videos.
    windows: ``(record index, window)`` in video order, then stream order.
    folder_stats: counts from validating the folder.
    stream_stats: counts from rendering the windows.
  """

  split: str
  records: list[folder.VideoRecord]
  windows: list[tuple[int, stream_lib.StreamWindow]]
  folder_stats: folder.FolderStats
  stream_stats: stream_lib.StreamStats

  def stats(self, process_count: int = 1, process_index: int = 0) -> dict[str, Any]:
    """JSON-able counts for logging; ``samples`` are the windows this process reads."""
    f, s = self.folder_stats, self.stream_stats
    return {
      "videos": f.videos,
      "skipped_videos": f.skipped_videos,
      "skipped_paths": f.skipped_paths[:50],
      "narrations": f.narrations,
      "queries": f.queries,
      "bad_annotations": dict(f.bad_annotations),
      "bad_annotations_total": sum(f.bad_annotations.values()),
      "windows": s.windows,
      "samples": len(range(process_index, s.windows, process_count)),
      "truncated_windows": s.truncated_windows,
      "truncated_tokens": s.truncated_tokens,
      "replaced_narrations": s.replaced_narrations,
      "unknown_tokens": s.unknown_tokens,
      "frames": int(sum(w.num_frames for _, w in self.windows)),
      "text_tokens": int(sum(w.num_text for _, w in self.windows)),
    }


_INDEX_CACHE: dict[tuple, SplitIndex] = {}
_STATS: dict[tuple, dict[str, Any]] = {}


def _frame_size(config: ConfigDict) -> int:
  return int(config.model.vision.image_size)


def _index_key(config: ConfigDict, root: str, split: str, tokenizer: StreamTokenizer) -> tuple:
  d = config.data
  return (
    root,
    split,
    float(d.fps),
    _frame_size(config),
    int(config.model.tokens_per_frame),
    int(d.max_frames),
    int(d.max_text),
    d.system_prompt,
    d.on_bad_video,
    tokenizer.name,
    tokenizer.vocab_size,
  )


def _stats_key(config: ConfigDict) -> tuple:
  d = config.data
  params = tuple(sorted(procedural.params_of(config).items())) if d.source == "procedural" else ()
  return (
    d.source,
    d.dir,
    params,
    d.fps,
    d.max_frames,
    d.max_text,
    d.system_prompt,
    config.model.tokens_per_frame,
    _frame_size(config),
  )


def _check_config(config: ConfigDict, split: str) -> None:
  d = config.data
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; choose one of {SPLITS}.")
  if d.fps <= 0:
    raise ConfigError(f"data.fps={d.fps} must be > 0 (frames per second).")
  if d.num_packing_bins < 1 or d.cache_mb < 0 or d.worker_count < 0:
    raise ConfigError(
      f"data.num_packing_bins={d.num_packing_bins} must be >= 1, data.cache_mb="
      f"{d.cache_mb} and data.worker_count={d.worker_count} >= 0."
    )


def load_split(config: ConfigDict, split: str, tokenizer: StreamTokenizer) -> SplitIndex:
  """Indexes a split: validates its videos and renders their streams into windows.

  Each video is decoded once (into the frame cache) by :func:`folder.index_folder`; each
  stream is cut into windows by :func:`mod_jax.data.stream.render_stream`. Cached per process
  (the same config and tokenizer return the same object).

  Args:
    config: full config (``data.*``, ``model.tokens_per_frame``, ``model.vision.image_size``).
    split: ``"train"`` or ``"eval"`` (the subfolder of the data root).
    tokenizer: the stream tokenizer.

  Returns:
    The :class:`SplitIndex` (global; :func:`make_dataset` takes this process's share).

  Raises:
    ConfigError / ValueError: bad config or split name.
    VideoError: a bad video with ``data.on_bad_video="fail"``.
    FileNotFoundError: the split has no ``narrations.json``.
    RuntimeError: no usable video in the split.
  """
  _check_config(config, split)
  root = prepare_data(config)
  key = _index_key(config, root, split, tokenizer)
  if key in _INDEX_CACHE:
    return _INDEX_CACHE[key]
  d, m = config.data, config.model
  cache = folder.frame_cache(int(d.cache_mb) << 20)
  records, fstats = folder.index_folder(
    os.path.join(root, split),
    fps=d.fps,
    size=_frame_size(config),
    on_bad_video=d.on_bad_video,
    cache=cache,
  )
  if not records:
    raise RuntimeError(
      f"{os.path.join(root, split)}: no usable video ({fstats.skipped_videos} "
      f"skipped: {fstats.skipped_paths[:5]})."
    )
  windows, sstats = [], stream_lib.StreamStats()
  for i, r in enumerate(records):
    ws, s = stream_lib.render_stream(
      tokenizer,
      num_frames=r.num_frames,
      narrations=r.narrations,
      queries=r.queries,
      fps=d.fps,
      system_prompt=d.system_prompt,
      tokens_per_frame=m.tokens_per_frame,
      max_frames=d.max_frames,
      max_text=d.max_text,
    )
    windows += [(i, w) for w in ws]
    sstats += s
  if sstats.truncated_windows:
    warnings.warn(
      f"{split}: {sstats.truncated_windows} windows exceeded data.max_text="
      f"{d.max_text} with a single frame; {sstats.truncated_tokens} text tokens "
      f"were truncated (counted in data_stats). Raise data.max_text.",
      folder.DataWarning,
      stacklevel=2,
    )
  if sstats.unknown_tokens:
    warnings.warn(
      f"{split}: {sstats.unknown_tokens} words of the system prompt, narrations or "
      f"queries are not in the tokenizer {tokenizer.name} and became <unk> (counted "
      f"in data_stats).",
      folder.DataWarning,
      stacklevel=2,
    )
  index = SplitIndex(split, records, windows, fstats, sstats)
  _INDEX_CACHE[key] = index
  return index


def data_stats(config: ConfigDict) -> dict[str, dict[str, Any]]:
  """Counts of every split indexed in this process for ``config``, for logging.

  Returns:
    ``{split: {"videos", "skipped_videos", "skipped_paths", "narrations", "queries",
    "bad_annotations" (by reason), "bad_annotations_total", "windows", "samples" (this
    process), "truncated_windows", "truncated_tokens", "replaced_narrations", "unknown_tokens",
    "frames", "text_tokens"}}``; empty before :func:`make_dataset` / :func:`load_split` ran.
  """
  key = _stats_key(config)
  return {split: dict(s) for (k, split), s in sorted(_STATS.items()) if k == key}


# --------------------------------------------------------------------------------- transforms
class _AttachFrames(grain.transforms.Map):
  """(video path, window) -> the window's example dict with decoded frames (cached)."""

  def __init__(self, fps: float, size: int, cache_bytes: int):
    self._fps, self._size, self._cache_bytes = fps, size, cache_bytes

  def map(self, element):
    path, window = element
    frames = folder.load_frames(path, self._fps, self._size, folder.frame_cache(self._cache_bytes))
    return window.to_example(frames)


class _FinishRow(grain.transforms.Map):
  """Checks the packer's segment ids and keeps one text and one frame copy of them.

  The packer adds ``{feature}_segment_ids`` and ``{feature}_positions`` for every packed feature;
  within each group (text / frame features) the ids must agree, and a sample's id must be the
  same in both groups. The packer's ``*_positions`` (offsets inside each sample) are dropped: the
  model uses the stream positions ``text_positions`` / ``frame_positions``.
  """

  def map(self, row):
    out = {k: row[k] for k in stream_lib.TEXT_FEATURES + stream_lib.FRAME_FEATURES}
    for group, features, name in (
      ("text", stream_lib.TEXT_FEATURES, "text_segment_ids"),
      ("frame", stream_lib.FRAME_FEATURES, "frame_segment_ids"),
    ):
      ids = row[f"{features[0]}_segment_ids"]
      for f in features[1:]:
        if not np.array_equal(row[f"{f}_segment_ids"], ids):
          raise AssertionError(
            f"packer gave {f} segment ids that differ from {features[0]}'s in the {group} group."
          )
      out[name] = ids.astype(np.int32)
    if not np.array_equal(
      np.unique(out["text_segment_ids"][out["text_segment_ids"] > 0]),
      np.unique(out["frame_segment_ids"][out["frame_segment_ids"] > 0]),
    ):
      raise AssertionError("packed text and frame segment ids name different samples.")
    return out


class _PadRows:
  """Batches ``rows`` packed rows, filling a short last batch with all-padding rows."""

  def __init__(self, rows: int, pad_id: int):
    self._rows, self._pad_id = rows, pad_id

  def __call__(self, values: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    batch = grain.experimental.batch_and_pad(values, batch_size=self._rows)
    batch["text_tokens"][len(values) :] = self._pad_id
    return batch


def _length_struct(config: ConfigDict) -> dict[str, int]:
  d = config.data
  return {
    **{k: int(d.max_text) for k in stream_lib.TEXT_FEATURES},
    **{k: int(d.max_frames) for k in stream_lib.FRAME_FEATURES},
  }


def _pack(ds: grain.IterDataset, config: ConfigDict, pad_id: int, shuffle_bins: bool):
  padding = {k: 0 for k in _length_struct(config)}
  padding["text_tokens"] = pad_id
  return grain.experimental.FirstFitPackIterDataset(
    ds,
    length_struct=_length_struct(config),
    num_packing_bins=int(config.data.num_packing_bins),
    seed=int(config.seed),
    shuffle_bins=shuffle_bins,
    padding_struct=padding,
  )


def _count_packed_rows(windows: list[stream_lib.StreamWindow], config: ConfigDict) -> int:
  """Rows the eval packer makes of ``windows`` (first fit depends only on lengths)."""
  if not windows:
    return 0
  lengths = [(w.num_text, w.num_frames) for w in windows]
  ds = grain.MapDataset.source(lengths).map(
    lambda x: {
      **{k: np.zeros(x[0], np.int8) for k in stream_lib.TEXT_FEATURES},
      **{k: np.zeros(x[1], np.int8) for k in stream_lib.FRAME_FEATURES},
    }
  )
  ds = _pack(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), config, 0, False)
  return sum(1 for _ in ds)


def _padding_batch(config: ConfigDict, rows: int, pad_id: int) -> dict[str, np.ndarray]:
  spec = batch_spec(config, rows)
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  batch["text_tokens"][:] = pad_id
  return batch


def _vision_input_spec(config: ConfigDict, rows: int) -> dict:
  """``frames`` uint8 [rows, F, S, S, 3], or with ``data.input="features"`` the pre-extracted
  tower output ``features`` bfloat16 [rows, F, N, vision width]."""
  f = int(config.data.max_frames)
  if config.data.get("input", "frames") == "features":
    import ml_dtypes

    m = config.model
    return {
      "features": (
        (rows, f, int(m.tokens_per_frame), int(m.vision.width)),
        np.dtype(ml_dtypes.bfloat16),
      )
    }
  s = _frame_size(config)
  return {"frames": ((rows, f, s, s, 3), np.dtype(np.uint8))}


def batch_spec(config: ConfigDict, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{field: (shape, dtype)}`` of a batch of ``rows`` rows (for AOT compilation and tests)."""
  d = config.data
  t, f = int(d.max_text), int(d.max_frames)
  i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
  return {
    "text_tokens": ((rows, t), i32),
    "text_positions": ((rows, t), i32),
    "text_targets": ((rows, t), i32),
    "text_weights": ((rows, t), f32),
    **_vision_input_spec(config, rows),
    "frame_positions": ((rows, f), i32),
    "frame_targets": ((rows, f), i32),
    "frame_weights": ((rows, f), f32),
    "text_segment_ids": ((rows, t), i32),
    "frame_segment_ids": ((rows, f), i32),
  }


def _ensure_absl_flags_parsed() -> None:
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------------- dataset
def make_dataset(
  config: ConfigDict,
  split: str,
  tokenizer: StreamTokenizer,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """The grain dataset of packed batches for one process.

  Args:
    config: full config.
    split: ``"train"``: infinite, shuffled (``config.seed``; reshuffled each epoch), bins
      shuffled; ``"eval"``: one deterministic pass in index order, the last partial batch padded
      with all-padding rows (segment id 0), and with ``process_count > 1`` padded with
      all-padding batches so every process yields the same number of batches.
    tokenizer: the stream tokenizer (its pad id fills padded ``text_tokens``).
    process_index, process_count: this process takes windows
      ``[process_index::process_count]`` (``jax.process_index()``, ``jax.process_count()``).

  Returns:
    A ``grain.IterDataset`` of dicts of numpy arrays (the module docstring lists the fields),
    ``train.batch_size // process_count`` rows per batch. ``iter(ds)`` is checkpointable:
    ``get_state()`` / ``set_state()`` and ``grain.checkpoint.CheckpointSave/Restore`` resume the
    exact data order.

  Raises:
    ConfigError: ``train.batch_size`` not divisible by ``process_count``, or bad data config.
    (and what :func:`load_split` raises).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  if config.data.get("input", "frames") != "frames":
    raise ConfigError(
      f"data.input={config.data.input!r}: the {config.data.source!r} source yields decoded "
      f"frames; pre-extracted feature datasets (`mod-jax encode`) are not available yet. Use "
      f"data.input='frames' (the model also accepts a `features` batch field directly, e.g. "
      f"for `mod-jax compile`)."
    )
  rows = config.train.batch_size // process_count
  if rows < 1 or config.train.batch_size % process_count:
    raise ConfigError(
      f"train.batch_size={config.train.batch_size} must be a positive multiple "
      f"of the process count {process_count}."
    )
  index = load_split(config, split, tokenizer)
  _STATS[(_stats_key(config), split)] = index.stats(process_count, process_index)
  d = config.data
  train = split == "train"
  items = [(index.records[i].path, w) for i, w in index.windows]
  ds = grain.MapDataset.source(items)[process_index::process_count]
  if len(ds) == 0:
    raise RuntimeError(
      f"{split}: process {process_index} of {process_count} has no window "
      f"({len(items)} windows in total); use fewer processes or more data."
    )
  if train:
    ds = ds.shuffle(seed=int(config.seed)).repeat()
  ds = ds.map(_AttachFrames(float(d.fps), _frame_size(config), int(d.cache_mb) << 20))
  threads = max(1, min(4, os.cpu_count() or 1))
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(2 * int(d.num_packing_bins), rows, 8)
    )
  )
  if d.worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.worker_count)))
  it_ds = _pack(it_ds, config, tokenizer.pad_id, shuffle_bins=train).map(_FinishRow())
  if train:
    return it_ds.batch(rows, drop_remainder=True)
  it_ds = it_ds.batch(rows, batch_fn=_PadRows(rows, tokenizer.pad_id))
  if process_count > 1:
    counts = [
      -(-_count_packed_rows([w for _, w in index.windows[p::process_count]], config) // rows)
      for p in range(process_count)
    ]
    extra = max(counts) - counts[process_index]
    if extra:
      pad = _padding_batch(config, rows, tokenizer.pad_id)
      pad_ds = grain.MapDataset.range(extra).map(lambda _: pad).to_iter_dataset()
      it_ds = grain.experimental.InterleaveIterDataset([it_ds, pad_ds], cycle_length=1)
  return it_ds
