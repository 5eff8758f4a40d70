"""FastV and DyCoke inside the decoder, as configurations of the MoD machinery.

A :class:`Compression` (``parse("fastv:K=2,R=0.5")`` / ``parse("dycoke:K=0.7,P=0.7,L=3")``) is
attached to a trained model (:func:`attach`); the decoder then runs its layers through
:func:`run_layers` instead of its scanned stack, on teacher-forced rows. Nothing is a copy of
the routing core: every pruned layer is ``mod.routed_block`` / ``mod.compact_block`` (select →
gather → compute → scatter, static shapes, original positions).

* **FastV** (``fastv.py``): in layers K..n-1 each frame keeps the ``N − floor(R·N)`` tokens its
  last vision token (the stream-decision slot, the frame's "last token") attends to most at
  layer K−1, head-averaged — the per-frame top-k of ``routed_block`` with these scores and no
  router weighting. R = 0 drops nothing and runs the dense layers (the dense logits exactly).
* **DyCoke TTM** (``dycoke.py``): the causal TTM keep mask (:func:`dycoke.causal_keep`, windows
  of 4 frames from the stream's first frame, each frame's last token always kept, and its
  MAP-pooled token 0, which has no spatial position for TTM's per-position comparison, kept
  and not ranked: the K rate applies to the p·p grid tokens) is computed
  on the connector outputs and every layer processes only the kept vision tokens
  (``compact_block`` with the static bound C = T + ceil(F/4)·N + (F − ceil(F/4))·m).
* **Streaming** (``mod-jax stream`` / ``eval --compress``): ``Decoder.cached`` runs the same
  loop (:func:`run_layers` with ``caches``) on each chunk, every layer's block writing its
  explicit ``KVCache``; a :class:`StreamState` pytree travels beside the caches: the TTM window
  (the current 4-frame window's connector outputs, so a live frame is pruned against its
  reference frame), and DyCoke's **dynamic KV pruning** (P, L; :func:`kv_select`): after layer
  L−1 the chunk's last token's head-averaged attention over the image entries is compared with
  the previous step's (cosine < 0.9 re-selects the top floor(n_img·(1−P))), and layers >= L
  attend, for this step only, to a masked view of their caches (``Attention.cached(visible=)``)
  that hides the unselected earlier image entries; the cache keeps them, so they come back at a
  later re-selection. A teacher-forced pass is one prefill, which DyCoke never prunes: P acts
  on streaming steps only. FastV's scores in a stream come from the frame end's attention over
  layer K−1's cache, so streaming equals the full pass for FastV and TTM.

Evaluation rows hold one sample (``mod_jax.infer.evaluate``), so frame f of a row is frame f of
its stream; TTM assumes that.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mod_jax.compress import dycoke, fastv
from mod_jax.model import lora, mod, rows
from mod_jax.model.attention import apply_rope, attention_mask, rope_tables

METHODS = ("fastv", "dycoke")


@dataclasses.dataclass(frozen=True)
class Compression:
  """A training-free method and its settings (static: part of the model's graphdef).

  Attributes:
    method: ``fastv`` or ``dycoke``.
    k: FastV: the layer K after which tokens are dropped (an int >= 1); DyCoke: the TTM
      pruning rate K in [0, 1].
    r: FastV's drop ratio R in [0, 1].
    p: DyCoke's KV pruning rate P in [0, 1].
    l: DyCoke's KV pruning layer L.
  """

  method: str
  k: float
  r: float = 0.0
  p: float = 0.0
  l: int = 3

  def __str__(self) -> str:
    if self.method == "fastv":
      return f"fastv:K={int(self.k)},R={self.r:g}"
    return f"dycoke:K={self.k:g},P={self.p:g},L={self.l}"


_KEYS = {"fastv": ("K", "R"), "dycoke": ("K", "P", "L")}
_DEFAULTS = {"fastv": {"K": 2.0, "R": 0.5}, "dycoke": {"K": 0.7, "P": 0.7, "L": 3.0}}


def parse(spec: str | None) -> Compression | None:
  """``fastv:K=2,R=0.5`` / ``dycoke:K=0.7,P=0.7,L=3`` (missing keys: these defaults); ``''`` or
  ``none``: None.

  Raises:
    ValueError: unknown method or key, a non-numeric value, or a value out of range.
  """
  if spec is None or spec.strip().lower() in ("", "none"):
    return None
  method, _, rest = spec.strip().partition(":")
  method = method.lower()
  if method not in METHODS:
    raise ValueError(
      f"--compress={spec!r}: unknown method {method!r}; use fastv:K=2,R=0.5 or "
      f"dycoke:K=0.7,P=0.7,L=3."
    )
  values = dict(_DEFAULTS[method])
  for item in filter(None, (s.strip() for s in rest.split(","))):
    key, sep, val = item.partition("=")
    key = key.strip().upper()
    if not sep or key not in _KEYS[method]:
      raise ValueError(
        f"--compress={spec!r}: bad setting {item!r}; {method} takes {', '.join(_KEYS[method])} "
        f"as KEY=VALUE, e.g. {_example(method)}."
      )
    try:
      values[key] = float(val)
    except ValueError:
      raise ValueError(f"--compress={spec!r}: {key}={val!r} is not a number.") from None
  if method == "fastv":
    if values["K"] != int(values["K"]) or values["K"] < 1:
      raise ValueError(f"--compress={spec!r}: FastV K={values['K']:g} must be an integer >= 1.")
    fastv.kept_count(1, values["R"])  # range check
    return Compression("fastv", int(values["K"]), r=values["R"])
  dycoke.keep_per_frame(values["K"], 1)  # range check
  if not 0.0 <= values["P"] <= 1.0:
    raise ValueError(f"--compress={spec!r}: DyCoke P={values['P']:g} must be in [0, 1].")
  if values["L"] != int(values["L"]) or values["L"] < 1:
    raise ValueError(f"--compress={spec!r}: DyCoke L={values['L']:g} must be an integer >= 1.")
  return Compression("dycoke", values["K"], p=values["P"], l=int(values["L"]))


def _example(method: str) -> str:
  return method + ":" + ",".join(f"{k}={v:g}" for k, v in _DEFAULTS[method].items())


def check(compression: Compression, model_cfg) -> None:
  """Raises ValueError when ``compression`` cannot run on a model of ``model_cfg``."""
  n = int(model_cfg.n_layers)
  plan = mod.RoutingPlan.from_config(model_cfg)
  if plan.routing == "sequence" and any(plan.routed(i) for i in range(n)):
    raise ValueError(
      f"--compress={compression} on a γ-MoD (sequence-routed) checkpoint is not supported; "
      f"apply FastV / DyCoke to a dense or VideoLLM-MoD checkpoint."
    )
  if compression.method == "fastv":
    k = int(compression.k)
    if not 1 <= k < n:
      raise ValueError(f"FastV K={k} must be in [1, {n - 1}] for a {n}-layer decoder.")
    routed = [i for i in range(k - 1, n) if plan.routed(i)]
    if routed:
      raise ValueError(
        f"FastV K={k} on a checkpoint whose layers {routed} already route vision tokens (MoD); "
        f"FastV needs dense layers K-1..n-1: use K > {max(routed) + 1} or a dense checkpoint."
      )
  else:
    if not 1 <= compression.l < n:
      raise ValueError(f"DyCoke L={compression.l} must be in [1, {n - 1}] for {n} layers.")
    routed = [i for i in range(compression.l - 1, n) if plan.routed(i)]
    if compression.p > 0 and routed:
      raise ValueError(
        f"DyCoke KV pruning (P={compression.p:g}, L={compression.l}) needs dense layers "
        f"L-1..n-1 (one cache slot space); layers {routed} route vision tokens (MoD). Use "
        f"L > {max(routed) + 1}, P=0 (TTM alone) or a dense checkpoint."
      )


def attach(graphdef, params, compression: Compression | None, model_cfg):
  """The graphdef of the same model running ``compression`` (None: unchanged).

  Raises:
    ValueError: see :func:`check`.
  """
  if compression is None:
    return graphdef
  check(compression, model_cfg)
  model = nnx.merge(graphdef, params)
  model.llm.compress = compression
  return nnx.split(model, nnx.Param)[0]


# ---------------------------------------------------------------------------- decoder layers
# TTM in the model: a pruned frame keeps its stream-decision slot (the last token) and its
# MAP-pooled token 0, which has no spatial position to compare (dycoke.causal_keep keep_first).
TTM_KEEP = {"keep_last": True, "keep_first": True}


def ttm_count(k: float, n: int) -> int:
  """Vision tokens a TTM-pruned frame keeps in the model (static); TTM is off when it is n."""
  return dycoke.pruned_count(k, n, **TTM_KEEP)


def ttm_keep(x_bld, layout: rows.StreamLayout, k: float) -> jax.Array:
  """Causal TTM keep flags of a row, bool [b, l] (text True): frame f of the row is frame f of
  its stream, computed on the layer-0 input (the connector outputs)."""
  b, _, d = x_bld.shape
  f, n = layout.frame_start.shape[1], layout.tokens_per_frame
  vis = rows.take(x_bld, layout.frame_tokens().reshape(b, f * n)).reshape(b, f, n, d)
  keep = jax.vmap(lambda v: dycoke.causal_keep(v, k, **TTM_KEEP))(vis)
  return to_stream(keep, layout)


def to_stream(keep_bfn, layout: rows.StreamLayout) -> jax.Array:
  """Per-frame vision flags bool [b, f, n] as stream-order slot flags [b, l] (text True)."""
  b, f, n = keep_bfn.shape
  slot = jnp.maximum(layout.frame_of, 0) * n + layout.offset
  flat = jnp.take_along_axis(keep_bfn.reshape(b, f * n), slot, axis=1)
  return jnp.where(layout.is_vision, flat, True)


def query_attention(layer, x_bld, seq: rows.TokenInfo, q_idx_bm, cache=None, rope_offset=0):
  """Head-averaged attention of the tokens at slots ``q_idx`` [b, m] in ``layer`` (input
  ``x_bld``): (probs float32 [b, m, s], key positions [b, s], key segment ids [b, s]).

  The keys are every key those tokens attend to under the layer's own mask: the row itself
  (``cache`` None), or the layer's KV cache after this chunk was written (streaming; keys rotated
  at ``cache.rope_positions(rope_offset)``, queries at ``seq.rope``), so a full pass and the
  streaming engine see the same distribution.
  """
  attn = layer.attn
  b, m = q_idx_bm.shape
  q, k, _ = attn.qkv(layer.input_norm(x_bld), seq.positions, None, seq.rope)
  q_sel = rows.take(q, q_idx_bm)  # [b, m, heads, hd]
  if cache is not None:
    keys = apply_rope(cache.k, rope_tables(cache.rope_positions(rope_offset), attn.inv_freq))
    k_pos, k_seg = cache.positions, cache.segment_ids
  else:
    keys, k_pos, k_seg = k, seq.positions, seq.segment_ids
  heads, hd = q_sel.shape[2], q_sel.shape[3]
  kh = keys.shape[2]
  qg = q_sel.reshape(b, m, kh, heads // kh, hd).astype(jnp.float32)
  logits = jnp.einsum("bmkgh,bskh->bmkgs", qg, keys.astype(jnp.float32)) / np.sqrt(hd)
  q_pos, q_seg = rows.take(seq.positions, q_idx_bm), rows.take(seq.segment_ids, q_idx_bm)
  mask = attention_mask(q_pos, q_seg, k_pos, k_seg)
  logits = jnp.where(mask[:, :, None, None], logits, -1e30)
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(2, 3)), k_pos, k_seg


def frame_end_attention(
  layer, x_bld, seq: rows.TokenInfo, layout: rows.StreamLayout, cache=None, rope_offset=0
):
  """Each frame's last vision token's head-averaged attention to its own frame's tokens at
  ``layer`` (input ``x_bld``; keys from the row or ``cache``, :func:`query_attention`); float32
  [b, l] at the vision slots, 0 at text. FastV's scores."""
  b = x_bld.shape[0]
  f, n = layout.frame_start.shape[1], layout.tokens_per_frame
  probs, k_pos, k_seg = query_attention(
    layer, x_bld, seq, layout.frame_start + n - 1, cache, rope_offset
  )
  tok_pos = rows.take(seq.positions, layout.frame_tokens().reshape(b, f * n)).reshape(b, f, n)
  match = (k_pos[:, None, None, :] == tok_pos[..., None]) & (k_seg[:, None, None, :] != 0)
  score_bfn = jnp.sum(jnp.where(match, probs[:, :, None, :], 0.0), axis=-1)
  return jnp.where(layout.is_vision, _frame_values(score_bfn, layout), 0.0)


