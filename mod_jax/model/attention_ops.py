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

Context parallelism (all-gather KV; docs/design.md §6). When ``rules`` map the ``length``
logical axis to mesh axes of size R > 1 (the ``context`` axis), each device holds 1/R of the row's
slots (queries, keys and values of one contiguous chunk of the ordered row). The call then runs
in a ``shard_map``: each device keeps its queries, all-gathers K, V and the key segment ids along
``context`` (the gradient is the matching reduce-scatter) and masks with GLOBAL slot indices
(query i of device r is slot r·t/R + i). ``xla``, ``blockwise`` and ``splash`` (with its mask
info split over ``q_seq_shards``) support it; ``cudnn`` does not (no query offset). The work is
not balanced: device r attends to r + 1 chunks of keys (causal blocks above are skipped).

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
from mod_jax.model.partitioning import Rules, logical_to_spec, mesh_axes_of, on_mesh

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
  length_name: str | None = "length",
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
      XLA and are partitioned like the rest of the model, except under a context axis.
    length_name: logical name of the t / s dims; when ``rules`` map it to mesh axes of size
      R > 1, the sequence is split over them (module docstring: all-gather KV). None: whole
      sequences per device (the vision tower's per-frame attention).

  Returns:
    ``[b, t, n, h]`` in q's dtype; scale 1/sqrt(h); matmuls accumulate and the softmax runs in
    float32. Outputs at padding queries (segment id 0) are unspecified but finite.

  Raises:
    ValueError: unknown implementation, inconsistent shapes, one segment-id array without the
      other, causal with t != s, block_size < 1, cudnn off GPU or with a float32 input; under a
      context axis: cudnn, non-causal attention, or t not divisible by the axis size.
  """
  backend = backend or jax.default_backend()
  implementation = resolve_implementation(implementation, backend)
  _check(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, causal, block_size)
  if q_segment_ids_bt is not None:
    q_segment_ids_bt = jnp.asarray(q_segment_ids_bt, jnp.int32)
    kv_segment_ids_bs = jnp.asarray(kv_segment_ids_bs, jnp.int32)
  args = (q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs)
  context = mesh_axes_of(length_name, rules) if length_name else ()
  if context:
    return _context_parallel(
      implementation, args, rules, head_names, length_name, context, block_size, backend, causal
    )
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


def _mesh_size(mesh, axes) -> int:
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def _specs(args, rules, head_names, length_name, mesh):
  """(batch, heads, kv_heads) mesh axes for a ``shard_map`` of attention: those of the logical
  names, or None (replicated) where the mesh axes do not divide the dim, or where the q and k/v
  head shardings differ (GQA groups would be split)."""
  q, k = args[0], args[1]
  names = lambda heads: on_mesh(
    logical_to_spec(("batch", length_name, heads, "head_dim"), rules), mesh
  )
  q_names, kv_names = names(head_names[0]), names(head_names[1])
  if q_names[3] is not None:
    raise ValueError(
      f"attention kernels need whole heads per device, but the rules shard 'head_dim' as "
      f"{q_names[3]!r}; map it to None."
    )
  batch = q_names[0] if q.shape[0] % _mesh_size(mesh, q_names[0]) == 0 else None
  heads, kv_heads = q_names[2], kv_names[2]
  if (
    heads != kv_heads
    or q.shape[2] % _mesh_size(mesh, heads)
    or k.shape[2] % _mesh_size(mesh, kv_heads)
  ):
    heads = kv_heads = None
  return batch, heads, kv_heads


def _per_shard(fn, args, rules, head_names):
  """Runs ``fn(q, k, v, q_seg, kv_seg)`` in a ``shard_map`` over the mesh (if any).

  Batch and head dims keep the shardings their logical names map to (:func:`_specs`); the
  sequence is whole on every device (a context-sharded sequence goes through
  :func:`_context_parallel` instead).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  rules = rules or ()  # no rules under a mesh (e.g. a batch-1 streaming step): replicated
  batch, heads, kv_heads = _specs(args, rules, head_names, None, mesh)
  q_spec = PartitionSpec(batch, None, heads, None)
  kv_spec = PartitionSpec(batch, None, kv_heads, None)
  seg_spec = PartitionSpec(batch, None)
  if args[3] is None:
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


def _context_parallel(
  implementation, args, rules, head_names, length_name, context, block_size, backend, causal
):
  """All-gather-KV attention over the ``context`` mesh axes (module docstring).

  In a ``shard_map`` over the whole mesh (batch and heads as :func:`_specs`, the sequence split
  over ``context``), each device gathers K, V and the key segment ids of the whole row
  (``lax.all_gather``, whose transpose reduce-scatters dK and dV) and runs the kernel on its own
  queries with the causal mask offset by its first query's global slot.

  Raises:
    ValueError: cudnn, non-causal attention, or a length not divisible by the axis size.
  """
  q, k, v, q_seg, kv_seg = args
  mesh = jax.sharding.get_abstract_mesh()
  r = _mesh_size(mesh, context)
  if implementation == "cudnn":
    raise ValueError(
      f"implementation='cudnn' cannot run with the sequence split over {context} (size {r}): "
      f"its causal mask has no query offset; use 'blockwise', 'xla' or 'splash'."
    )
  if not causal or q.shape[1] % r:
    raise ValueError(
      f"context-parallel attention needs causal self-attention over a length divisible by the "
      f"context size {r}; got causal={causal}, t={q.shape[1]}. Map {length_name!r} to None "
      f"for this call (length_name=None)."
    )
  if q_seg is None:  # one segment: the causal mask alone
    q_seg = kv_seg = jnp.ones(q.shape[:2], jnp.int32)
  batch, heads, kv_heads = _specs(args, rules, head_names, length_name, mesh)
  ctx = context[0] if len(context) == 1 else context
  q_spec = PartitionSpec(batch, ctx, heads, None)
  kv_spec = PartitionSpec(batch, ctx, kv_heads, None)
  seg_spec = PartitionSpec(batch, ctx)
  gather = lambda x: jax.lax.all_gather(x, context, axis=1, tiled=True)

  if implementation == "splash":
    t_local = q.shape[1] // r
    bq, t_pad = _splash_blocks(t_local, block_size)
    n_local = q.shape[2] // _mesh_size(mesh, heads)
    kernel = _splash_kernel(n_local, (r * t_pad, r * t_pad), bq, bq, True, backend != "tpu", r)
    kernel_spec = kernel.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, PartitionSpec(None, ctx))
    )

    def local_splash(kernel, q, k, v, q_seg, kv_seg):
      pad = lambda x: _pad_axis1(x, t_pad)
      k, v, kv_seg = gather(pad(k)), gather(pad(v)), gather(pad(kv_seg))
      out = _run_splash(kernel, pad(q), k, v, pad(q_seg), kv_seg)
      return out[:, :t_local]

    mapped = jax.shard_map(
      local_splash,
      mesh=mesh,
      in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
      out_specs=q_spec,
      check_vma=False,
    )
    return mapped(kernel, q, k, v, q_seg, kv_seg)

  def local(q, k, v, q_seg, kv_seg):
    offset = jax.lax.axis_index(context) * q.shape[1]
    k, v, kv_seg = gather(k), gather(v), gather(kv_seg)
    if implementation == "xla":
      return xla_attention(q, k, v, q_seg, kv_seg, causal=True, q_offset=offset)
    return blockwise_attention(
      q, k, v, q_seg, kv_seg, causal=True, block_size=block_size, q_offset=offset
    )

  mapped_local = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
    out_specs=q_spec,
    check_vma=False,
  )
  return mapped_local(q, k, v, q_seg, kv_seg)


