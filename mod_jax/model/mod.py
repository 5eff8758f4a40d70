"""Mixture-of-Depths for vision tokens: LayerExpert router, per-frame top-k, gather → block → scatter.

VideoLLM-MoD (Wu et al. 2024, arXiv 2408.16730, §3.2) on the streaming base of VideoLLM-online.
In a MoD layer, within **each frame** only the top-k of the N = tokens_per_frame vision tokens are
processed by the decoder layer (attention + MLP); the others skip it through the residual,
unchanged, and are absent from that layer's attention both as queries and as keys/values. Text
tokens are always processed. Because top-k is taken inside a frame, routing is causal at frame
granularity, so streaming inference reproduces the full forward pass.

Static shapes. The decoder keeps a row in stream order (``mod_jax/model/rows.py``): text and
frames interleaved as in the stream, frame f's N tokens contiguous at ``frame_start[f]``. k =
ceil(r·N) is known at trace time and every frame keeps exactly k tokens (padding frames too), so
the compact sequence has exactly ``C = T + F·k`` tokens and nothing can overflow (docs/design.md §1.2). The
compact sequence is the kept slots IN STREAM ORDER (a stable sort of the keep flags), so it keeps
the kernel-friendly mask "causal in slot order within a segment" with the original positions.

Worked example (one sample, T = 3 text slots, F = 2, N = 4, k = 1)::

    stream slots    t0 v00 v01 v02 v03 t1 v10 v11 v12 v13 t2
    router scores       .1  .9  .3  .2      .4  .0  .8  .7
    top-1 per frame         ^^^                     ^^^          -> idx [[1], [2]]
    compact (C = 5) t0 v01 t1 v12 t2        (stream order; original positions and segments)
    block output    t0' v01' t1' v12' t2'
    scatter back    t0' v00 v01+g·Δ v02 v03 t1' v10 v11 v12+g·Δ v13 t2'

with Δ = block(compact) − compact for the routed tokens and g = g(router score) (below).

Router weighting g (Mixture-of-Depths, Raposo et al. 2024, §3.5): without it the top-k choice is
not differentiable and the router receives no gradient.
  * ``ste``: forward value 1 (so r = 1 equals the dense model exactly), gradient of sigmoid(s);
  * ``sigmoid``: g = sigmoid(s);
  * ``score``: g = s (the raw router output, as in Mixture-of-Depths);
  * ``none``: no weighting, the block output itself (training-free selection: FastV).

Router training options (the learned-router study, docs/ablation.md "Learned router"); each is a
setting of this one mechanism:
  * **annealed gate** (``mix``, ``model.mod.router_anneal_steps`` = A): with ``ste``, the forward
    value of g is ``mix·sigmoid(s) + (1 − mix)``, with mix = max(0, 1 − step/A) during training
    and 0 at evaluation and inference; the gradient is sigmoid'(s) throughout. Early on the
    router's push is realised in the forward pass (as with g = sigmoid(s), Mixture-of-Depths
    §3.5's "multiply the block output by the router weight"); once the anneal ends g is exactly
    1 again, so r = 1 reproduces the dense model.
  * **exploration** (``explore`` = τ): during training, learned selection takes the top-k of
    ``s + τ·mix·G`` with G standard Gumbel noise (Gumbel-top-k: k draws without replacement from
    softmax(s / (τ·mix))), annealed with the gate, so tokens the router ranks low are sometimes
    processed and get a gradient through g; the gate and the auxiliary loss use the noise-free
    scores and top-k.
  * **router input** (``router_input``): ``hidden`` (VideoLLM-MoD's LayerExpert on the residual
    stream) or ``normed`` (on the layer's input-RMSNorm output, as γ-MoD's router, arXiv
    2410.13859 §3.2), chosen by the decoder (``Decoder.router_fn``).

Selection strategies (VideoLLM-MoD Table 3): ``learned`` (LayerExpert top-k), ``random``
(top-k of uniform noise, a fresh draw per step and layer), ``uniform`` (fixed stride within frame).

Keep ratio: one r for every routed layer, or a schedule with one r per routed layer. The paper's
Table 1 baselines are k = 0 settings of this same mechanism (:func:`baseline_routing`): EarlyExit(E)
routes layers E..n-1 with k = 0 (vision tokens leave after layer E), LayerSkip routes the
interleaved layers with k = 0, Full computation routes nothing.

Auxiliary router loss (Mixture-of-Depths §3.5, γ-MoD): BCE of each vision token's router logit
against its top-k membership, averaged over real (non-padding) frames; each layer reports the
sum and count (``aux["router_bce_sum"]``, ``aux["router_bce_count"]``) so that accumulated
micro-batches give the full-batch mean; the train loss adds ``router_aux_loss_weight`` × the sum
over layers of the means. Per-frame top-k is already causal, so the loss is not needed for
inference here; it is the only term that gives the N − k skipped tokens' scores a gradient
(towards "skipped"), which keeps the logits calibrated to a 0.5 threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mod_jax.model import rows
from mod_jax.model.partitioning import param

_zeros = nnx.initializers.zeros_init()
_PRUNED = -1e9  # router score of a pruned token: never in a top-k while a kept one is left


def keep_count(keep_ratio: float, tokens_per_frame: int) -> int:
  """k = ceil(r · N) vision tokens kept per frame in a MoD layer (docs/design.md §1.1)."""
  return int(math.ceil(keep_ratio * tokens_per_frame - 1e-9))


def mod_layer_indices(insertion, n_layers: int) -> tuple[int, ...]:
  """Decoder layers that route vision tokens (VideoLLM-MoD Table 2).

  ``all``: every layer; ``all_deep``: layers n/2..n-1; ``interleaved``: odd layers 1, 3, …;
  ``interleaved_deep``: odd layers of the deep half; ``none``: dense; or an explicit list.
  """
  if not isinstance(insertion, str):
    return tuple(sorted(int(i) for i in insertion))
  half = n_layers // 2
  table = {
    "none": (),
    "all": tuple(range(n_layers)),
    "all_deep": tuple(range(half, n_layers)),
    "interleaved": tuple(range(1, n_layers, 2)),
    "interleaved_deep": tuple(i for i in range(half, n_layers) if i % 2 == 1),
  }
  if insertion not in table:
    raise ValueError(f"unknown MoD insertion {insertion!r}; choose one of {sorted(table)}.")
  return table[insertion]


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
  """Static per-layer routing: ``keep[i]`` vision tokens kept per frame in layer i.

  ``None`` marks a dense layer (no routing). A routed layer may keep all N tokens (r = 1: the
  mechanism runs, and with ``ste`` weighting equals the dense layer) or none (k = 0: vision
  tokens skip the layer, the EarlyExit / LayerSkip baselines).
  """

  keep: tuple[int | None, ...]
  tokens_per_frame: int
  selection: str
  weighting: str
  routing: str = "frame"  # frame (VideoLLM-MoD) | sequence (γ-MoD, sequence_routed_block)
  capacity: float = 1.0  # sequence routing: C = ceil(capacity · L) processed slots per row
  # Sequence routing at inference: processed iff P(process) > threshold; None keeps the training
  # rule (top-C over the row, not causal: only to measure the train/inference mismatch).
  threshold: float | None = 0.5
  router_input: str = "hidden"  # hidden | normed (the layer's input norm, as γ-MoD)
  explore: float = 0.0  # Gumbel exploration scale τ at mix = 1 (training only)

  @classmethod
  def from_config(cls, model_cfg) -> RoutingPlan:
    """Plan of ``model_cfg.mod`` (insertion, keep_ratio r or schedule, selection, weighting).

    Raises:
      ValueError: a keep ratio outside its range, a scalar r = 0 (ambiguous: use a schedule, see
        :func:`baseline_routing`), or a schedule whose length is not the number of routed layers.
    """
    mod = model_cfg.mod
    routed = mod_layer_indices(mod.insertion, model_cfg.n_layers)
    ratios = _keep_schedule(mod.keep_ratio, mod.insertion, routed)
    k_of = {i: keep_count(r, model_cfg.tokens_per_frame) for i, r in zip(routed, ratios)}
    keep = tuple(k_of.get(i) for i in range(model_cfg.n_layers))
    routing = mod.get("routing", "frame")
    if routing == "sequence":  # one capacity over the row; at inference up to N per frame
      keep = tuple(None if k is None else model_cfg.tokens_per_frame for k in keep)
    return cls(
      keep,
      model_cfg.tokens_per_frame,
      mod.selection,
      mod.router_weighting,
      routing,
      float(ratios[0]) if ratios else 1.0,
      float(mod.get("threshold", 0.5)),
      str(mod.get("router_input", "hidden")),
      float(mod.get("router_explore", 0.0)),
    )

  def routed(self, layer: int) -> bool:
    return self.keep[layer] is not None

  def needs_router(self, layer: int) -> bool:
    """The layer has its own LayerExpert (sequence routing shares one router instead)."""
    k = self.keep[layer]
    return k is not None and k > 0 and self.selection == "learned" and self.routing == "frame"


def _keep_schedule(keep_ratio, insertion, routed: tuple[int, ...]) -> tuple[float, ...]:
  """One keep ratio per routed layer from a scalar r in (0, 1] or a schedule with values in [0, 1]."""
  if isinstance(keep_ratio, (int, float)):
    if not 0.0 < keep_ratio <= 1.0:
      raise ValueError(
        f"keep_ratio={keep_ratio} must be in (0, 1] (k = ceil(r*N)). For k = 0 (vision tokens "
        f"skip a layer: EarlyExit, LayerSkip) give one ratio per routed layer, e.g. "
        f"keep_ratio={[0.0] * min(len(routed), 2)} with insertion={list(routed[:2])}; "
        f"mod_jax.model.mod.baseline_routing() builds these settings."
      )
    return (float(keep_ratio),) * len(routed)
  ratios = tuple(float(r) for r in keep_ratio)
  if len(ratios) != len(routed):
    raise ValueError(
      f"keep_ratio schedule has {len(ratios)} values but insertion={insertion!r} routes "
      f"{len(routed)} layers {list(routed)}; give one ratio per routed layer, in layer order."
    )
  bad = [r for r in ratios if not 0.0 <= r <= 1.0]
  if bad:
    raise ValueError(f"keep_ratio schedule values {bad} are outside [0, 1].")
  return ratios


def baseline_routing(name: str, n_layers: int, exit_layer: int | None = None) -> dict:
  """``model.mod`` settings of VideoLLM-MoD's Table 1 baselines as k = 0 routing.

  Args:
    name: ``full`` (no routing), ``early_exit`` (vision tokens are processed by layers
      0..E-1 and skip layers E..n-1) or ``layer_skip`` (vision tokens skip every other layer:
      the ``interleaved`` layers 1, 3, …).
    n_layers: decoder depth n.
    exit_layer: E for ``early_exit``, 0 <= E < n (default n // 2).
  Returns:
    ``{"insertion": ..., "keep_ratio": ...}`` to set on ``config.model.mod``.
  Raises:
    ValueError: unknown ``name`` or ``exit_layer`` outside [0, n).
  """
  if name == "full":
    return {"insertion": "none", "keep_ratio": 1.0}
  if name == "early_exit":
    e = n_layers // 2 if exit_layer is None else int(exit_layer)
    if not 0 <= e < n_layers:
      raise ValueError(f"exit_layer={exit_layer} must be in [0, {n_layers}) for {n_layers} layers.")
    return {"insertion": list(range(e, n_layers)), "keep_ratio": [0.0] * (n_layers - e)}
  if name == "layer_skip":
    layers = mod_layer_indices("interleaved", n_layers)
    return {"insertion": "interleaved", "keep_ratio": [0.0] * len(layers)}
  raise ValueError(f"unknown baseline {name!r}; choose full, early_exit or layer_skip.")


class LayerExpert(nnx.Module):
  """The MoD router of one layer: a scalar score per token, Linear(d_model → 1). W [d], b []."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    # Small random init: breaks the ties a zero router would resolve to "first k tokens".
    self.kernel = param(rngs, nnx.initializers.normal(0.02), (d_model,), ("embed",))
    self.bias = param(rngs, _zeros, (), ())

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    """Router logits, float32 [b, l] (one per token; only vision tokens' are used)."""
    x = x_bld.astype(jnp.float32)
    return jnp.einsum("bld,d->bl", x, self.kernel[...].astype(jnp.float32)) + self.bias[...]


def select(
  scores_bfn: jax.Array | None, k: int, n: int, selection: str, batch_frames, rng: jax.Array | None
) -> jax.Array:
  """Indices of the kept tokens in each frame, int32 [b, f, k], ascending within a frame.

  Args:
    scores_bfn: router logits (``learned``), ignored otherwise.
    k, n: kept / total tokens per frame (static).
    selection: ``learned`` | ``random`` | ``uniform``.
    batch_frames: (b, f) for the index shape.
    rng: PRNG key for ``random``.
  """
  b, f = batch_frames
  if selection == "learned":
    if scores_bfn is None:
      raise ValueError("selection='learned' needs router scores (the layer has no router).")
    _, idx = jax.lax.top_k(scores_bfn, k)
  elif selection == "random":
    if rng is None:
      raise ValueError("selection='random' needs an rng key (pass rng= to the model call).")
    _, idx = jax.lax.top_k(jax.random.uniform(rng, (b, f, n)), k)
  elif selection == "uniform":
    stride = jnp.floor((jnp.arange(k) + 0.5) * n / k).astype(jnp.int32)
    idx = jnp.broadcast_to(stride, (b, f, k))
  else:
    raise ValueError(f"unknown selection {selection!r}; use learned, random or uniform.")
  return jnp.sort(idx.astype(jnp.int32), axis=-1)


def router_gate(scores: jax.Array, weighting: str, mix=0.0) -> jax.Array:
  """g(s) multiplying a routed token's block update, float32, same shape as ``scores``.

  ``mix`` (float or float32 [], in [0, 1]; ``ste`` only): the annealed gate's forward value
  ``mix·sigmoid(s) + (1 − mix)`` (module docstring); its gradient is sigmoid'(s) for any mix,
  and mix = 0 is exactly 1.0 forward."""
  if weighting == "ste":
    s = jax.nn.sigmoid(scores)
    ste = (s - jax.lax.stop_gradient(s)) + 1.0  # exactly 1.0 forward
    if isinstance(mix, (int, float)) and mix == 0:
      return ste
    return mix * s + (1.0 - mix) * ste
  if weighting == "sigmoid":
    return jax.nn.sigmoid(scores)
  if weighting == "score":
    return scores
  if weighting == "none":  # selection only (FastV): block(x) exactly, no router gradient
    return jnp.ones_like(scores)
  raise ValueError(f"unknown router weighting {weighting!r}; use ste, sigmoid, score or none.")


def routed_block(
  block: Callable,
  x_bld,
  seq: rows.TokenInfo,
  layout: rows.StreamLayout,
  *,
  k: int,
  selection: str,
  weighting: str,
  router: Callable | None = None,
  rng=None,
  allowed=None,
  mix=0.0,
  explore: float = 0.0,
):
  """Runs ``block`` on the text tokens and the per-frame top-k vision tokens; scatters back.

  Args:
    block: ``block(x [b, c, d], seq_c) -> [b, c, d]``, a decoder layer including its residual
      connections; ``seq_c`` is ``seq`` gathered to the compact sequence.
    x_bld: hidden states [b, l, d] in stream order.
    seq: the tokens' positions, segment ids and RoPE tables (``rows.TokenInfo``, [b, l, ...]),
      gathered with the tokens so the block sees their ORIGINAL values.
    layout: where the frames are (``rows.StreamLayout``: ``frame_start``, ``frame_of``,
      ``offset``; l = T + F·N).
    k: vision tokens kept per frame, 0 <= k <= N (static).
    selection, weighting: see :func:`select` and :func:`router_gate`.
    router: ``router(x [b, l, d]) -> logits float32 [b, l]`` (``learned`` selection).
    rng: PRNG key for ``random`` selection.
    allowed: bool [b, l] or None: vision tokens outside it are never processed (pruned before
      this layer, e.g. by DyCoke's TTM); a frame may then process fewer than k (the compact
      slots left over are padding, :func:`compact_block`).
    mix: float or float32 [] in [0, 1], the annealed gate's weight (:func:`router_gate`); 0 at
      evaluation and inference.
    explore: Gumbel exploration scale τ (``learned`` only): the top-k is taken of
      ``s + τ·mix·G`` (G from ``rng``); 0 or mix = 0: plain top-k.
  Returns:
    (x [b, l, d], aux) where aux holds the kept indices [b, f, k] (within each frame), the
    overflow count (always 0 here: C = T + F·k holds every kept token) and router statistics.
  Raises:
    ValueError: k outside [0, N].

  Context chunks (``layout.chunks`` = R > 1, ``mod_jax/model/rows.py``): the row is folded into
  its R chunks and everything above runs per chunk (each chunk's compact sequence is its
  T/R + (F/R)·k kept slots, on the chunk's device); only ``block`` sees the whole compact row,
  the chunks' compact sequences in order (still stream order), C = T + F·k.
  """
  if layout.chunks > 1:
    r = layout.chunks

    def block_of_chunks(x_c, seq_c):
      return rows.fold(block(rows.unfold(x_c, r), rows.unfold(seq_c, r)), r)

    out, chunk_aux = routed_block(
      block_of_chunks,
      rows.fold(x_bld, r),
      rows.fold(seq, r),
      layout.unchunked(),
      k=k,
      selection=selection,
      weighting=weighting,
      router=router,
      rng=rng,
      allowed=None if allowed is None else rows.fold(allowed, r),
      mix=mix,
      explore=explore,
    )
    for name in ("kept_index", "router_logits"):
      if name in chunk_aux:
        chunk_aux[name] = rows.unfold(chunk_aux[name], r)
    chunk_aux["overflow"] = chunk_aux["overflow"].reshape(-1, r).sum(axis=1)
    return rows.unfold(out, r), chunk_aux
  b, l, _ = x_bld.shape
  n = layout.tokens_per_frame
  f = layout.frame_start.shape[1]
  if not 0 <= k <= n:
    raise ValueError(f"k={k} must be in [0, tokens_per_frame={n}].")
  is_vis = layout.is_vision
  aux: dict[str, jax.Array] = {}
  scores = scores_bfn = None
  if k == 0:  # EarlyExit / LayerSkip: vision tokens skip the layer entirely.
    keep = ~is_vis
  else:
    scores = router(x_bld) if router is not None else None  # [b, l]
    if scores is not None and allowed is not None:
      scores = jnp.where(allowed | ~is_vis, scores, _PRUNED)
    frame_slots = layout.frame_tokens()  # [b, f, n]
    scores_bfn = (
      None
      if scores is None
      else jnp.take_along_axis(scores, frame_slots.reshape(b, f * n), axis=1).reshape(b, f, n)
    )
    idx = clean_idx = select(scores_bfn, k, n, selection, (b, f), rng)  # [b, f, k]
    exploring = not (isinstance(mix, (int, float)) and mix == 0) and explore > 0
    if exploring and selection == "learned" and scores_bfn is not None and rng is not None:
      noisy = scores_bfn + explore * mix * jax.random.gumbel(rng, scores_bfn.shape)
      idx = select(jax.lax.stop_gradient(noisy), k, n, selection, (b, f), None)
    # keep[j]: text, or the offset of vision slot j is among its frame's kept indices.
    kept_of_slot = jnp.take_along_axis(idx, jnp.maximum(layout.frame_of, 0)[..., None], axis=1)
    keep = ~is_vis | jnp.any(kept_of_slot == layout.offset[..., None], axis=-1)
    aux["kept_index"] = idx
  if allowed is not None:  # tokens pruned before this layer (DyCoke TTM) are never processed
    keep = keep & (allowed | ~is_vis)
  c = l - f * (n - k)  # = T + F·k, static
  gate = None
  if scores is not None and scores_bfn is not None and weighting != "none":
    gate = router_gate(scores, weighting, mix)
  out, aux["overflow"] = compact_block(block, x_bld, seq, keep, c, gate_bl=gate, gated_bl=is_vis)
  if scores is not None and scores_bfn is not None:
    s_kept = jnp.take_along_axis(scores_bfn, idx, axis=2)
    valid = rows.take(seq.segment_ids, frame_slots.reshape(b, f * n)).reshape(b, f, n) != 0
    aux["router_logits"] = scores_bfn
    aux["router_prob_kept"] = jnp.mean(jax.nn.sigmoid(s_kept))
    aux["router_prob_all"] = jnp.mean(jax.nn.sigmoid(scores_bfn))
    aux["router_bce_sum"], aux["router_bce_count"] = _router_bce(scores_bfn, clean_idx, valid)
  return out, aux


def compact_block(
  block: Callable, x_bld, seq: rows.TokenInfo, keep_bl, c: int, *, gate_bl=None, gated_bl=None
):
  """Runs ``block`` on the slots where ``keep`` (at most ``c`` of them), scatters the result back.

  The compact sequence is the kept slots in stream order (a stable sort of the keep flags), with
  their original positions, so it keeps the kernel-friendly causal mask. When fewer than ``c``
  slots are kept, the remaining compact slots are filled with unkept tokens marked as padding
  (segment id 0): they are never attended to and their outputs are discarded. When more than
  ``c`` are kept, the last ones in stream order skip the block and are COUNTED in the returned
  overflow, never dropped silently.

  Args:
    block: ``block(x [b, c, d], seq_c) -> [b, c, d]`` (residual connections included).
    x_bld: hidden states [b, l, d] in stream order; seq: their ``rows.TokenInfo``.
    keep_bl: bool [b, l], the slots to process.
    c: compact length (static), 0 < c <= l.
    gate_bl: float32 [b, l] or None: a processed slot of ``gated_bl`` (bool [b, l]; None: all)
      becomes ``x + g·(block(x) − x)`` (the MoD router weighting); others get ``block(x)``
      exactly.
  Returns:
    (x [b, l, d], overflow int32 [b]: kept slots beyond ``c``, which skipped the block).
  """
  perm = rows.sort_permutation((~keep_bl).astype(jnp.int32))  # kept slots first, stream order
  cidx = perm[:, :c]
  inverse = rows.inverse_permutation(perm)
  back = jnp.minimum(inverse, c)  # compact index of a slot (c: none)
  x_c = rows.gather_rows(x_bld, cidx, back)
  in_c = rows.take(keep_bl, cidx)
  seq_c = seq.take(cidx)
  seq_c = seq_c._replace(segment_ids=jnp.where(in_c, seq_c.segment_ids, 0))
  y_c = block(x_c, seq_c)
  if gate_bl is not None:
    gate_c = rows.take(gate_bl, cidx)[..., None]
    gated_c = True if gated_bl is None else rows.take(gated_bl, cidx)[..., None]
    y_c = jnp.where(gated_c, x_c + (y_c - x_c) * gate_c.astype(x_c.dtype), y_c)
  processed = keep_bl & (inverse < c)
  out = jnp.where(processed[..., None], rows.scatter_rows(y_c, back, cidx), x_bld)
  overflow = jnp.sum(keep_bl, axis=1, dtype=jnp.int32) - jnp.sum(in_c, axis=1, dtype=jnp.int32)
  return out, overflow


class SharedRouter(nnx.Module):
  """γ-MoD's shared vision-language router (arXiv 2410.13859 §3.2; reference
  ``llava_hr/model/language_model/llava_llama_mod.py``): one Linear(d_model → 2) used by every
  MoD layer on that layer's input-normed hidden state; P(process) = softmax(logits)[..., 1].
  W [d, 2], b [2]."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    self.kernel = param(rngs, nnx.initializers.normal(0.02), (d_model, 2), ("embed", None))
    self.bias = param(rngs, _zeros, (2,), (None,))

  def weights(self):
    """(W, b) as arrays, for use inside a scanned layer cycle."""
    return self.kernel[...], self.bias[...]


def shared_router_logits(weights, h_bld) -> jax.Array:
  """Logits float32 [b, l, 2] of :class:`SharedRouter` ``weights`` on normed hidden ``h``."""
  w, b = weights
  h = h_bld.astype(jnp.float32)
  return jnp.einsum("bld,dk->blk", h, w.astype(jnp.float32)) + b.astype(jnp.float32)


def sequence_routed_block(
  block: Callable,
  x_bld,
  seq: rows.TokenInfo,
  *,
  capacity: int,
  logits_bl2: jax.Array,
  routable_bl: jax.Array,
  weighting: str,
  threshold: float | None = None,
):
  """γ-MoD routing: top-C over the whole row, never-routed tokens forced in (masked routing).

  Training (``threshold`` None): each real token's P(process) p = softmax(logits)[..., 1]; the
  tokens that are NOT routable (system prompt, instruction and query text: masked routing
  learning) score p + 1 and so come first, padding scores −1; the top ``capacity`` = C slots
  (static) are processed, the rest skip the layer. If the never-routed tokens alone exceed C, the
  ones beyond C skip the layer too and are COUNTED in ``aux["forced_overflow"]`` (never silent).
  Sequence-level top-k is not causal, so at inference (``threshold`` set) a real token is
  processed iff it is not routable or p > threshold — a per-token rule, causal, which a stream
  reproduces exactly; the compact length is then L (no overflow possible).

  The routed tokens' update is weighted (``weighting``): ``sigmoid`` multiplies it by p (the
  reference multiplies the MLP output by p), ``ste`` uses forward value 1 with p's gradient,
  ``none`` leaves it unweighted; never-routed tokens are not weighted.

  Args:
    block: ``block(x [b, c, d], seq_c) -> [b, c, d]``.
    x_bld: [b, l, d] stream order; seq: its ``rows.TokenInfo`` (segment 0 = padding).
    capacity: C (static), 1 <= C <= l.
    logits_bl2: float32 [b, l, 2] router logits (:func:`shared_router_logits`).
    routable_bl: bool [b, l]: vision and answer tokens (may skip the layer).
    weighting: ``sigmoid`` | ``ste`` | ``none``.
    threshold: None (training, top-C) or the inference threshold on p.
  Returns:
    (x [b, l, d], aux): ``router_ce_sum`` / ``router_ce_count`` (2-class CE of the logits vs
    top-C membership over real tokens; training only), ``forced_overflow`` int32 [b],
    ``overflow`` int32 [b] (:func:`compact_block`), ``processed_fraction`` float32 [].
  Raises:
    ValueError: capacity outside [1, l] or an unknown weighting.
  """
  b, l, _ = x_bld.shape
  if not 1 <= capacity <= l:
    raise ValueError(f"capacity C={capacity} must be in [1, {l}] (the row length).")
  real = seq.segment_ids != 0
  routable = routable_bl & real
  prob = jax.nn.softmax(logits_bl2.astype(jnp.float32), axis=-1)[..., 1]
  aux: dict[str, jax.Array] = {}
  if threshold is None:
    score = jnp.where(real, prob + jnp.where(routable, 0.0, 1.0), -1.0)
    _, idx = jax.lax.top_k(score, capacity)
    member = jnp.zeros((b, l), bool).at[jnp.arange(b)[:, None], idx].set(True)
    keep, c = member & real, capacity
    forced = real & ~routable
    aux["forced_overflow"] = jnp.sum(forced & ~member, axis=1, dtype=jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_bl2, member.astype(jnp.int32))
    aux["router_ce_sum"] = jnp.sum(jnp.where(real, ce, 0.0))
    aux["router_ce_count"] = jnp.sum(real, dtype=jnp.float32)
  else:
    keep, c = real & (~routable | (prob > threshold)), l
    aux["forced_overflow"] = jnp.zeros((b,), jnp.int32)
  if weighting == "sigmoid":
    gate = prob
  elif weighting == "ste":
    gate = (prob - jax.lax.stop_gradient(prob)) + 1.0
  elif weighting == "none":
    gate = None
  else:
    raise ValueError(f"sequence routing weighting {weighting!r}: use sigmoid, ste or none.")
  out, aux["overflow"] = compact_block(block, x_bld, seq, keep, c, gate_bl=gate, gated_bl=routable)
  aux["processed_fraction"] = jnp.sum(keep) / jnp.maximum(jnp.sum(real), 1)
  aux["overflow"] = aux["overflow"] + aux["forced_overflow"]
  return out, aux


def _router_bce(scores_bfn: jax.Array, idx_bfk: jax.Array, valid_bfn: jax.Array):
  """Sum and count of the BCE of router logits [b, f, n] vs top-k membership (1 for the kept
  ``idx``) over valid tokens: the Mixture-of-Depths auxiliary router loss. float32 [] each
  (kept as a sum and a count so that gradient accumulation gives the full-batch mean)."""
  member = jnp.any(idx_bfk[..., None, :] == jnp.arange(scores_bfn.shape[-1])[:, None], axis=-1)
  bce = optax.sigmoid_binary_cross_entropy(scores_bfn, member.astype(jnp.float32))
  w = valid_bfn.astype(jnp.float32)
  return jnp.sum(bce * w), jnp.sum(w)