def _frame_values(v_bfn, layout):
  b, f, n = v_bfn.shape
  slot = jnp.maximum(layout.frame_of, 0) * n + layout.offset
  return jnp.take_along_axis(v_bfn.reshape(b, f * n), slot, axis=1)


def run_layers(
  dec,
  x,
  seq: rows.TokenInfo,
  layout,
  *,
  rng,
  drop,
  ordered,
  vision_keep=None,
  caches=None,
  state=None,
  rope_offset=0,
):
  """The decoder's layers under ``dec.compress`` (one layer at a time, no scan), on a
  teacher-forced row or, with ``caches``, on a streaming chunk: one loop for both, so the
  streaming engine runs the very configuration of ``mod.routed_block`` / ``compact_block`` the
  full pass runs, with each layer's block writing its KV cache.

  Args:
    dec: the ``Decoder``; x [b, l, d] stream order (teacher-forced) or any slot order (chunk);
      seq, layout: as ``Decoder.__call__`` / ``Decoder.cached`` (``seq.rope`` set).
    rng, drop: routing and LoRA-dropout keys; ordered: kernel attention allowed (rows only).
    vision_keep: bool [b, f, n] TTM flags supplied by the caller, or None to compute them from
      this row (a whole stream from its first frame) or, streaming, from ``state``.
    caches: the stacked KV caches (streaming: ``Decoder.cached``; layer i's is
      ``dec.layer_cache(caches, i)``), or None (teacher-forced).
    state: the stream's :class:`StreamState` (streaming only).
    rope_offset: int32 [], the stream's re-basing (``Attention.cached``).
  Returns:
    (x [b, l, d], aux {"layer_i": ...} incl. the ``overflow`` counts of pruned layers, the
    updated caches (None teacher-forced), the updated state (None teacher-forced)).
  """
  comp = dec.compress
  plan = dec.plan
  n = plan.tokens_per_frame
  streaming = caches is not None
  aux = {}
  allowed = None
  has_frames = layout is not None
  if has_frames and comp.method == "dycoke" and ttm_count(comp.k, n) < n:
    if vision_keep is None and streaming:
      vision_keep, state = stream_ttm(state, x, seq, layout, comp.k)
    allowed = ttm_keep(x, layout, comp.k) if vision_keep is None else to_stream(vision_keep, layout)
  scores = visible = None
  kept = fastv.kept_count(n, comp.r) if comp.method == "fastv" else 0
  kv_pruning = streaming and comp.method == "dycoke" and comp.p > 0
  for i in range(dec.n_layers):
    layer = dec.layer(i)
    written: list = []  # the block runs once, inside routed_block / compact_block when pruned
    s, r = dec.slot(i)
    if streaming:  # layer i writes row r of its stack's cache in place (KVCache.write)
      block = functools.partial(
        layer.cached_block,
        caches[s],
        written,
        rope_offset,
        visible if kv_pruning and i >= comp.l else None,
        row=r,
      )
    else:
      lrng = None if drop is None else jax.random.fold_in(drop, i)
      block = functools.partial(layer.block, lrng, ordered)
    x_in = x
    a = {}
    if not has_frames:
      x = block(x, seq)
    elif comp.method == "fastv" and i >= comp.k and kept < n:
      x, a = mod.routed_block(
        block,
        x,
        seq,
        layout,
        k=kept,
        selection="learned",
        weighting="none",
        router=lambda _, s=scores: s,
      )
    elif plan.routed(i):
      x, a = mod.routed_block(
        block,
        x,
        seq,
        layout,
        k=plan.keep[i],
        selection=plan.selection,
        weighting=plan.weighting,
        router=dec.router_fn(dec.router(i), layer),
        rng=lora.fold(rng, i),
        allowed=allowed,
      )
    elif allowed is not None:
      f = layout.frame_start.shape[1]
      m = dycoke.causal_keep_counts(comp.k, n, f, **TTM_KEEP)
      c = x.shape[1] - f * n + m
      x, overflow = mod.compact_block(block, x, seq, allowed, c)
      a = {"overflow": overflow}
    else:
      x = block(x, seq)
    if streaming:
      caches = (*caches[:s], written[0], *caches[s + 1 :])
    cache = caches[s].row(r) if streaming else None
    if has_frames and comp.method == "fastv" and i == comp.k - 1 and kept < n:
      scores = frame_end_attention(layer, x_in, seq, layout, cache, rope_offset)
    if kv_pruning and i == comp.l - 1:
      visible, state = kv_select(state, layer, x_in, seq, layout, cache, rope_offset, comp.p)
    if a:
      aux[f"layer_{i}"] = a
  return x, aux, caches, state