def segment_mask(
  q_segment_ids_bt, kv_segment_ids_bs, t: int, s: int, causal: bool, q_offset: jax.Array | int = 0
):
  """The module's mask, bool broadcastable to ``[b, t, s]`` (None when nothing is masked).
  ``q_offset``: the global slot of query 0 (context parallelism; int32 [] or an int)."""
  mask = None
  if causal:
    mask = (jnp.arange(s)[None, :] <= q_offset + jnp.arange(t)[:, None])[None]
  if q_segment_ids_bt is not None:
    same = (q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]) & (
      kv_segment_ids_bs[:, None, :] != 0
    )
    mask = same if mask is None else mask & same
  return mask


def xla_attention(
  q_btnh,
  k_bskh,
  v_bskh,
  q_segment_ids_bt=None,
  kv_segment_ids_bs=None,
  *,
  causal: bool,
  q_offset: jax.Array | int = 0,
) -> jax.Array:
  """Reference: full ``[b, k, g, t, s]`` float32 scores; masked rows become uniform, not NaN.

  Same contract as :func:`attend` (which checks the arguments). Memory O(b·n·t·s).
  ``q_offset``: global slot of query 0 (context parallelism: the causal mask is j <= q_offset + i).
  """
  t, s = q_btnh.shape[1], k_bskh.shape[1]
  mask = segment_mask(q_segment_ids_bt, kv_segment_ids_bs, t, s, causal, q_offset)
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
  b, t, n, h = q_btnh.shape
  s = k_bskh.shape[1]
  bq, t_pad = _splash_blocks(t, block_size)
  bk, s_pad = _splash_blocks(s, block_size)
  if q_segment_ids_bt is None and not causal and s_pad != s:
    q_segment_ids_bt = jnp.ones((b, t), jnp.int32)
    kv_segment_ids_bs = jnp.ones((b, s), jnp.int32)
  kernel = _splash_kernel(n, (t_pad, s_pad), bq, bk, causal, interpret)
  pad = _pad_axis1
  q_seg = None if q_segment_ids_bt is None else pad(q_segment_ids_bt, t_pad)
  kv_seg = None if kv_segment_ids_bs is None else pad(kv_segment_ids_bs, s_pad)
  out = _run_splash(
    kernel, pad(q_btnh, t_pad), pad(k_bskh, s_pad), pad(v_bskh, s_pad), q_seg, kv_seg
  )
  return out[:, :t]


