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
  of 4 frames from the stream's first frame, each frame's last token always kept) is computed
  on the connector outputs and every layer processes only the kept vision tokens
  (``compact_block`` with the static bound C = T + ceil(F/4)·N + (F − ceil(F/4))·m).
* **Not yet here:** the streaming engine's path (``mod-jax stream`` / ``eval --compress``) and
  DyCoke's dynamic KV pruning (P, L), which acts only on streaming decode steps. They were built
  on the previous mutable streaming cache (commit d8415da) and await a port to the explicit KV
  caches of ``Decoder.cached``; ``P`` and ``L`` are parsed and checked meanwhile.

Evaluation rows hold one sample (``mod_jax.infer.evaluate``), so frame f of a row is frame f of
its stream; TTM assumes that.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mod_jax.compress import dycoke, fastv
from mod_jax.model import lora, mod, rows
from mod_jax.model.attention import attention_mask

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
def ttm_keep(x_bld, layout: rows.StreamLayout, k: float) -> jax.Array:
  """Causal TTM keep flags of a row, bool [b, l] (text True): frame f of the row is frame f of
  its stream, computed on the layer-0 input (the connector outputs)."""
  b, _, d = x_bld.shape
  f, n = layout.frame_start.shape[1], layout.tokens_per_frame
  vis = rows.take(x_bld, layout.frame_tokens().reshape(b, f * n)).reshape(b, f, n, d)
  keep = jax.vmap(lambda v: dycoke.causal_keep(v, k, keep_last=True))(vis)
  return to_stream(keep, layout)


def to_stream(keep_bfn, layout: rows.StreamLayout) -> jax.Array:
  """Per-frame vision flags bool [b, f, n] as stream-order slot flags [b, l] (text True)."""
  b, f, n = keep_bfn.shape
  slot = jnp.maximum(layout.frame_of, 0) * n + layout.offset
  flat = jnp.take_along_axis(keep_bfn.reshape(b, f * n), slot, axis=1)
  return jnp.where(layout.is_vision, flat, True)


def query_attention(layer, x_bld, seq: rows.TokenInfo, q_idx_bm):
  """Head-averaged attention of the tokens at slots ``q_idx`` [b, m] in ``layer`` (input
  ``x_bld``): (probs float32 [b, m, s], key positions [b, s], key segment ids [b, s]).

  The keys are every key those tokens attend to in the row, under the layer's own mask.
  """
  attn = layer.attn
  b, m = q_idx_bm.shape
  q, k, _ = attn.qkv(layer.input_norm(x_bld), seq.positions, None, seq.rope)
  q_sel = rows.take(q, q_idx_bm)  # [b, m, heads, hd]
  keys, k_pos, k_seg = k, seq.positions, seq.segment_ids
  heads, hd = q_sel.shape[2], q_sel.shape[3]
  kh = keys.shape[2]
  qg = q_sel.reshape(b, m, kh, heads // kh, hd).astype(jnp.float32)
  logits = jnp.einsum("bmkgh,bskh->bmkgs", qg, keys.astype(jnp.float32)) / np.sqrt(hd)
  q_pos, q_seg = rows.take(seq.positions, q_idx_bm), rows.take(seq.segment_ids, q_idx_bm)
  mask = attention_mask(q_pos, q_seg, k_pos, k_seg)
  logits = jnp.where(mask[:, :, None, None], logits, -1e30)
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(2, 3)), k_pos, k_seg


def frame_end_attention(layer, x_bld, seq: rows.TokenInfo, layout: rows.StreamLayout):
  """Each frame's last vision token's head-averaged attention to its own frame's tokens at
  ``layer`` (input ``x_bld``; :func:`query_attention`); float32 [b, l] at the vision slots, 0
  at text. FastV's scores."""
  b = x_bld.shape[0]
  f, n = layout.frame_start.shape[1], layout.tokens_per_frame
  probs, k_pos, k_seg = query_attention(layer, x_bld, seq, layout.frame_start + n - 1)
  tok_pos = rows.take(seq.positions, layout.frame_tokens().reshape(b, f * n)).reshape(b, f, n)
  match = (k_pos[:, None, None, :] == tok_pos[..., None]) & (k_seg[:, None, None, :] != 0)
  score_bfn = jnp.sum(jnp.where(match, probs[:, :, None, :], 0.0), axis=-1)
  return jnp.where(layout.is_vision, _frame_values(score_bfn, layout), 0.0)


def _frame_values(v_bfn, layout):
  b, f, n = v_bfn.shape
  slot = jnp.maximum(layout.frame_of, 0) * n + layout.offset
  return jnp.take_along_axis(v_bfn.reshape(b, f * n), slot, axis=1)


def run_layers(dec, x, seq: rows.TokenInfo, layout, *, rng, drop, ordered, vision_keep=None):
  """The decoder's layers under ``dec.compress`` (one layer at a time, no scan).

  Args:
    dec: the ``Decoder``; x [b, l, d] stream order; seq, layout: as ``Decoder.__call__``.
    rng, drop: routing and LoRA-dropout keys; ordered: kernel attention allowed.
    vision_keep: bool [b, f, n] TTM flags supplied by the caller, or None to compute them from
      this row (a whole stream from its first frame).
  Returns:
    (x [b, l, d], aux {"layer_i": ...} incl. the ``overflow`` counts of pruned layers).
  """
  comp = dec.compress
  plan = dec.plan
  aux = {}
  allowed = None
  has_frames = layout is not None
  if (
    has_frames
    and comp.method == "dycoke"
    and dycoke.keep_per_frame(comp.k, plan.tokens_per_frame) < plan.tokens_per_frame
  ):
    allowed = ttm_keep(x, layout, comp.k) if vision_keep is None else to_stream(vision_keep, layout)
  scores = None
  kept = fastv.kept_count(plan.tokens_per_frame, comp.r) if comp.method == "fastv" else 0
  for i, layer in enumerate(dec.layers):
    lrng = None if drop is None else jax.random.fold_in(drop, i)
    block = functools.partial(_block, layer, lrng, ordered)
    x_in = x
    a = {}
    if not has_frames:
      x = block(x, seq)
    elif comp.method == "fastv" and i >= comp.k and kept < plan.tokens_per_frame:
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
        router=dec.router_fn(dec.routers.get(str(i)), layer),
        rng=lora.fold(rng, i),
        allowed=allowed,
      )
    elif allowed is not None:
      f, n = layout.frame_start.shape[1], layout.tokens_per_frame
      m = dycoke.causal_keep_counts(comp.k, n, f, keep_last=True)
      c = x.shape[1] - f * n + m
      x, overflow = mod.compact_block(block, x, seq, allowed, c)
      a = {"overflow": overflow}
    else:
      x = block(x, seq)
    if has_frames and comp.method == "fastv" and i == comp.k - 1 and kept < plan.tokens_per_frame:
      scores = frame_end_attention(layer, x_in, seq, layout)
    if a:
      aux[f"layer_{i}"] = a
  return x, aux


def _block(layer, rng, ordered: bool, x_bld, seq: rows.TokenInfo) -> jax.Array:
  return layer(x_bld, seq.positions, seq.segment_ids, rng, rope=seq.rope, ordered=ordered)


# ---------------------------------------------------------------------------- streaming
