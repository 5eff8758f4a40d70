"""The grain input pipeline: indexed streams -> decoded windows -> packed rows -> batches.

::

  index (validate videos, render text windows)      once per process, cached
  -> MapDataset.source(windows)[process_index::process_count]
  -> shuffle(seed, reshuffled every epoch) -> repeat()            (train only)
  -> map(attach frames / features)                 decoded clips in an LRU cache
  -> to_iter_dataset (threads) [-> mp_prefetch(worker_count)]
  -> first-fit packing (text: T_cap, frames: F_cap; R context chunks)  several windows per row
  -> map(check + rename segment ids) -> batch(rows)

A row has exactly ``T_cap = data.max_text`` text slots and ``F_cap = data.max_frames`` frame slots
(docs/design.md §1.2, the slot layout in :mod:`mod_jax.config`); the fields of a batch of ``B`` rows are

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

With a ``context`` mesh axis of size R (:func:`row_chunks`; docs/design.md §6) every row is R
context chunks (text slots ``r·T_cap/R ..`` and frames ``r·F_cap/R ..``), a sample may continue
from one chunk into the next, and windows are cut so that they flow into a row's R chunks
(:mod:`mod_jax.data.packing`); R = 1 gives the ordinary rows.

The text of every window is rendered at index time (so windowing, truncation and all counts are
known before training: :meth:`SplitIndex.stats`, kept by the caller in a :class:`DataIndex`); the
map step only attaches pixels or features. Every process indexes the whole split, so that all
processes agree on the window list they slice. Sources (``data.source``):

* ``procedural`` / ``folder``: a folder of videos + ``narrations.json``; indexing validates each
  video by decoding it (repeated on every host) or, with ``data.input="features"``, reads only the
  header of each video's features file under ``data.features_dir`` (``mod-jax encode``).
* ``tfds``: a dataset built by ``mod-jax prepare`` (:mod:`mod_jax.data.tfds`) in
  ``data.tfds_dir``; the index comes from the build's stored annotations, nothing is decoded up
  front, and a window's frames (or features) are read from its array_record example when the map
  step needs them (``builder.as_data_source()``).

Decoded clips are kept in a per-process LRU cache of ``data.cache_mb`` MiB
(:mod:`mod_jax.data.frame_cache`; the demo's 216 clips at 48 px are ~36 MiB); larger data decodes
each window's video when it is needed.
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

from mod_jax.config import ConfigDict, ConfigError, context_axis_size
from mod_jax.data import features as features_lib
from mod_jax.data import frame_cache
from mod_jax.data import packing as packing_lib
from mod_jax.data import stream as stream_lib
from mod_jax.data.sources import folder, procedural
from mod_jax.data.tokenizer import StreamTokenizer

SPLITS = ("train", "eval")
SOURCES = ("procedural", "folder", "tfds")


# --------------------------------------------------------------------------------- data root
def prepare_data(config: ConfigDict) -> str:
  """Makes the data available and returns its root directory.

  ``data.source="procedural"``: generates the clips on first use (atomically) into ``data.dir``
  or the cache dir (``~/.cache/mod_jax/procedural-<hash>``). ``"folder"``: checks that
  ``data.dir`` exists. ``"tfds"``: the built dataset's version folder in ``data.tfds_dir``.

  Raises:
    ConfigError: unknown ``data.source``, ``"folder"`` with a missing ``data.dir``, or a tfds
      dataset that is not built.
  """
  d = config.data
  if d.source == "procedural":
    return procedural.ensure_procedural(config)
  if d.source == "tfds":
    from mod_jax.data.tfds import source as tfds_source

    return tfds_source.dataset_dir(config)
  if d.source == "folder":
    if not d.dir or not os.path.isdir(os.path.expanduser(d.dir)):
      raise ConfigError(
        f"data.source='folder' needs data.dir to be an existing folder with "
        f"train/ and eval/ subfolders; got data.dir={d.dir!r}."
      )
    return os.path.abspath(os.path.expanduser(d.dir))
  raise ConfigError(f"data.source={d.source!r}; choose one of {SOURCES}.")


def row_chunks(config: ConfigDict) -> int:
  """R: the context chunks of every packed row, the size of ``config.mesh.shape``'s ``context``
  axis (a -1 there is resolved over ``jax.device_count()``, as the mesh is).

  Raises:
    ConfigError: the mesh shape does not resolve (:func:`mod_jax.config.context_axis_size`).
  """
  try:
    return context_axis_size(config)
  except ConfigError:
    import jax

    return context_axis_size(config, jax.device_count())


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
  """A split's usable streams and rendered windows (global: the same in every process).

  Attributes:
    split: ``"train"`` or ``"eval"``.
    records: usable streams: objects with ``ref`` (what ``reader`` takes), ``name``,
      ``num_frames``, ``narrations`` and ``queries`` (``(seconds, text)`` tuples).
    windows: ``(record index, window)`` in record order, then stream order.
    source_stats: counts from the source (videos kept and skipped, bad annotations, ...).
    stream_stats: counts from rendering the windows.
    reader: ``reader(ref, start, stop)`` -> the frames ``[stop - start, S, S, 3]`` uint8 or
      features ``[stop - start, N, d]`` of frames ``[start, stop)``; ``reader.key`` is the
      batch field (``"frames"`` / ``"features"``). Picklable (grain workers).
  """

  split: str
  records: list[Any]
  windows: list[tuple[int, stream_lib.StreamWindow]]
  source_stats: dict[str, Any]
  stream_stats: stream_lib.StreamStats
  reader: Any

  def example(self, i: int) -> dict[str, np.ndarray]:
    """Window ``i`` as a sample dict with its frames or features attached."""
    r, w = self.windows[i]
    vision = self.reader(self.records[r].ref, w.frame_start, w.frame_stop)
    return w.to_example(vision, key=self.reader.key)

  def stats(self, process_count: int = 1, process_index: int = 0) -> dict[str, Any]:
    """JSON-able counts for logging; ``samples`` are the windows this process reads."""
    s = self.stream_stats
    return {
      **self.source_stats,
      "windows": s.windows,
      "samples": len(range(process_index, s.windows, process_count)),
      "truncated_windows": s.truncated_windows,
      "truncated_tokens": s.truncated_tokens,
      "replaced_narrations": s.replaced_narrations,
      "unknown_tokens": s.unknown_tokens,
      "frames": int(sum(w.num_frames for _, w in self.windows)),
      "text_tokens": int(sum(w.num_text for _, w in self.windows)),
    }


class DataIndex:
  """The indexed splits of one config, built on first use and kept by its owner.

  Replaces module-level caches: the train loop makes one, passes it to :func:`make_dataset`
  (train and eval) and logs :meth:`stats`; nothing is remembered between owners.

  Args:
    config: full config.
    tokenizer: the stream tokenizer.
    process_index, process_count: this process's share (for the ``samples`` count).
  """

  def __init__(
    self,
    config: ConfigDict,
    tokenizer: StreamTokenizer,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self.config, self.tokenizer = config, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self._splits: dict[str, SplitIndex] = {}

  def split(self, name: str) -> SplitIndex:
    """The :class:`SplitIndex` of ``name`` (indexed on first use; see :func:`load_split`)."""
    if name not in self._splits:
      self._splits[name] = load_split(self.config, name, self.tokenizer)
    return self._splits[name]

  def stats(self) -> dict[str, dict[str, Any]]:
    """``{split: SplitIndex.stats()}`` of the splits indexed so far, for logging: the source's
    counts (``videos``, ``skipped_videos``, ``skipped_paths``, ``narrations``, ``queries``,
    ``bad_annotations`` by reason, ``bad_annotations_total``; tfds builds add their build
    statistics) and ``windows``, ``samples`` (this process), ``truncated_windows``,
    ``truncated_tokens``, ``replaced_narrations``, ``unknown_tokens``, ``frames``,
    ``text_tokens``."""
    return {
      k: v.stats(self.process_count, self.process_index) for k, v in sorted(self._splits.items())
    }


def _frame_size(config: ConfigDict) -> int:
  return int(config.model.vision.image_size)


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


class DecodedFrames:
  """Reader of a video's frames (``ref`` = its path): decoded at ``fps`` and ``size`` through
  the process's shared :class:`~mod_jax.data.frame_cache.FrameCache` of ``cache_bytes``."""

  key = "frames"

  def __init__(self, fps: float, size: int, cache_bytes: int):
    self.fps, self.size, self.cache_bytes = float(fps), int(size), int(cache_bytes)

  def __call__(self, ref: str, start: int, stop: int) -> np.ndarray:
    cache = frame_cache.shared_cache(self.cache_bytes)
    return folder.load_frames(ref, self.fps, self.size, cache)[start:stop]


