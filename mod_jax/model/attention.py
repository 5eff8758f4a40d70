"""Grouped-query self-attention with RoPE; the decoder's attention layer and its KV cache.

Two masks, one meaning (``mask[q, k] = seg_q == seg_k != 0 and pos_k <= pos_q``):

* **Stream order** (training and evaluation): the decoder keeps each row in stream order
  (``mod_jax/model/rows.py``), so the mask is causal in slot order within a segment and any
  kernel can run it: ``attention_ops.attend`` dispatches to ``xla`` | ``blockwise`` | ``splash``
  | ``cudnn`` (``model.attention``). A MoD layer's compact sequence is a subsequence in the same
  order, with the ORIGINAL positions (γ-MoD's renumbering to 0..k-1 is deliberately not copied).
* **By position** (any slot order; the reference, and the KV-cache path): the mask is built from
  each token's RoPE position and segment id, materialising the [t, s] scores.

RoPE tables (cos, sin) are computed once per forward pass from the positions and shared by every
layer (:func:`rope_tables`).

Streaming inference passes a layer its :class:`KVCache` explicitly (:meth:`Attention.cached`,
which returns the updated cache; training never sees one). The call writes its keys/values into the
cache and attends over every cached entry with the position mask; in a MoD layer the call sees
only the text and kept vision tokens, so only those are cached (``mod_jax.infer.streaming``).
Keys are cached UNROTATED with their stream positions and rotated when read, at positions
shifted by the caller's ``rope_offset`` (the pinned prefix excepted): a long stream whose oldest
entries were evicted is re-based so that its RoPE positions stay in the trained range
(``docs/streaming.md``).

Shape letters: b batch, t query tokens, s key tokens, d model width, n query heads, k KV heads,
g query heads per KV head (n = k·g), h head dim.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mod_jax.model import attention_ops, lora
from mod_jax.model.layers import dense_init
from mod_jax.model.linalg import project
from mod_jax.model.partitioning import param, shard

_zeros = nnx.initializers.zeros_init()


def rope_inv_freq(head_dim: int, theta: float, scaling: Any = None) -> np.ndarray:
  """RoPE inverse frequencies, float32 [head_dim // 2], incl. Llama-3 and linear scaling.

  ``scaling`` is None or a mapping with ``rope_type`` in {"default", "linear", "llama3"} and
  ``factor`` (+ ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``
  for llama3), following transformers' ``modeling_rope_utils``.
  """
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv = inv.astype(np.float32)
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind in (None, "default"):
    return inv
  factor = float(scaling["factor"])
  if kind == "linear":
    return (inv / factor).astype(np.float32)
  if kind == "llama3":
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"rope scaling type {kind!r} is not supported; use default, linear or llama3.")


class Rope(NamedTuple):
  """RoPE tables of a row: cos and sin, float32 [b, t, head_dim] (``rotate_half`` layout).

  Computed once per forward pass from the positions (:func:`rope_tables`) and shared by q, k and
  every decoder layer; a MoD layer gathers the rows of its compact sequence.
  """

  cos: jax.Array
  sin: jax.Array


def rope_tables(positions_bt: jax.Array, inv_freq) -> Rope:
  """cos/sin of ``positions`` (int32 [b, t]) times ``inv_freq`` (float32 [head_dim // 2])."""
  freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return Rope(jnp.cos(emb), jnp.sin(emb))


def apply_rope(x_btnh: jax.Array, rope: Rope) -> jax.Array:
  """Rotates halves of the head dim (transformers' ``rotate_half`` convention), in float32.

  ``x·cos + rotate_half(x)·sin`` written per half (the tables' halves are equal), so that XLA
  fuses it into one pass from ``x`` to the output: concatenating ``[-x2, x1]`` first made XLA:TPU
  materialise float32 ``x`` and both negated halves (3 x 66 MB for one dense layer's keys in the
  8B streaming step, where the whole cache is rotated at read time)."""
  half = x_btnh.shape[-1] // 2
  cos, sin = rope.cos[:, :, None, :half], rope.sin[:, :, None, :half]
  x1 = x_btnh[..., :half].astype(jnp.float32)
  x2 = x_btnh[..., half:].astype(jnp.float32)
  y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return y.astype(x_btnh.dtype)


def attention_mask(q_pos_bt, q_seg_bt, k_pos_bs, k_seg_bs) -> jax.Array:
  """Causal-by-position, same-segment mask, bool [b, t, s]; segment 0 (padding) is never a key."""
  same = (q_seg_bt[:, :, None] == k_seg_bs[:, None, :]) & (k_seg_bs[:, None, :] != 0)
  return same & (k_pos_bs[:, None, :] <= q_pos_bt[:, :, None])


class Attention(nnx.Module):
  """Llama/Qwen2 attention: q/k/v projections (optional biases), RoPE, GQA, output projection.

  Weights use einsum layouts: q ``[d, n, h]``, k/v ``[d, k, h]``, o ``[n, h, d]``.
  """

  q_bias: nnx.Param | None  # Qwen2 q/k/v biases; None for Llama
  k_bias: nnx.Param | None
  v_bias: nnx.Param | None

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    d, n, kh, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.q = param(rngs, dense_init(d), (d, n, h), ("embed", "heads", "head_dim"), pdt)
    self.k = param(rngs, dense_init(d), (d, kh, h), ("embed", "kv_heads", "head_dim"), pdt)
    self.v = param(rngs, dense_init(d), (d, kh, h), ("embed", "kv_heads", "head_dim"), pdt)
    self.o = param(rngs, dense_init(n * h), (n, h, d), ("heads", "head_dim", "embed"), pdt)
    if cfg.qkv_bias:
      self.q_bias = param(rngs, _zeros, (n, h), ("heads", "head_dim"), pdt)
      self.k_bias = param(rngs, _zeros, (kh, h), ("kv_heads", "head_dim"), pdt)
      self.v_bias = param(rngs, _zeros, (kh, h), ("kv_heads", "head_dim"), pdt)
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    # A tuple (static), not an array: NNX would treat an array attribute as model state.
    self.inv_freq = tuple(
      float(f) for f in rope_inv_freq(h, cfg.rope_theta, _as_dict(cfg.get("rope_scaling")))
    )
    self.dtype = jnp.dtype(cfg.dtype)
    self.implementation = cfg.get("attention", "xla")
    self.block_size = int(cfg.get("attention_block_size", 512))
    self.platform = cfg.get("attention_platform", "") or None
    self.rules = rules

  def projections(self, x_btd: jax.Array, rng: jax.Array | None = None):
    """Unrotated q [b, t, n, h], k and v [b, t, k, h] (biases and LoRA included).

    ``rng`` is the LoRA dropout key (``mod_jax/model/lora.py``; training only).
    """
    x = x_btd.astype(self.dtype)

    def proj(name, bias, i):
      y = project(x, getattr(self, name)[...].astype(self.dtype))
      y = y if bias is None else y + bias[...].astype(self.dtype)
      delta = lora.adapter(self, name, x, lora.fold(rng, i), self.dtype)  # None without LoRA
      return y if delta is None else y + delta

    return proj("q", self.q_bias, 0), proj("k", self.k_bias, 1), proj("v", self.v_bias, 2)

  def qkv(
    self,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    rng: jax.Array | None = None,
    rope: Rope | None = None,
  ):
    """Projects and rotates: returns q [b, t, n, h], k and v [b, t, k, h].

    ``rope``: the row's tables (:func:`rope_tables`), computed here from ``positions`` if None.
    ``rng`` is the LoRA dropout key. The projections are named ``query_proj`` / ``key_proj`` /
    ``value_proj`` for remat policies (``mod_jax.model.llm.REMAT_POLICIES``).
    """
    rope = rope_tables(positions_bt, self.inv_freq) if rope is None else rope
    q, k, v = self.projections(x_btd, rng)
    q = checkpoint_name(apply_rope(q, rope), "query_proj")
    k = checkpoint_name(apply_rope(k, rope), "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = shard(q, ("batch", "length", "heads", "head_dim"), self.rules)
    k = shard(k, ("batch", "length", "kv_heads", "head_dim"), self.rules)
    return q, k, v

  def out(self, o_btnh: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    y = project(o_btnh, self.o[...].astype(self.dtype), n_in=2)
    delta = lora.adapter(self, "o", o_btnh, lora.fold(rng, 3), self.dtype)
    return y if delta is None else y + delta

  def __call__(
    self,
    x_btd,
    positions_bt,
    segment_ids_bt,
    rng=None,
    *,
    rope: Rope | None = None,
    ordered: bool = False,
  ) -> jax.Array:
    """Self-attention over the given tokens. x [b, t, d]; positions, segment_ids int32 [b, t].

    ``ordered=True`` promises the tokens are in stream order (``mod_jax/model/rows.py``): the
    mask is then causal in slot order within a segment and runs on the configured kernel
    (``attention_ops.attend``). Otherwise the mask is built from positions (any slot order;
    the reference path, materialising the [t, t] scores). ``rng``: LoRA dropout key. The
    attention output before the out-projection is named ``context``, the layer's output
    ``out_proj`` (LoRA included), for remat policies.
    """
    q, k, v = self.qkv(x_btd, positions_bt, rng, rope)
    if ordered:
      o = attention_ops.attend(
        q,
        k,
        v,
        segment_ids_bt,
        segment_ids_bt,
        causal=True,
        implementation=self.implementation,
        block_size=self.block_size,
        backend=self.platform,
        rules=self.rules,
      )
    else:
      mask = attention_mask(positions_bt, segment_ids_bt, positions_bt, segment_ids_bt)
      o = attention_ops.masked_attention(q, k, v, mask)
    o = checkpoint_name(o, "context")
    return checkpoint_name(self.out(o, rng), "out_proj")

  def cached(
    self,
    x_btd,
    positions_bt,
    segment_ids_bt,
    cache: KVCache,
    *,
    rope_offset=0,
    rope: Rope | None = None,
    visible: jax.Array | None = None,
    row=None,
  ) -> tuple[jax.Array, KVCache]:
    """Attention of new tokens over a KV cache (streaming inference); returns (y, new cache).

    The tokens' unrotated keys/values are written to ``cache`` (padding, segment id 0, takes no
    slot) and the queries attend over every cached entry, the new ones included, with the
    position mask. Keys are rotated at read time at :meth:`KVCache.rope_positions`, queries at
    ``positions - rope_offset``: RoPE scores depend on position differences only, so a stream
    re-based by ``rope_offset`` attends as one that started at the pinned prefix's end.

    Args:
      x_btd: [b, t, d] new tokens (any slot order).
      positions_bt, segment_ids_bt: int32 [b, t], absolute stream positions (the mask's order).
      cache: this layer's :class:`KVCache`.
      rope_offset: int32 [] subtracted from the positions of the queries and of the unpinned
        cache entries before rotation (0: absolute positions).
      rope: the queries' tables at ``positions - rope_offset``; computed here if None.
      visible: bool [b, size] or None: the cache slots the queries may attend to after the write
        (a per-step view: DyCoke's dynamic KV pruning hides unselected image entries, which stay
        in the cache; ``mod_jax/compress/apply.py``); None: every live entry.
      row: None, or an int / int32 []: ``cache`` is a stack of layers' caches (a leading
        ``[layers]`` axis on every field) and this layer's is row ``row``: the entries are
        written into that row of the stacked arrays (:meth:`KVCache.write`), and the returned
        cache is the whole stack.
    """
    q, k, v = self.projections(x_btd)
    if rope is None:
      rope = rope_tables(positions_bt - rope_offset, self.inv_freq)
    q = apply_rope(q, rope)
    cache = cache.write(k, v, positions_bt, segment_ids_bt, row=row)
    mine = cache if row is None else cache.row(row)  # slices of the stack, read in place
    keys = apply_rope(mine.k, rope_tables(mine.rope_positions(rope_offset), self.inv_freq))
    mask = attention_mask(positions_bt, segment_ids_bt, mine.positions, mine.segment_ids)
    if visible is not None:
      mask = mask & visible[:, None, :]
    o = attention_ops.masked_attention(q, keys, mine.v, mask)
    return self.out(o), cache


class KVCache(NamedTuple):
  """Static-shape key/value cache of one attention layer (streaming inference, docs/design.md §2).

  A pytree of arrays, passed to :meth:`Attention.cached` and returned updated (no module state).
  ``size`` slots hold UNROTATED keys and values with their absolute stream positions and segment
  ids; segment id 0 marks an empty or evicted slot, which the mask never attends to. Slot order is
  irrelevant (the mask is built from positions), so the slots after the pinned prefix form a ring:
  the j-th real entry of a row (counting every entry ever written to it) goes to slot
  ``ring_start + (j - ring_start) mod (size - ring_start)``; padding (segment 0) takes no slot.
  Entries written before :meth:`pin` (the system prompt) are never overwritten. The caller decides
  what to evict (:meth:`evict_before`) so that a write never lands on a live entry; a write that
  would is still performed but COUNTED in ``overwritten`` so the caller can refuse the result.

  Fields: k, v ``[b, size, k, h]`` (compute dtype); positions, segment_ids int32 ``[b, size]``;
  written, ring_start int32 ``[b]``; overwritten int32 ``[]``. The caches of a stack of layers
  (``mod_jax.infer.streaming.empty_caches``) are one KVCache with a leading ``[layers]`` axis on
  every field: :meth:`pin`, :meth:`pinned`, :meth:`evict_before` act on all of its layers at
  once; :meth:`write` writes one layer's row of it (``row=``) in place, :meth:`row` is one
  layer's cache, and :meth:`rope_positions` takes one layer's cache.
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  written: jax.Array
  ring_start: jax.Array
  overwritten: jax.Array

  @classmethod
  def empty(cls, batch: int, size: int, n_kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An empty cache of ``size`` slots. Raises ValueError for size < 1."""
    if size < 1:
      raise ValueError(f"KVCache size={size} must be >= 1.")
    kv = jnp.zeros((batch, size, n_kv_heads, head_dim), dtype)
    ids = jnp.zeros((batch, size), jnp.int32)
    row = jnp.zeros((batch,), jnp.int32)
    return cls(kv, kv, ids, ids, row, row, jnp.zeros((), jnp.int32))

  @property
  def size(self) -> int:
    return self.positions.shape[-1]

  def write(self, k_btkh, v_btkh, positions_bt, segment_ids_bt, row=None) -> KVCache:
    """Appends the real (segment id != 0) entries of [b, t] new tokens; padding is dropped.

    ``row`` (an int or int32 []): this is a stack's cache ([layers, ...] on every field) and the
    entries go to row ``row``; the whole stack is returned, changed only at the new entries'
    slots of that row. The new entries alone are scattered into the stacked arrays, so a
    donated or scan-carried stack is updated in place: no copy of the row (one layer's cache)
    is made, as slicing the row out, writing it and setting it back would.
    """
    one = self if row is None else self.row(row)
    size = self.size
    real = segment_ids_bt != 0
    rank = jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1  # index among the row's real entries
    j = one.written[:, None] + rank
    start = one.ring_start[:, None]
    slots = jnp.where(real, start + (j - start) % (size - start), size)  # size: dropped
    rows = jnp.arange(slots.shape[0])[:, None]
    hit = jnp.take_along_axis(one.segment_ids, jnp.minimum(slots, size - 1), axis=1) != 0
    at = (rows, slots) if row is None else (row, rows, slots)
    put = lambda dst, x: dst.at[at].set(x.astype(dst.dtype), mode="drop")
    new = lambda dst, x: x if row is None else dst.at[row].set(x)
    return KVCache(
      k=put(self.k, k_btkh),
      v=put(self.v, v_btkh),
      positions=put(self.positions, positions_bt),
      segment_ids=put(self.segment_ids, segment_ids_bt),
      written=new(self.written, one.written + jnp.sum(real, axis=1, dtype=jnp.int32)),
      ring_start=self.ring_start,
      overwritten=new(self.overwritten, one.overwritten + jnp.sum(hit & real, dtype=jnp.int32)),
    )

  def row(self, r) -> KVCache:
    """Row ``r`` (an int or int32 []) of a stack's cache: one layer's :class:`KVCache`."""
    return jax.tree.map(lambda a: a[r], self)

  def pin(self) -> KVCache:
    """Keeps every entry written so far forever; later writes cycle through the other slots."""
    return self._replace(ring_start=self.written)

  def pinned(self) -> jax.Array:
    """bool [b, size]: the slots of the pinned prefix."""
    return jnp.arange(self.size, dtype=jnp.int32) < self.ring_start[..., None]

  def evict_before(self, position) -> KVCache:
    """Empties the unpinned slots whose position is < ``position`` (int32 [])."""
    old = ~self.pinned() & (self.positions < position)
    return self._replace(segment_ids=jnp.where(old, 0, self.segment_ids))

  def rope_positions(self, rope_offset) -> jax.Array:
    """int32 [b, size]: the positions keys are rotated at, ``position - rope_offset`` except
    for the pinned prefix, which keeps its own."""
    return jnp.where(self.pinned(), self.positions, self.positions - rope_offset)


def _as_dict(x):
  if x is None:
    return None
  return dict(x.to_dict() if hasattr(x, "to_dict") else x)