# ---------------------------------------------------------------------------- streaming
SIMILARITY_THRESHOLD = 0.9  # DyCoke: re-select when the attention's cosine drops below this


class StreamState(NamedTuple):
  """A compressed model's per-stream state in the streaming engine: a pytree passed to
  ``Decoder.cached`` beside the KV caches and returned updated (no module state).

  TTM (DyCoke K): ``window`` [b, 4, N, d] the connector outputs of the current 4-frame window's
  frames by window offset (a ring: offset o's slot is rewritten by each window's frame o; TTM
  reads offsets 0 and 2 after they were written); ``frames_seen`` int32 [b], the stream's frame
  count (window offset = frames_seen mod 4).

  Dynamic KV pruning (DyCoke P, L), in the slot space of the caches of layers L−1..n−1 (dense
  layers of one size and one ring, :func:`check`): ``is_vision`` bool [b, S], the slot holds an
  image entry; ``selected`` bool [b, S], the image entries layers >= L attend to; ``ref``
  float32 [b, S], the last token's head-averaged attention over image entries at layer L−1 in
  the previous step; ``has_ref`` bool [b], a selection exists; ``reselections`` int32 [b], how
  many steps renewed the selection (cosine < 0.9 or none yet).

  A method that does not use a part holds it at size 1 (static shapes, nothing read).
  """

  window: jax.Array
  frames_seen: jax.Array
  is_vision: jax.Array
  selected: jax.Array
  ref: jax.Array
  has_ref: jax.Array
  reselections: jax.Array


