"""Row packing with context chunks: first-fit packing of samples into rows of R chunks.

A packed row has ``T`` text slots and ``F`` frame slots (the slot layout, ``mod_jax/config.py``).
With a ``context`` mesh axis of size R (docs/design.md §6, ``mod_jax/model/rows.py``) the row is
R chunks — chunk r = text slots ``r·T/R .. (r+1)·T/R − 1`` and frames ``r·F/R .. (r+1)·F/R − 1``
— and every token of chunk r must come before (in stream order) every token of chunk r + 1 of
the same sample; padding sits at the end of each chunk. R = 1 is the ordinary row.

**The flow rule** (:class:`ChunkFlow`). A sample is a stream of tokens of G kinds (here text
tokens and whole frames), in stream-position order. It is poured into the chunks of a row in that
order, greedily: each token goes into the current chunk if that chunk has a free slot of its
kind, else the sample moves on to the next chunk (the slots it leaves free there stay padding, or
go to later samples) — so the part of a sample in chunk r is a prefix of what is left of its
stream, and the parts are in stream order chunk after chunk. A sample continues across chunks
with its own segment id and its own stream positions (nothing is repeated or cut). The greedy
prefix is the longest one that fits, and taking more earlier never hurts a later chunk, so the
sample fits the row iff this flow ends before chunk R; it starts in chunk 0, where it fills the
room earlier samples left (starting later could only fit less).

Worked example (R = 2 chunks of 4 text slots and 2 frames; sample A = 2 text, 1 frame, 1 text;
sample B = 2 text, 2 frames, 2 text, then padding)::

  A: text slots 0-1, frame slot 0, text slot 2        chunk 0: text 3/4, frames 1/2
  B: its first text token in text slot 3; its second finds chunk 0's text full, so B continues
     in chunk 1: text slot 4, frame slots 2-3, text slots 5-6
  layout: text  A A A B | B B B pad     frames  A pad | B B

**Packing** (:class:`ChunkedFirstFitPackedBatch`) is grain's first fit (``FirstFitPackedBatch``:
each sample goes into the first of ``num_packing_bins`` open rows where it fits, and the rows are
emitted when one does not fit any) with "fits" meaning the flow above; with R = 1 the flow fits
iff both counts fit, which is exactly grain's test, and the rows are grain's. Grain's packing
loop does the rest (the parent iterator, bin shuffling, checkpointable state).

**Windows** (``mod_jax/data/stream.py::render_stream``) are cut so that every sample flows into
the R empty chunks of a row (a window grows frame by frame while it does); with R = 1 that is
"at most T text tokens and F frames", as before.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

# grain's generic packing loop and packed-batch buffers (grain is pinned in pyproject.toml): the
# public FirstFit/BestFit datasets are these with a fixed placement rule.
from grain._src.python.dataset.transformations import packing as grain_packing
from grain._src.python.dataset.transformations import packing_packed_batch as grain_packed_batch


class ChunkFlow:
  """The greedy flow of one sample's stream into the chunks of a row (module docstring).

  Args:
    free_rg: int [R, G], free slots of each kind g in each chunk r (not modified).
    record: keep the placements (``placed``) for the packer.

  Attributes:
    chunk: the chunk the next token goes to (R once the row is exhausted).
    placed: ``(chunk, kind, count)`` runs in stream order (with ``record``).
  """

  def __init__(self, free_rg: np.ndarray, record: bool = False):
    self._free = np.asarray(free_rg, np.int64)
    self.chunk = 0
    self._used = [0] * self._free.shape[1]
    self.placed: list[tuple[int, int, int]] | None = [] if record else None

  def copy(self) -> ChunkFlow:
    other = ChunkFlow.__new__(ChunkFlow)
    other._free, other.chunk, other._used = self._free, self.chunk, list(self._used)
    other.placed = None if self.placed is None else list(self.placed)
    return other

  def add(self, kind: int, count: int) -> bool:
    """Pours ``count`` tokens of ``kind`` (consecutive in the stream); False once they do not
    all fit in the row's remaining chunks (the flow is then exhausted)."""
    r_total = self._free.shape[0]
    while count > 0:
      if self.chunk >= r_total:
        return False
      room = int(self._free[self.chunk, kind]) - self._used[kind]
      if room <= 0:
        self.chunk += 1
        self._used = [0] * len(self._used)
        continue
      take = min(room, count)
      if self.placed is not None:
        self.placed.append((self.chunk, kind, take))
      self._used[kind] += take
      count -= take
    return self.chunk < r_total


