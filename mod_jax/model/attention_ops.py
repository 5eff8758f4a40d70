"""Attention dispatcher: one call, four implementations (XLA reference, blockwise, splash, cuDNN).

Every path computes the same thing for rows kept in stream order (slot order = time order within a
packed sample, padding with segment id 0 at the end of a row; MoD's compact subsequences keep that
order)::

    mask[i, j] = (not causal or j <= i) and seg_q[i] == seg_kv[j] and seg_kv[j] != 0
    out = softmax(q kᵀ / sqrt(h) where mask) v          (float32 softmax and accumulation)

Outputs at padding queries (segment id 0) are unspecified but finite; nothing else depends on them.

Implementations (:data:`IMPLEMENTATIONS`; ``"auto"`` picks one per backend,
:func:`resolve_implementation`):

* ``xla``: the reference; materialises the ``[b, k, g, t, s]`` float32 scores (O(L²) memory), as
  ``mod_jax/model/attention.py`` does. A row with no visible key gets a uniform distribution.
* ``blockwise``: pure-JAX FlashAttention-2 with a hand-written VJP, O(L·block) memory, causal block
  skipping (``mod_jax/model/blockwise_attention.py``). Any backend; the CPU default.
* ``splash``: TPU Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``),
  GQA natively (its MHA kernel maps query head n to KV head n // g), vmapped over the batch. Off
  TPU it runs in Pallas interpret mode (slow; tests only). Lengths are padded to a multiple of its
  block (a multiple of 128). Lowers and compiles ahead of time for a TPU topology from a CPU host
  when called with ``backend="tpu"`` (that is what selects the compiled, not interpreted, kernel);
  under a mesh it needs ``rules`` (it runs in a ``shard_map``: XLA cannot partition a kernel).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` with the segment mask as a
  boolean ``[b, 1, t, s]`` mask (cuDNN turns it into an additive bias: O(L²) memory for the mask
  alone) plus ``is_causal``. GPU only, bf16/fp16 only.

Shape letters: b batch, t query tokens, s key tokens, n query heads, k KV heads, g = n / k query
heads per KV head, h head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mod_jax.model.blockwise_attention import blockwise_attention
from mod_jax.model.partitioning import Rules, logical_to_spec

IMPLEMENTATIONS = ("xla", "blockwise", "splash", "cudnn")
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "cpu": "blockwise"}
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_SPLASH_LANES = 128  # splash needs every block (and so the padded length) a multiple of 128


def resolve_implementation(name: str, backend: str | None = None) -> str:
  """Maps ``"auto"`` to the backend's kernel and validates any other name.

  ``"auto"``: ``"splash"`` on ``tpu``, ``"cudnn"`` on ``gpu`` (or ``cuda``), ``"blockwise"``
  elsewhere (cpu, rocm, ...). ``backend`` defaults to ``jax.default_backend()``; pass the target's
  platform when compiling ahead of time for other hardware.

  Raises:
    ValueError: ``name`` is neither ``"auto"`` nor one of :data:`IMPLEMENTATIONS`.
  """
  if name == "auto":
    return _AUTO.get(backend or jax.default_backend(), "blockwise")
  if name not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {name!r} is not known; choose one of "
      f"{('auto',) + IMPLEMENTATIONS}."
    )
  return name


def attend(
  q_btnh,
  k_bskh,
  v_bskh,
  q_segment_ids_bt=None,
  kv_segment_ids_bs=None,
  *,
  causal: bool,
  implementation: str = "xla",
  block_size: int = 512,
  backend: str | None = None,
  rules: Rules | None = None,
  head_names: tuple[str, str] = ("heads", "kv_heads"),
) -> jax.Array:
  """Scaled dot-product attention with GQA, causal and packed-segment masks. [b, t, n, h].

  Args:
    q_btnh: queries ``[b, t, n, h]``, any float dtype (bf16 or f32).
    k_bskh, v_bskh: keys and values ``[b, s, k, h]`` with ``n % k == 0`` (k == n: MHA; k == 1: MQA),
      q's dtype.
    q_segment_ids_bt, kv_segment_ids_bs: int32 ``[b, t]`` and ``[b, s]``, both or neither. Segment
      0 is padding: never a key. None: no segment mask (e.g. the vision tower).
    causal: key slot j is visible to query slot i only if j <= i (slot order is stream order);
      requires t == s.
    implementation: ``"auto"`` or one of :data:`IMPLEMENTATIONS` (module docstring).
    block_size: tokens per block for ``blockwise`` (both dims; clipped to the length) and
      ``splash`` (rounded down to a multiple of 128, at least 128); ignored by ``xla``/``cudnn``.
    backend: the platform the call is compiled for (default ``jax.default_backend()``). Used by
      ``auto``, by ``splash`` (interpret mode unless ``"tpu"``) and by ``cudnn`` (needs ``"gpu"``).
    rules, head_names: logical axis rules (``config.mesh.logical_axis_rules``) and the logical
      names of the q and k/v head dims. Used by ``splash`` only, and only under a mesh
      (``jax.set_mesh``): a Pallas kernel cannot be partitioned by XLA, so it runs in a
      ``shard_map`` over the batch and head axes (:func:`_per_shard`). The other paths are plain
      XLA and are partitioned like the rest of the model.

  Returns:
    ``[b, t, n, h]`` in q's dtype; scale 1/sqrt(h); matmuls accumulate and the softmax runs in
    float32. Outputs at padding queries (segment id 0) are unspecified but finite.

  Raises:
    ValueError: unknown implementation, inconsistent shapes, one segment-id array without the
      other, causal with t != s, block_size < 1, cudnn off GPU or with a float32 input, splash
      under rules that shard the ``length`` axis.
  """
  backend = backend or jax.default_backend()
  implementation = resolve_implementation(implementation, backend)
  _check(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, causal, block_size)
  if q_segment_ids_bt is not None:
    q_segment_ids_bt = jnp.asarray(q_segment_ids_bt, jnp.int32)
    kv_segment_ids_bs = jnp.asarray(kv_segment_ids_bs, jnp.int32)
  args = (q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs)
  if implementation == "xla":
    return xla_attention(*args, causal=causal)
  if implementation == "blockwise":
    return blockwise_attention(*args, causal=causal, block_size=block_size)
  if implementation == "splash":
    kernel = functools.partial(
      splash_attention, causal=causal, block_size=block_size, interpret=backend != "tpu"
    )
    return _per_shard(kernel, args, rules, head_names)
  return cudnn_attention(*args, causal=causal, backend=backend)


def _check(q, k, v, q_seg, kv_seg, causal, block_size):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"attend takes q [b, t, n, h] and k, v [b, s, k, h]; got q {q.shape}, "
      f"k {k.shape}, v {v.shape}."
    )
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(
      f"k {k.shape} and v {v.shape} must both be [b={b}, s, k, h={h}] for q {q.shape}."
    )
  if n % k.shape[2]:
    raise ValueError(f"query heads n={n} must be a multiple of KV heads k={k.shape[2]}.")
  if (q_seg is None) != (kv_seg is None):
    raise ValueError("pass both q_segment_ids_bt and kv_segment_ids_bs, or neither.")
  if q_seg is not None and (np.shape(q_seg) != (b, t) or np.shape(kv_seg) != (b, k.shape[1])):
    raise ValueError(
      f"segment ids must be [b, t]={b, t} and [b, s]={b, k.shape[1]}; got "
      f"{np.shape(q_seg)} and {np.shape(kv_seg)}."
    )
  if causal and t != k.shape[1]:
    raise ValueError(
      f"causal attention needs as many queries as keys (t == s); got t={t}, s={k.shape[1]}."
    )
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1.")


def _per_shard(fn, args, rules, head_names):
  """Runs ``fn(q, k, v, q_seg, kv_seg)`` in a ``shard_map`` over the context mesh (if any).

  Batch and head dims keep the shardings their logical names map to; a dim whose size the mesh
  axes do not divide, or head dims whose q and k/v shardings differ (GQA groups would be split),
  are replicated instead. The sequence must not be sharded (each shard needs whole rows).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  rules = rules or ()  # no rules under a mesh (e.g. a batch-1 streaming step): replicated
  q, k, _, q_seg, _ = args
  q_names = logical_to_spec(("batch", "length", head_names[0], "head_dim"), rules)
  kv_names = logical_to_spec(("batch", "length", head_names[1], "head_dim"), rules)
  if q_names[1] is not None or q_names[3] is not None:
    raise ValueError(
      f"splash attention needs whole rows and heads per device, but the rules "
      f"shard 'length'/'head_dim' as {q_names}; map them to None."
    )

  def size(axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)

  batch = q_names[0] if q.shape[0] % size(q_names[0]) == 0 else None
  heads, kv_heads = q_names[2], kv_names[2]
  if heads != kv_heads or q.shape[2] % size(heads) or k.shape[2] % size(kv_heads):
    heads = kv_heads = None
  q_spec = PartitionSpec(batch, None, heads, None)
  kv_spec = PartitionSpec(batch, None, kv_heads, None)
  seg_spec = PartitionSpec(batch, None)
  if q_seg is None:
    mapped = jax.shard_map(
      lambda q, k, v: fn(q, k, v, None, None),
      mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec),
      out_specs=q_spec,
      check_vma=False,
    )
    return mapped(*args[:3])
  mapped = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
    out_specs=q_spec,
    check_vma=False,
  )
  return mapped(*args)