def empty_state(model, batch: int, sizes) -> StreamState:
  """The state of a new stream for ``model`` (its ``llm.compress`` set) whose layer caches have
  ``sizes`` slots (``streaming.cache_sizes``).

  Raises:
    ValueError: the model has no compression attached.
  """
  comp = model.llm.compress
  if comp is None:
    raise ValueError("empty_state: the model has no --compress method attached (apply.attach).")
  n = model.tokens_per_frame
  d = model.llm.embed[...].shape[1]
  ttm = comp.method == "dycoke" and ttm_count(comp.k, n) < n
  s = int(sizes[comp.l - 1]) if comp.method == "dycoke" and comp.p > 0 else 1
  slots = jnp.zeros((batch, s), bool)
  return StreamState(
    window=jnp.zeros((batch, dycoke.WINDOW if ttm else 1, n if ttm else 1, d if ttm else 1)),
    frames_seen=jnp.zeros((batch,), jnp.int32),
    is_vision=slots,
    selected=slots,
    ref=jnp.zeros((batch, s), jnp.float32),
    has_ref=jnp.zeros((batch,), bool),
    reselections=jnp.zeros((batch,), jnp.int32),
  )


_REF_OFFSET = (0, 0, 0, 2)  # TTM: offset 1 and 2 compare with offset 0, offset 3 with offset 2