class FeatureFiles:
  """Reader of a video's pre-extracted features (``ref`` = the video's path): the file
  ``{features_dir}/{path relative to root}.npy`` (:mod:`mod_jax.data.features`)."""

  key = "features"

  def __init__(self, features_dir: str, root: str, dtype: str):
    self.features_dir, self.root, self.dtype = features_dir, root, dtype

  def __call__(self, ref: str, start: int, stop: int) -> np.ndarray:
    path = features_lib.features_path(self.features_dir, os.path.relpath(ref, self.root))
    return np.array(features_lib.load_features(path, self.dtype)[start:stop])


def _features_dir(config: ConfigDict) -> tuple[str, dict]:
  """``data.features_dir`` and its manifest, checked against the config."""
  d, m = config.data, config.model
  if not d.features_dir:
    raise ConfigError(
      f"data.input='features' with data.source={d.source!r} needs data.features_dir: the "
      f"folder written by `mod-jax encode --config X --videos {d.dir or 'DATA_ROOT'} --out DIR`."
    )
  path = os.path.abspath(os.path.expanduser(d.features_dir))
  try:
    manifest = features_lib.read_manifest(path)
    features_lib.check_manifest(
      manifest,
      fps=d.fps,
      tokens_per_frame=m.tokens_per_frame,
      width=m.vision.width,
      where=f"data.features_dir={path}",
    )
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from None
  return path, manifest