def _splash_kernel(
  n: int, shape: tuple[int, int], bq: int, bk: int, causal: bool, interpret: bool, q_shards=1
):
  """A splash MHA kernel for ``n`` heads over a padded (query, key) ``shape``: causal or full
  mask (static: blocks above the diagonal are skipped), blocks of ``bq`` x ``bk``;
  ``q_shards`` > 1 splits its mask info over that many query shards (context parallelism)."""
  # Imported here: Pallas' TPU ops are only needed on this path.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
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
  return splash.make_splash_mha(
    splash.MultiHeadMask([head_mask] * n),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=q_shards,
    interpret=interpret,
  )


def _run_splash(kernel, q_btnh, k_bskh, v_bskh, q_seg_bt, kv_seg_bs):
  """Runs a splash ``kernel`` on padded inputs (vmapped over the batch); q is pre-scaled by
  1/sqrt(h) in float32 (splash applies no scale). Returns [b, t_pad, n, h] in q's dtype."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  h = q_btnh.shape[-1]
  q = (q_btnh.astype(jnp.float32) / math.sqrt(h)).astype(q_btnh.dtype)
  segments = None if q_seg_bt is None else splash.SegmentIds(q=q_seg_bt, kv=kv_seg_bs)
  out_bnth = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(
    q.transpose(0, 2, 1, 3),
    k_bskh.transpose(0, 2, 1, 3),
    v_bskh.transpose(0, 2, 1, 3),
    segments,
  )
  return out_bnth.transpose(0, 2, 1, 3).astype(q_btnh.dtype)


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
