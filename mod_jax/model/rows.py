"""A training row in stream order: the permutation from the slot layout, and exact row gathers.

The data pipeline delivers a row in the *slot layout* (``mod_jax/config.py``): ``T`` text slots,
then ``F`` frames of ``N`` vision slots, with each token's stream position and packed-sample
segment id. Attention kernels (splash, cuDNN, the blockwise path) can only express masks that
are functions of slot indices and segment ids, so the model first puts the row in **stream
order**: slots sorted by (segment, position), padding (segment 0) last in layout order. Then

    mask[i, j] = j <= i  and  seg[i] == seg[j]        (slot indices i, j of the ordered row)

is exactly the causal-by-position, same-sample mask, and every subsequence that keeps the order
(a MoD layer's compact sequence) has the same form. A frame's N tokens have consecutive positions
within their sample, so they stay contiguous: frame f of row b occupies the ordered slots
``frame_start[b, f] .. frame_start[b, f] + N - 1``.

Worked example (T = 4 text slots, F = 2 frames of N = 2; one sample at positions 0..6, one
padding text slot and one padding frame)::

    layout slot     0    1    2    3  |  4    5  |  6    7
    token           bos  a    ,    pad|  v0   v0 |  pad  pad
    position        0    1    4    0  |  2    3  |  0    1
    segment         1    1    1    0  |  1    1  |  0    0
    order (ordered slot -> layout slot):  0 1 4 5 2 3 6 7     frame_start = [2, 6]

Row gathers are written as a pair of gathers that are each other's transpose
(:func:`gather_rows` / :func:`scatter_rows`), so neither the forward nor the backward pass
contains an XLA scatter (slow on CPU, serialising on TPU); both are exact (a copy of rows).

**Context chunks** (a ``context`` mesh axis of size R, docs/design.md §6). A row is then R
chunks: chunk r is text slots ``r·T/R .. (r+1)·T/R − 1`` and frames ``r·F/R .. (r+1)·F/R − 1`` of
the slot layout, and every token of chunk r comes before (in stream order) every token of chunk
r + 1 of the same sample (a sample may span chunks; padding sits at the end of each chunk). The
model puts each chunk in stream order on its own (:func:`fold` the row into R rows of length
L/R, :func:`stream_layout` on those, :func:`unfold`), so the ordered row is the concatenation
of the ordered chunks: still in stream order, the same mask holds on global slot indices, a
frame never straddles two chunks, and chunk r lives whole on context device r. Everything
per-row (the stream permutation, MoD's per-frame top-k and compaction, the loss) runs on the
folded rows, device-local; only attention sees the whole row (K/V all-gathered along
``context``, ``mod_jax/model/attention_ops.py``). With the slot layout this costs nothing: a
contiguous split of the *ordered* row would cut frames at data-dependent places, a split of
the slot layout by chunks never does. The data pipeline packs such rows
(``mod_jax/data/packing.py``).

Shape letters: b batch, l ordered slots, m gathered slots, d feature width, f frames, n N.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mod_jax.model.partitioning import Rules, logical_to_spec, mesh_axes_of


def take(x_bl, idx_bm):
  """x[b, idx[b, m]] for x [b, l, ...] and int32 idx [b, m] (any trailing dims)."""
  idx = idx_bm.reshape(idx_bm.shape + (1,) * (x_bl.ndim - 2))
  return jnp.take_along_axis(x_bl, idx, axis=1)


@jax.custom_vjp
def gather_rows(x_bld: jax.Array, idx_bm: jax.Array, back_bl: jax.Array) -> jax.Array:
  """Rows ``x[b, idx[b, m]]`` [b, m, d], with a gather (not a scatter-add) as its gradient.

  ``idx`` must be injective per row and ``back`` its inverse: ``back[b, idx[b, m]] = m`` and
  ``back[b, j] = m_total`` (any value >= m) for slots that ``idx`` does not name. Then the
  gradient is ``g_x[b, j] = g[b, back[b, j]]`` (0 where unnamed) — :func:`scatter_rows`.
  """
  return take(x_bld, idx_bm)


def _gather_fwd(x, idx, back):
  return take(x, idx), (idx, back)


def _gather_bwd(res, g):
  idx, back = res
  return scatter_rows(g, back, idx), None, None


gather_rows.defvjp(_gather_fwd, _gather_bwd)


@jax.custom_vjp
def scatter_rows(y_bmd: jax.Array, back_bl: jax.Array, idx_bm: jax.Array) -> jax.Array:
  """Places row m of ``y`` at slot ``idx[b, m]`` of a [b, l, d] array; other slots are 0.

  Computed as the gather ``y[b, back[b, j]]`` (``back`` as in :func:`gather_rows`, its
  out-of-range entries select a zero row); the gradient is ``gather_rows(g, idx, back)``.
  """
  m = y_bmd.shape[1]
  y_ext = jnp.concatenate([y_bmd, jnp.zeros_like(y_bmd[:, :1])], axis=1)
  return take(y_ext, jnp.minimum(back_bl, m))


def _scatter_fwd(y, back, idx):
  return scatter_rows(y, back, idx), (back, idx)


def _scatter_bwd(res, g):
  back, idx = res
  return gather_rows(g, idx, back), None, None


scatter_rows.defvjp(_scatter_fwd, _scatter_bwd)


def sort_permutation(*keys_bl: jax.Array) -> jax.Array:
  """Stable lexicographic argsort of int32 keys [b, l] along the slots; int32 [b, l]."""
  iota = jnp.broadcast_to(jnp.arange(keys_bl[0].shape[1], dtype=jnp.int32), keys_bl[0].shape)
  return jax.lax.sort((*keys_bl, iota), dimension=1, num_keys=len(keys_bl), is_stable=True)[-1]


def inverse_permutation(perm_bl: jax.Array) -> jax.Array:
  """``inv`` with ``inv[b, perm[b, j]] = j``, int32 [b, l] (a sort, no scatter)."""
  return sort_permutation(perm_bl)


class TokenInfo(NamedTuple):
  """Per-token arrays that travel with the hidden states through gathers (all [b, l, ...]).

  Attributes:
    positions: int32 [b, l], stream (RoPE) positions.
    segment_ids: int32 [b, l], packed-sample ids (0 = padding).
    rope: the RoPE tables of those positions (``attention.Rope``, float32 [b, l, head_dim] each),
      or None to compute them from ``positions`` where needed.
  """

  positions: jax.Array
  segment_ids: jax.Array
  rope: Any = None

  def take(self, idx_bm: jax.Array) -> TokenInfo:
    """The tokens at slots ``idx`` [b, m]."""
    return jax.tree.map(lambda a: take(a, idx_bm), self)


@dataclasses.dataclass(frozen=True)
class StreamLayout:
  """Where a layout row's slots go in stream order (all int32, computed once per forward pass).

  Attributes:
    order: [b, l] layout slot of each ordered slot.
    inverse: [b, l] ordered slot of each layout slot.
    frame_start: [b, f] ordered slot of each frame's first vision token.
    frame_of: [b, l] frame index of each ordered slot, -1 for text slots.
    offset: [b, l] index of each ordered vision slot within its frame (0 for text).
    num_text: T, text slots per row (static).
    tokens_per_frame: N (static).
    chunks: R, context chunks per row (static, module docstring); with R > 1 every field is of
      the folded rows ([b·R, l/R] etc.) and ``num_text`` is T/R.
  """

  order: jax.Array
  inverse: jax.Array
  frame_start: jax.Array
  frame_of: jax.Array
  offset: jax.Array
  num_text: int
  tokens_per_frame: int
  chunks: int = 1

  @property
  def is_vision(self) -> jax.Array:
    """bool [b, l]: the ordered slot holds a vision token."""
    return self.frame_of >= 0

  def to_stream(self, x_bl: jax.Array) -> jax.Array:
    """A layout array [b, l, ...] in stream order (exact; gradient is a gather)."""
    if x_bl.ndim == 2:
      return take(x_bl, self.order)
    return gather_rows(x_bl, self.order, self.inverse)

  def unchunked(self) -> StreamLayout:
    """The same layout read as ``b·R`` independent rows (chunks = 1)."""
    return dataclasses.replace(self, chunks=1)

  def frame_tokens(self) -> jax.Array:
    """Ordered slots of every vision token, int32 [b, f, n]."""
    return self.frame_start[..., None] + jnp.arange(self.tokens_per_frame, dtype=jnp.int32)


jax.tree_util.register_dataclass(
  StreamLayout,
  data_fields=["order", "inverse", "frame_start", "frame_of", "offset"],
  meta_fields=["num_text", "tokens_per_frame", "chunks"],
)


def context_chunks(rules: Rules | None) -> int:
  """R: the size of the mesh axes the ``length`` logical axis maps to in the current mesh (1
  without rules or mesh, e.g. an unsharded model or the batch-1 streaming step)."""
  mesh = jax.sharding.get_abstract_mesh()
  r = 1
  for a in mesh_axes_of("length", rules):
    r *= mesh.shape[a]
  return r


def _rows_spec(rules: Rules | None, ndim: int):
  """PartitionSpec of folded rows [b·R, ...]: the batch axes, then the length axes, on dim 0."""
  batch = logical_to_spec(("batch",), rules or ())[0]
  flat = (batch,) if isinstance(batch, str) else tuple(batch or ())
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in flat if a in mesh.axis_names) + mesh_axes_of("length", rules)
  return PartitionSpec(axes, *([None] * (ndim - 1)))


def fold(tree, chunks: int, rules: Rules | None = None):
  """Every array [b, L, ...] of ``tree`` → [b·R, L/R, ...] (R = ``chunks``): row b's chunk r
  becomes row b·R + r. Under a mesh with ``rules``, the folded rows are constrained to the batch
  axes then the context axes, so each device keeps exactly its own chunks (no data moves)."""
  if chunks == 1:
    return tree

  def one(x):
    y = x.reshape(x.shape[0] * chunks, x.shape[1] // chunks, *x.shape[2:])
    if rules and not jax.sharding.get_abstract_mesh().empty:
      y = jax.lax.with_sharding_constraint(y, _rows_spec(rules, y.ndim))
    return y

  return jax.tree.map(one, tree)


def unfold(tree, chunks: int):
  """Inverse of :func:`fold`: arrays [b·R, L/R, ...] → [b, L, ...]."""
  if chunks == 1:
    return tree
  return jax.tree.map(
    lambda x: x.reshape(x.shape[0] // chunks, x.shape[1] * chunks, *x.shape[2:]), tree
  )


def stream_layout(
  positions_bl: jax.Array,
  segment_ids_bl: jax.Array,
  *,
  num_text: int,
  tokens_per_frame: int,
  chunks: int = 1,
) -> StreamLayout:
  """The stream-order permutation of layout rows (module docstring).

  Args:
    positions_bl, segment_ids_bl: int32 [b, l] of the layout row (``num_text`` text slots, then
      frames of ``tokens_per_frame`` slots); positions are unique within a sample.
    num_text: T; tokens_per_frame: N (static).
    chunks: R when the rows are folded context chunks (module docstring): recorded in the
      result; the rows given are then the folded ones (num_text = T/R).
  Returns:
    The :class:`StreamLayout`. Real slots are sorted by (segment id, position); padding slots
    (segment 0) follow in layout order, which keeps padding frames contiguous too.
  Raises:
    ValueError: l - T is not a multiple of N.
  """
  b, l = positions_bl.shape
  n = tokens_per_frame
  if (l - num_text) % n:
    raise ValueError(
      f"row length {l} - num_text {num_text} is not a multiple of tokens_per_frame {n}."
    )
  f = (l - num_text) // n
  iota = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  pad = segment_ids_bl == 0
  seg_key = jnp.where(pad, jnp.iinfo(jnp.int32).max, segment_ids_bl)
  order = sort_permutation(seg_key, jnp.where(pad, iota, positions_bl))
  inverse = inverse_permutation(order)
  vis = order >= num_text
  frame_of = jnp.where(vis, (order - num_text) // n, -1)
  offset = jnp.where(vis, (order - num_text) % n, 0)
  frame_start = inverse[:, num_text::n][:, :f] if f else jnp.zeros((b, 0), jnp.int32)
  return StreamLayout(order, inverse, frame_start, frame_of, offset, num_text, n, chunks)