def _index_folder(config: ConfigDict, root: str, split: str):
  """Records, source stats and reader of a folder split (videos or their features)."""
  d = config.data
  split_dir = os.path.join(root, split)
  if d.get("input", "frames") == "features":
    fdir, manifest = _features_dir(config)
    measure = features_lib.measure_fn(fdir, split_dir, float(d.fps))
    reader: Any = FeatureFiles(fdir, root, manifest["dtype"])
  else:
    measure, reader = None, DecodedFrames(float(d.fps), _frame_size(config), int(d.cache_mb) << 20)
  records, f = folder.index_folder(
    split_dir,
    fps=d.fps,
    size=_frame_size(config),
    on_bad_video=d.on_bad_video,
    cache=frame_cache.shared_cache(int(d.cache_mb) << 20),
    measure=measure,
  )
  if not records:
    raise RuntimeError(
      f"{split_dir}: no usable video ({f.skipped_videos} skipped: {f.skipped_paths[:5]})."
    )
  stats = {
    "videos": f.videos,
    "skipped_videos": f.skipped_videos,
    "skipped_paths": f.skipped_paths[:50],
    "narrations": f.narrations,
    "queries": f.queries,
    "bad_annotations": dict(f.bad_annotations),
    "bad_annotations_total": sum(f.bad_annotations.values()),
  }
  return records, stats, reader


def load_split(config: ConfigDict, split: str, tokenizer: StreamTokenizer) -> SplitIndex:
  """Indexes a split: finds its usable streams and renders them into windows.

  Folder sources validate each video (:func:`folder.index_folder`: decoded once into the frame
  cache, or only its features file's header with ``data.input="features"``); the tfds source
  reads the build's stored annotations (:func:`mod_jax.data.tfds.source.index_split`). Each
  stream is cut into windows by :func:`mod_jax.data.stream.render_stream`, for rows of
  :func:`row_chunks` context chunks. Not cached: keep the result (a :class:`DataIndex` does).

  Args:
    config: full config (``data.*``, ``model.tokens_per_frame``, ``model.vision.image_size``).
    split: ``"train"`` or ``"eval"``.
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
  d, m = config.data, config.model
  if d.source == "tfds":
    from mod_jax.data.tfds import source as tfds_source

    records, source_stats, reader = tfds_source.index_split(config, root, split)
  else:
    records, source_stats, reader = _index_folder(config, root, split)
  windows, sstats = [], stream_lib.StreamStats()
  chunks = row_chunks(config)
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
      chunks=chunks,
    )
    windows += [(i, w) for w in ws]
    sstats += s
  if sstats.truncated_windows:
    warnings.warn(
      f"{split}: {sstats.truncated_windows} windows exceeded data.max_text="
      f"{d.max_text} with a single frame; {sstats.truncated_tokens} text tokens "
      f"were truncated (counted in the index stats). Raise data.max_text.",
      folder.DataWarning,
      stacklevel=2,
    )
  if sstats.unknown_tokens:
    warnings.warn(
      f"{split}: {sstats.unknown_tokens} words of the system prompt, narrations or "
      f"queries are not in the tokenizer {tokenizer.name} and became <unk> (counted "
      f"in the index stats).",
      folder.DataWarning,
      stacklevel=2,
    )
  return SplitIndex(split, records, windows, source_stats, sstats, reader)


# --------------------------------------------------------------------------------- transforms
class _AttachVision(grain.transforms.Map):
  """(record ref, window) -> the window's example dict with its frames or features."""

  def __init__(self, reader):
    self._reader = reader

  def map(self, element):
    ref, window = element
    vision = self._reader(ref, window.frame_start, window.frame_stop)
    return window.to_example(vision, key=self._reader.key)