def stream_ttm(state: StreamState, x_bld, seq: rows.TokenInfo, layout, k: float):
  """Causal TTM flags of a chunk's frames, continuing the stream (:func:`dycoke.causal_keep`
  with ``TTM_KEEP``, its window carried in ``state``).

  The chunk's real frames (segment id != 0 at the frame start) must precede its padding frames
  (``Session.feed`` / ``evaluate.continue_after`` chunks). Frame j of the chunk is stream frame
  ``frames_seen + j``; its reference frame is in the chunk or, when earlier, in ``window``.

  Returns:
    (bool [b, f, N], the state with ``window`` and ``frames_seen`` advanced).
  """
  b = x_bld.shape[0]
  f, n = layout.frame_start.shape[1], layout.tokens_per_frame
  emb = rows.take(x_bld, layout.frame_tokens().reshape(b, f * n)).reshape(b, f, n, -1)
  real = rows.take(seq.segment_ids, layout.frame_start) != 0  # [b, f]
  count = ttm_count(k, n)
  ref_of = jnp.asarray(_REF_OFFSET, jnp.int32)

  def one(window, seen, emb_fnd, real_f):
    keeps = []
    for j in range(f):
      off = (seen + j) % dycoke.WINDOW
      ref = jnp.take(window, ref_of[off], axis=0)
      pruned = dycoke.pruned_frame(ref, emb_fnd[j], count, **TTM_KEEP)
      keeps.append(jnp.where(off == 0, True, pruned))
      window = jnp.where(real_f[j], window.at[off].set(emb_fnd[j].astype(window.dtype)), window)
    return jnp.stack(keeps), window

  window = state.window.astype(emb.dtype)
  keep, window = jax.vmap(one)(window, state.frames_seen, emb, real)
  seen = state.frames_seen + jnp.sum(real, axis=1, dtype=jnp.int32)
  return keep, state._replace(window=window.astype(state.window.dtype), frames_seen=seen)