def segment_mask(q_segment_ids_bt, kv_segment_ids_bs, t: int, s: int, causal: bool):
  """The module's mask, bool broadcastable to ``[b, t, s]`` (None when nothing is masked)."""
  mask = None
  if causal:
    mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
  if q_segment_ids_bt is not None:
    same = (q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]) & (
      kv_segment_ids_bs[:, None, :] != 0
    )
    mask = same if mask is None else mask & same
  return mask


def xla_attention(
  q_btnh, k_bskh, v_bskh, q_segment_ids_bt=None, kv_segment_ids_bs=None, *, causal: bool
) -> jax.Array:
  """Reference: full ``[b, k, g, t, s]`` float32 scores; masked rows become uniform, not NaN.

  Same contract as :func:`attend` (which checks the arguments). Memory O(b·n·t·s).
  """
  t, s = q_btnh.shape[1], k_bskh.shape[1]
  mask = segment_mask(q_segment_ids_bt, kv_segment_ids_bs, t, s, causal)
  return masked_attention(q_btnh, k_bskh, v_bskh, mask)


def masked_attention(q_btnh, k_bskh, v_bskh, mask_bts=None) -> jax.Array:
  """GQA attention under any boolean mask broadcastable to [b, t, s] (None: no mask), scores and
  softmax in float32; fully masked rows get a uniform distribution, not NaN. [b, t, n, h] in q's
  dtype. Memory O(b·n·t·s): the reference path, and the KV-cache path of streaming inference.
  """
  b, t, n, h = q_btnh.shape
  kh = k_bskh.shape[2]
  q = q_btnh.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(h)
  if mask_bts is not None:
    logits = jnp.where(mask_bts[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def _splash_blocks(length: int, block_size: int) -> tuple[int, int]:
  """(block, padded length) for splash: block a multiple of 128 that divides the padded length."""
  block = max(_SPLASH_LANES, block_size // _SPLASH_LANES * _SPLASH_LANES)
  padded = -(-length // _SPLASH_LANES) * _SPLASH_LANES
  if padded <= block:
    return padded, padded
  return block, -(-length // block) * block


def _pad_axis1(x, length: int):
  if x.shape[1] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, length - x.shape[1])
  return jnp.pad(x, widths)


def splash_attention(
  q_btnh,
  k_bskh,
  v_bskh,
  q_segment_ids_bt=None,
  kv_segment_ids_bs=None,
  *,
  causal: bool,
  block_size: int = 512,
  interpret: bool = False,
) -> jax.Array:
  """Pallas TPU splash attention (``make_splash_mha``), vmapped over the batch. [b, t, n, h].

  Same contract as :func:`attend`. q is pre-scaled by 1/sqrt(h) in float32 (splash applies no
  scale) and cast back to its dtype. t and s are padded with segment 0 to multiples of their
  blocks (:func:`_splash_blocks`); without segment ids a non-causal call with padded keys gets
  segment ids 1 (real) / 0 (padding). Splash compares segment ids and has no "kv segment != 0"
  term, so padding queries (segment 0) see padding keys only, never real ones; a row that sees
  nothing gets a uniform distribution, as in the XLA path: finite either way. The mask is static
  (``CausalMask``/``FullMask``: blocks above the diagonal are skipped); only segment ids are data.
  ``interpret=True`` runs the kernel in Pallas interpret mode (any backend, slow).
  """
  # Imported here: Pallas' TPU ops are only needed on this path.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, n, h = q_btnh.shape
  s = k_bskh.shape[1]
  bq, t_pad = _splash_blocks(t, block_size)
  bk, s_pad = _splash_blocks(s, block_size)
  q = (q_btnh.astype(jnp.float32) / math.sqrt(h)).astype(q_btnh.dtype)
  q_bnth = _pad_axis1(q, t_pad).transpose(0, 2, 1, 3)
  k_bksh = _pad_axis1(k_bskh, s_pad).transpose(0, 2, 1, 3)
  v_bksh = _pad_axis1(v_bskh, s_pad).transpose(0, 2, 1, 3)

  if q_segment_ids_bt is None and not causal and s_pad != s:
    q_segment_ids_bt = jnp.ones((b, t), jnp.int32)
    kv_segment_ids_bs = jnp.ones((b, s), jnp.int32)
  segments = None
  if q_segment_ids_bt is not None:
    segments = splash.SegmentIds(
      q=_pad_axis1(q_segment_ids_bt, t_pad), kv=_pad_axis1(kv_segment_ids_bs, s_pad)
    )

  head_mask = splash.CausalMask((t_pad, s_pad)) if causal else splash.FullMask((t_pad, s_pad))
  sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  kernel = splash.make_splash_mha(
    splash.MultiHeadMask([head_mask] * n),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
  out_bnth = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(
    q_bnth, k_bksh, v_bksh, segments
  )
  return out_bnth.transpose(0, 2, 1, 3)[:, :t].astype(q_btnh.dtype)


def cudnn_attention(
  q_btnh,
  k_bskh,
  v_bskh,
  q_segment_ids_bt=None,
  kv_segment_ids_bs=None,
  *,
  causal: bool,
  backend: str | None = None,
) -> jax.Array:
  """cuDNN fused attention through ``jax.nn.dot_product_attention``. [b, t, n, h], q's dtype.

  Same contract as :func:`attend`; segment ids become a boolean ``[b, 1, t, s]`` mask (which cuDNN
  adds as a bias: O(t·s) memory per row), causality is cuDNN's own ``is_causal``.

  Raises:
    ValueError: the backend is not a GPU, or the dtype is not bf16/fp16 (cuDNN flash attention).
  """
  backend = backend or jax.default_backend()
  if backend not in ("gpu", "cuda"):
    raise ValueError(
      f"implementation='cudnn' needs an NVIDIA GPU, but the backend is "
      f"{backend!r}; use implementation='blockwise', 'xla' or 'auto'."
    )
  if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
      f"implementation='cudnn' supports bfloat16/float16 inputs, got "
      f"{q_btnh.dtype}; cast q/k/v or use implementation='blockwise'."
    )
  mask = None
  if q_segment_ids_bt is not None:
    mask = segment_mask(
      q_segment_ids_bt, kv_segment_ids_bs, q_btnh.shape[1], k_bskh.shape[1], causal=False
    )[:, None]
  out = jax.nn.dot_product_attention(
    q_btnh, k_bskh, v_bskh, mask=mask, is_causal=causal, implementation="cudnn"
  )
  return out.astype(q_btnh.dtype)