class _FinishRow(grain.transforms.Map):
  """Checks the packer's segment ids and keeps one text and one frame copy of them.

  The packer adds ``{feature}_segment_ids`` and ``{feature}_positions`` for every packed feature;
  within each group (text / frame features) the ids must agree, and a sample's id must be the
  same in both groups. The packer's ``*_positions`` (offsets inside each sample) are dropped: the
  model uses the stream positions ``text_positions`` / ``frame_positions``.
  """

  def __init__(self, vision_key: str = "frames"):
    self._frame_features = stream_lib.frame_features(vision_key)

  def map(self, row):
    out = {k: row[k] for k in stream_lib.TEXT_FEATURES + self._frame_features}
    for group, features, name in (
      ("text", stream_lib.TEXT_FEATURES, "text_segment_ids"),
      ("frame", self._frame_features, "frame_segment_ids"),
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
    **{k: int(d.max_frames) for k in stream_lib.frame_features(_vision_key(config))},
  }


def _vision_key(config: ConfigDict) -> str:
  return "features" if config.data.get("input", "frames") == "features" else "frames"


def _pack(ds: grain.IterDataset, config: ConfigDict, pad_id: int, shuffle_bins: bool):
  """First-fit packing into rows of :func:`row_chunks` context chunks (R = 1: grain's
  ``FirstFitPackIterDataset``'s rows; :mod:`mod_jax.data.packing`)."""
  padding = {k: 0 for k in _length_struct(config)}
  padding["text_tokens"] = pad_id
  return packing_lib.pack_rows(
    ds,
    length_struct=_length_struct(config),
    groups=(
      (stream_lib.TEXT_FEATURES, "text_positions"),
      (stream_lib.frame_features(_vision_key(config)), "frame_positions"),
    ),
    chunks=row_chunks(config),
    num_packing_bins=int(config.data.num_packing_bins),
    seed=int(config.seed),
    shuffle_bins=shuffle_bins,
    padding_struct=padding,
  )


def _count_packed_rows(windows: list[stream_lib.StreamWindow], config: ConfigDict) -> int:
  """Rows the eval packer makes of ``windows`` (first fit depends only on the lengths and the
  stream order of text and frames)."""
  if not windows:
    return 0

  def placeholder(w: stream_lib.StreamWindow) -> dict[str, np.ndarray]:
    text = {k: np.zeros(w.num_text, np.int8) for k in stream_lib.TEXT_FEATURES}
    frame = {
      k: np.zeros(w.num_frames, np.int8) for k in stream_lib.frame_features(_vision_key(config))
    }
    text["text_positions"], frame["frame_positions"] = w.text_positions, w.frame_positions
    return {**text, **frame}

  ds = grain.MapDataset.source(windows).map(placeholder)
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
  index: DataIndex | SplitIndex | None = None,
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
    index: the split's index, or a :class:`DataIndex` holding it (indexed there on first use;
      keep it for :meth:`DataIndex.stats`); None indexes the split here (:func:`load_split`).

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
  rows = config.train.batch_size // process_count
  if rows < 1 or config.train.batch_size % process_count:
    raise ConfigError(
      f"train.batch_size={config.train.batch_size} must be a positive multiple "
      f"of the process count {process_count}."
    )
  if index is None:
    index = load_split(config, split, tokenizer)
  elif isinstance(index, DataIndex):
    index = index.split(split)
  if index.split != split:
    raise ValueError(f"make_dataset: index of split {index.split!r} given for {split!r}.")
  d = config.data
  train = split == "train"
  items = [(index.records[i].ref, w) for i, w in index.windows]
  ds = grain.MapDataset.source(items)[process_index::process_count]
  if len(ds) == 0:
    raise RuntimeError(
      f"{split}: process {process_index} of {process_count} has no window "
      f"({len(items)} windows in total); use fewer processes or more data."
    )
  if train:
    ds = ds.shuffle(seed=int(config.seed)).repeat()
  ds = ds.map(_AttachVision(index.reader))
  threads = max(1, min(4, os.cpu_count() or 1))
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(2 * int(d.num_packing_bins), rows, 8)
    )
  )
  if d.worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.worker_count)))
  it_ds = _pack(it_ds, config, tokenizer.pad_id, shuffle_bins=train).map(
    _FinishRow(index.reader.key)
  )
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