def kv_select(state: StreamState, layer, x_bld, seq: rows.TokenInfo, layout, cache, rope_offset, p):
  """DyCoke's dynamic KV pruning at layer L−1 of a streaming step (arXiv 2411.15024 §3.2;
  reference ``PrunableDynamicCache.dycoke_pruning`` in ``llava/model/language_model/
  modeling_qwen2.py``).

  After layer L−1 wrote the chunk into ``cache``: marks the chunk's slots and which of them are
  image entries, takes the head-averaged attention of the chunk's last token (largest position)
  over the image entries, and re-selects the top ``floor(n_img · (1 − P))`` when its cosine with
  the previous step's attention is below 0.9 (or no selection exists); otherwise the previous
  selection stands. Entries new in this step had no attention before (0 in the reference
  vector). The reference prunes a fixed prefill video while decoding text; a stream adds image
  entries between re-selections: those join the selection until the next re-selection ranks
  them (an entry is never hidden before it was ranked). Text entries are never pruned (the
  reference's kept-index list, built at the re-selection step, would also hide tokens decoded
  after it: not copied).

  Returns:
    (visible bool [b, S]: the slots layers >= L may attend to in this step — every slot except
    earlier image entries outside the selection, which stay in the cache and can come back at
    the next re-selection; the updated state).
  """
  b, t = seq.positions.shape
  k_pos, k_seg = cache.positions, cache.segment_ids
  is_vis_t = layout.is_vision if layout is not None else jnp.zeros((b, t), bool)
  live_t = seq.segment_ids != 0
  match = (k_pos[:, :, None] == seq.positions[:, None, :]) & live_t[:, None, :]
  match = match & (k_seg != 0)[:, :, None]  # [b, S, t]
  current = jnp.any(match, axis=-1)
  img = jnp.where(current, jnp.any(match & is_vis_t[:, None, :], axis=-1), state.is_vision)
  img = img & (k_seg != 0)
  last = jnp.argmax(jnp.where(live_t, seq.positions, -1), axis=1)[:, None]  # [b, 1]
  probs = query_attention(layer, x_bld, seq, last, cache, rope_offset)[0][:, 0]  # [b, S]
  return reselect(state, probs, img, current, p)


def reselect(state: StreamState, probs_bs, img_bs, current_bs, p: float):
  """DyCoke's selection rule on one step's attention (the arithmetic of :func:`kv_select`).

  Args:
    state: the stream's :class:`StreamState` (``selected``, ``ref``, ``has_ref``, ...).
    probs_bs: float32 [b, S], the last token's head-averaged attention over the cache slots.
    img_bs: bool [b, S], live image entries; current_bs: bool [b, S], this step's own slots.
    p: the pruning rate P in [0, 1].
  Returns:
    (visible bool [b, S], the updated state); see :func:`kv_select`.
  """
  vec = jnp.where(img_bs, probs_bs, 0.0)
  ref = jnp.where(current_bs, 0.0, state.ref)  # entries new in this step had no attention before
  cos = jnp.sum(vec * ref, 1) / jnp.maximum(
    jnp.linalg.norm(vec, axis=1) * jnp.linalg.norm(ref, axis=1), 1e-8
  )
  renew = ~state.has_ref | (cos < SIMILARITY_THRESHOLD)  # [b]
  n_keep = jnp.floor(jnp.sum(img_bs, 1) * (1.0 - p) + 1e-6).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(-jnp.where(img_bs, vec, -1.0), axis=1), axis=1)  # 0: top
  fresh = img_bs & (rank < n_keep[:, None])
  # Between re-selections the selection stands; image entries that arrived since join it
  # (never ranked, so never hidden) until the next re-selection ranks them.
  kept = (state.selected | current_bs) & img_bs
  selected = jnp.where(renew[:, None], fresh, kept)
  visible = ~(img_bs & ~selected & ~current_bs)
  return visible, state._replace(
    is_vision=img_bs,
    selected=selected,
    ref=vec,  # the reference stores this step's attention at every step
    has_ref=jnp.ones_like(state.has_ref),
    reselections=state.reselections + renew.astype(jnp.int32),
  )