def stream_runs(positions: Sequence[np.ndarray]) -> list[tuple[int, int]]:
  """A sample's stream as runs ``(kind, count)`` of consecutive tokens of one kind.

  Args:
    positions: per kind g, int [n_g] stream positions of its tokens (a frame: its first vision
      token's), strictly increasing, unique across kinds.
  Returns:
    The runs in stream order (counts sum to the n_g per kind).
  Raises:
    ValueError: positions of a kind are not strictly increasing.
  """
  for g, p in enumerate(positions):
    if len(p) > 1 and not np.all(np.diff(p) > 0):
      raise ValueError(f"stream positions of kind {g} are not strictly increasing: {p}.")
  kinds = np.concatenate([np.full(len(p), g, np.int64) for g, p in enumerate(positions)])
  order = np.argsort(np.concatenate([np.asarray(p, np.int64) for p in positions]), kind="stable")
  kinds = kinds[order]
  if not len(kinds):
    return []
  starts = np.flatnonzero(np.diff(kinds)) + 1
  bounds = np.concatenate([[0], starts, [len(kinds)]])
  return [(int(kinds[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


class ChunkedFirstFitPackedBatch(grain_packed_batch.PackedBatch):
  """grain's first-fit packed batch, with rows of ``chunks`` context chunks (module docstring).

  Args:
    element_for_shapes, num_packing_bins, length_struct, meta_features, pack_alignment_struct,
      padding_struct, max_sequences_per_bin: as grain's ``PackedBatch`` (a flat dict
      ``length_struct``; no meta features, alignment 1).
    groups: per kind of slot, ``(feature names, position feature)``: the features share the
      kind's slot axis (capacity ``length_struct[name]``, equal within a group) and the position
      feature gives each slot's stream position (text: ``text_positions``; frames:
      ``frame_positions``, the first vision token's).
    chunks: R; every capacity must be divisible by it.

  Raises:
    ValueError: a capacity not divisible by R, or a feature of ``length_struct`` in no group.
  """

  def __init__(
    self,
    element_for_shapes: Any,
    num_packing_bins: int,
    length_struct: dict[str, int],
    meta_features: Sequence[str] = (),
    pack_alignment_struct: Any = None,
    padding_struct: Any = None,
    max_sequences_per_bin: int | None = None,
    *,
    groups: Sequence[tuple[Sequence[str], str]],
    chunks: int = 1,
  ):
    super().__init__(
      element_for_shapes,
      num_packing_bins,
      length_struct,
      meta_features=meta_features,
      pack_alignment_struct=pack_alignment_struct,
      padding_struct=padding_struct,
      max_sequences_per_bin=max_sequences_per_bin,
    )
    if meta_features or pack_alignment_struct is not None:
      raise ValueError("ChunkedFirstFitPackedBatch takes no meta features or alignment.")
    self._groups = [(tuple(f), p) for f, p in groups]
    self._chunks = int(chunks)
    named = {f for fs, _ in self._groups for f in fs}
    if named != set(length_struct):
      raise ValueError(
        f"groups name {sorted(named)} but length_struct has {sorted(length_struct)}."
      )
    caps = []
    for features, _ in self._groups:
      cap = {int(length_struct[f]) for f in features}
      if len(cap) != 1 or next(iter(cap)) % self._chunks:
        raise ValueError(
          f"features {features} need one capacity divisible by chunks={self._chunks}; "
          f"got {sorted(cap)}."
        )
      caps.append(next(iter(cap)) // self._chunks)
    self._chunk_cap = np.asarray(caps, np.int64)  # [G] slots per chunk
    # Slots used per row, chunk and kind (each chunk filled from its start: padding at its end).
    self._used = np.zeros((num_packing_bins, self._chunks, len(caps)), np.int64)

  def _lengths(self, element) -> list[int]:
    out = []
    for features, _ in self._groups:
      n = {len(element[f]) for f in features}
      if len(n) != 1:
        raise ValueError(f"features {features} of one sample have different lengths {n}.")
      out.append(n.pop())
    return out

  def try_add_to_batch(self, element: Any) -> list[str] | None:
    """Places ``element`` in the first row where it flows (None), else returns the names of
    the features of the kinds that did not fit (grain then emits the rows).

    Raises:
      ValueError: the element does not fit even an empty row (its window was not cut for
        these chunks).
    """
    lengths = self._lengths(element)
    runs = stream_runs([element[p] for _, p in self._groups])
    full = np.broadcast_to(self._chunk_cap, self._used.shape[1:])
    empty = ChunkFlow(full)
    if not all(empty.add(g, n) for g, n in runs):
      caps = {fs[0]: int(c) for (fs, _), c in zip(self._groups, self._chunk_cap)}
      raise ValueError(
        f"a sample of lengths {dict(zip([fs[0] for fs, _ in self._groups], lengths))} does not "
        f"fit a row of {self._chunks} context chunks of {caps} slots in stream order; cut the "
        f"streams into windows for these chunks (mod_jax.data.stream.render_stream(chunks="
        f"{self._chunks}), as the pipeline does)."
      )
    need = np.asarray(lengths, np.int64)
    for row in range(self._num_packing_bins):
      if (
        self._max_sequences_per_bin is not None
        and self._num_examples_per_row[row] >= self._max_sequences_per_bin
      ):
        continue
      free = self._chunk_cap - self._used[row]  # [R, G]
      if np.any(free.sum(0) < need):
        continue
      flow = ChunkFlow(free, record=True)
      if all(flow.add(g, n) for g, n in runs):
        self._place(element, row, flow.placed or [])
        return None
    return [fs[0] for fs, _ in self._groups]

  def _place(self, element, row: int, placed: list[tuple[int, int, int]]) -> None:
    segment_id = self._num_examples_per_row[row] + 1
    offset = [0] * len(self._groups)
    for chunk, g, count in placed:
      features, _ = self._groups[g]
      start = chunk * int(self._chunk_cap[g]) + int(self._used[row, chunk, g])
      src = slice(offset[g], offset[g] + count)
      for f in features:
        self._values[f][row, start : start + count] = element[f][src]
        self._segment_ids[f][row, start : start + count] = segment_id
        self._positions[f][row, start : start + count] = np.arange(src.start, src.stop)
      self._used[row, chunk, g] += count
      offset[g] += count
    self._num_examples_per_row[row] += 1


def pack_rows(
  ds,
  *,
  length_struct: dict[str, int],
  groups: Sequence[tuple[Sequence[str], str]],
  chunks: int,
  num_packing_bins: int,
  seed: int,
  shuffle_bins: bool,
  padding_struct: dict[str, Any] | None = None,
):
  """The grain ``IterDataset`` of packed rows of ``ds``'s samples (module docstring).

  Args:
    ds: a grain ``IterDataset`` of sample dicts (1-D features along their slots, frames with
      trailing dims).
    length_struct: slots per row of each feature (T for text features, F for frame features).
    groups, chunks: as :class:`ChunkedFirstFitPackedBatch`.
    num_packing_bins, seed, shuffle_bins, padding_struct: as grain's
      ``FirstFitPackIterDataset``.

  Returns:
    Rows with each feature padded to its length, plus grain's ``{feature}_segment_ids`` (1.. per
    sample in the row, 0 = padding) and ``{feature}_positions`` (a slot's index within its
    sample's slots of that feature).
  """
  return grain_packing.PackIterDataset(
    ds,
    packer_cls=functools.partial(ChunkedFirstFitPackedBatch, groups=groups, chunks=chunks),  # type: ignore[arg-type]
    length_struct=length_struct,
    num_packing_bins=num_packing_bins,
    seed=seed,
    shuffle_bins=shuffle_bins,
    padding_struct=padding_struct,
  )
