"""Blockwise (flash) attention in pure JAX: O(L·block) memory, hand-written VJP, causal block skip.

FlashAttention-2 (Dao 2023, arXiv 2307.08691, Algorithms 1 and 2) written with ``lax.scan`` and
``lax.fori_loop`` instead of a kernel language, so it runs on any backend (it is the CPU default
of :func:`mod_jax.model.attention_ops.attend`). Queries are cut into blocks of ``bq`` rows and keys
into blocks of ``bk`` columns; only one ``[b, k, g, bq, bk]`` float32 score tile exists at a time.
Reverse mode only (``jax.custom_vjp``): works under jit, grad, scan and checkpoint, not jvp.

* Forward: for each query block, an online softmax over its key blocks (running max ``m``, running
  sum ``l``, float32 accumulator); saves only the output and the per-query logsumexp
  ``lse = m + log l`` (plus the inputs).
* Backward (recomputes the tiles): ``D = rowsum(dO·O)``, ``P = exp(S − lse)``, ``dV += Pᵀ dO``,
  ``dP = dO Vᵀ``, ``dS = P·(dP − D)``, ``dQ += dS K·scale``, ``dK += dSᵀ Q·scale``. The loop runs
  over query blocks outside and key blocks inside, like the forward; dK and dV (k heads, smaller
  than dQ's n heads under GQA) are the full-length float32 accumulators.
* Causal: key block j is visited for query block i only if it starts at or before the block's last
  query (``j·bk <= (i+1)·bq − 1``); the trip count depends on the block index, not on the data,
  which ``fori_loop`` allows because the VJP is ours.
* GQA: q is viewed as ``[b, k, g, bq, h]`` against k/v ``[b, k, bk, h]``; k/v are never repeated.
* Lengths that are not multiples of the block are padded inside; padded keys are masked, padded
  queries are sliced off.

Mask (per tile, from slot indices and segment ids; rows are in stream order)::

    mask[i, j] = (not causal or j <= i) and seg_q[i] == seg_kv[j] and seg_kv[j] != 0

A query that sees no key (a padding query, segment id 0) gets output 0 and passes no gradient to
anything: masked probabilities are exactly 0, not a uniform distribution as in the XLA reference.

Shape letters: b batch, t query tokens, s key tokens, n query heads, k KV heads, g = n / k,
h head dim; ``bq``/``bk`` block rows/columns, ``nq``/``nk`` number of blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """Static sizes of one call (hashable: it rides along as a non-differentiable argument)."""

  b: int
  t: int
  s: int
  k: int
  g: int
  h: int
  bq: int
  bk: int
  causal: bool
  has_segments: bool

  @property
  def nq(self) -> int:
    return -(-self.t // self.bq)

  @property
  def nk(self) -> int:
    return -(-self.s // self.bk)

  @property
  def key_padding(self) -> bool:
    """Whether padded key slots exist that no other part of the mask already hides."""
    return self.nk * self.bk != self.s and not self.has_segments and not self.causal

  @property
  def scale(self) -> float:
    return 1.0 / math.sqrt(self.h)


def _with_head_dim(c: _Tiling, h: int) -> _Tiling:
  return dataclasses.replace(c, h=h)


def blockwise_attention(
  q_btnh,
  k_bskh,
  v_bskh,
  q_segment_ids_bt=None,
  kv_segment_ids_bs=None,
  *,
  causal: bool,
  block_size: int = 512,
  q_offset: jax.Array | int = 0,
) -> jax.Array:
  """Flash attention (values and gradients) without an L×L tensor. Returns [b, t, n, h], q's dtype.

  q ``[b, t, n, h]``, k/v ``[b, s, k, h]`` (n % k == 0), any float dtype; matmuls accumulate and the
  softmax runs in float32; scale 1/sqrt(h). Segment ids int32 ``[b, t]`` / ``[b, s]`` or both None.
  ``block_size`` (tokens) bounds both block dims (a shorter sequence is a single block). Argument
  checking is :func:`mod_jax.model.attention_ops.attend`'s; call that. ``q_offset`` (int32 [] or
  an int): global slot of query 0 when the keys are the whole row and the queries one context
  chunk of it (causal mask j <= q_offset + i; key blocks past the chunk's last query skipped).
  """
  b, t, n, h = q_btnh.shape
  s, kh = k_bskh.shape[1], k_bskh.shape[2]
  tiling = _Tiling(
    b=b,
    t=t,
    s=s,
    k=kh,
    g=n // kh,
    h=h,
    bq=min(block_size, t),
    bk=min(block_size, s),
    causal=causal,
    has_segments=q_segment_ids_bt is not None,
  )
  offset = jnp.asarray(q_offset, jnp.int32)
  return _flash(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, offset, tiling)


# ---------------------------------------------------------------------------------------------
# Layout: [b, t, n, h] <-> blocks [nq, b, k, g, bq, h] (block index leading, for scan/indexing).


def _pad_to(x, axis: int, length: int):
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _q_blocks(x_btnh, c: _Tiling):
  x = _pad_to(x_btnh, 1, c.nq * c.bq).reshape(c.b, c.nq, c.bq, c.k, c.g, c.h)
  return x.transpose(1, 0, 3, 4, 2, 5)  # [nq, b, k, g, bq, h]


def _q_unblock(x_qbkgch, c: _Tiling):
  x = x_qbkgch.transpose(1, 0, 4, 2, 3, 5).reshape(c.b, c.nq * c.bq, c.k * c.g, c.h)
  return x[:, : c.t]


def _kv_blocks(x_bskh, c: _Tiling):
  x = _pad_to(x_bskh, 1, c.nk * c.bk).reshape(c.b, c.nk, c.bk, c.k, c.h)
  return x.transpose(1, 0, 3, 2, 4)  # [nk, b, k, bk, h]


def _kv_unblock(x_jbkch, c: _Tiling):
  x = x_jbkch.transpose(1, 0, 3, 2, 4).reshape(c.b, c.nk * c.bk, c.k, c.h)
  return x[:, : c.s]


def _seg_blocks(seg_bt, blocks: int, size: int):
  """int32 [b, t] -> [blocks, b, size], padded with segment 0 (never a key); None stays None."""
  if seg_bt is None:
    return None
  seg = _pad_to(seg_bt.astype(jnp.int32), 1, blocks * size)
  return seg.reshape(seg.shape[0], blocks, size).transpose(1, 0, 2)


def _tile_mask(i, j, q_seg_bq, kv_seg_bk, c: _Tiling, q_offset=0):
  """bool mask broadcastable to [b, k, g, bq, bk] for query block i and key block j, or None."""
  mask = None
  q_idx = q_offset + i * c.bq + jnp.arange(c.bq, dtype=jnp.int32)
  k_idx = j * c.bk + jnp.arange(c.bk, dtype=jnp.int32)
  if c.causal:
    mask = k_idx[None, :] <= q_idx[:, None]
  if c.key_padding:
    valid = jnp.broadcast_to(k_idx[None, :] < c.s, (c.bq, c.bk))
    mask = valid if mask is None else mask & valid
  if mask is not None:
    mask = mask[None, None, None]
  if c.has_segments:
    same = (q_seg_bq[:, :, None] == kv_seg_bk[:, None, :]) & (kv_seg_bk[:, None, :] != 0)
    same = same[:, None, None]  # [b, 1, 1, bq, bk]
    mask = same if mask is None else mask & same
  return mask


def _key_blocks_for(i, c: _Tiling, q_offset=0):
  """Number of key blocks query block i visits: all, or (causal) up to its last query."""
  if not c.causal:
    return c.nk
  return jnp.minimum(c.nk, (q_offset + (i + 1) * c.bq - 1) // c.bk + 1)


def _scores(q_i, k_j, c: _Tiling):
  s = jnp.einsum("bkgqh,bkch->bkgqc", q_i, k_j, preferred_element_type=_F32)
  return s * c.scale


# ---------------------------------------------------------------------------------------------
# Forward and backward.


def _forward(q_btnh, k_bskh, v_bskh, q_seg_bt, kv_seg_bs, q_offset, c: _Tiling):
  """Returns out [b, t, n, h] (q's dtype) and lse float32 [nq, b, k, g, bq] (0 for empty rows)."""
  qb, kb, vb = _q_blocks(q_btnh, c), _kv_blocks(k_bskh, c), _kv_blocks(v_bskh, c)
  q_seg, kv_seg = _seg_blocks(q_seg_bt, c.nq, c.bq), _seg_blocks(kv_seg_bs, c.nk, c.bk)

  def q_block(_, xs):
    i, q_i, q_seg_i = xs

    def kv_block(j, carry):
      m, l, acc = carry
      k_j, v_j = kb[j], vb[j]
      s = _scores(q_i, k_j, c)
      mask = _tile_mask(i, j, q_seg_i, None if kv_seg is None else kv_seg[j], c, q_offset)
      if mask is not None:
        s = jnp.where(mask, s, _MASK_VALUE)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)  # an all-masked row stays at l = 0
      alpha = jnp.exp(m - m_new)
      l = alpha * l + p.sum(axis=-1)
      pv = jnp.einsum("bkgqc,bkch->bkgqh", p.astype(v_j.dtype), v_j, preferred_element_type=_F32)
      return m_new, l, alpha[..., None] * acc + pv

    shape = (c.b, c.k, c.g, c.bq)
    init = (
      jnp.full(shape, _MASK_VALUE, _F32),
      jnp.zeros(shape, _F32),
      jnp.zeros((*shape, c.h), _F32),
    )
    m, l, acc = jax.lax.fori_loop(0, _key_blocks_for(i, c, q_offset), kv_block, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    out = (acc / l_safe[..., None]).astype(q_btnh.dtype)
    lse = jnp.where(seen, m + jnp.log(l_safe), 0.0)
    return None, (out, lse)

  _, (out, lse) = jax.lax.scan(q_block, None, (jnp.arange(c.nq), qb, q_seg))
  return _q_unblock(out, c), lse


def _backward(
  q_btnh, k_bskh, v_bskh, q_seg_bt, kv_seg_bs, q_offset, out_btnh, lse, dout_btnh, c: _Tiling
):
  """FlashAttention-2 backward: returns dq, dk, dv in the inputs' shapes and dtypes."""
  qb, kb, vb = _q_blocks(q_btnh, c), _kv_blocks(k_bskh, c), _kv_blocks(v_bskh, c)
  dob = _q_blocks(dout_btnh.astype(q_btnh.dtype), c)
  delta = jnp.sum(dout_btnh.astype(_F32) * out_btnh.astype(_F32), axis=-1, keepdims=True)
  delta = _q_blocks(delta, _with_head_dim(c, 1))[..., 0]  # D = rowsum(dO · O), [nq, b, k, g, bq]
  q_seg, kv_seg = _seg_blocks(q_seg_bt, c.nq, c.bq), _seg_blocks(kv_seg_bs, c.nk, c.bk)

  def q_block(carry, xs):
    i, q_i, do_i, lse_i, delta_i, q_seg_i = xs

    def kv_block(j, inner):
      dq_i, dk_acc, dv_acc = inner
      k_j, v_j = kb[j], vb[j]
      p = jnp.exp(_scores(q_i, k_j, c) - lse_i[..., None])
      mask = _tile_mask(i, j, q_seg_i, None if kv_seg is None else kv_seg[j], c, q_offset)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv_j = jnp.einsum(
        "bkgqc,bkgqh->bkch", p.astype(do_i.dtype), do_i, preferred_element_type=_F32
      )
      dp = jnp.einsum("bkgqh,bkch->bkgqc", do_i, v_j, preferred_element_type=_F32)
      ds = p * (dp - delta_i[..., None])
      dq_i = dq_i + jnp.einsum(
        "bkgqc,bkch->bkgqh", ds.astype(k_j.dtype), k_j, preferred_element_type=_F32
      )
      dk_j = jnp.einsum("bkgqc,bkgqh->bkch", ds.astype(q_i.dtype), q_i, preferred_element_type=_F32)
      dk_acc = jax.lax.dynamic_update_index_in_dim(dk_acc, dk_acc[j] + dk_j, j, 0)
      dv_acc = jax.lax.dynamic_update_index_in_dim(dv_acc, dv_acc[j] + dv_j, j, 0)
      return dq_i, dk_acc, dv_acc

    dq_i = jnp.zeros((c.b, c.k, c.g, c.bq, c.h), _F32)
    dq_i, dk_acc, dv_acc = jax.lax.fori_loop(
      0, _key_blocks_for(i, c, q_offset), kv_block, (dq_i, *carry)
    )
    return (dk_acc, dv_acc), (dq_i * c.scale).astype(q_i.dtype)

  acc = jnp.zeros((c.nk, c.b, c.k, c.bk, c.h), _F32)
  (dk, dv), dq = jax.lax.scan(q_block, (acc, acc), (jnp.arange(c.nq), qb, dob, lse, delta, q_seg))
  dq = _q_unblock(dq, c)
  dk = _kv_unblock(dk * c.scale, c).astype(k_bskh.dtype)
  dv = _kv_unblock(dv, c).astype(v_bskh.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, q_offset, c: _Tiling):
  return _forward(q, k, v, q_seg, kv_seg, q_offset, c)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_offset, c: _Tiling):
  out, lse = _forward(q, k, v, q_seg, kv_seg, q_offset, c)
  return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _flash_bwd(c: _Tiling, residuals, dout):
  q, k, v, q_seg, kv_seg, q_offset, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, q_offset, out, lse, dout, c)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
