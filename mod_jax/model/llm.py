"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2 via ``qkv_bias``) with MoD vision routing.

RMSNorm → GQA attention with RoPE → RMSNorm → SwiGLU, pre-norm residual blocks, optional tied
embeddings; matches transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` numerics. Layers
listed by the :class:`~mod_jax.model.mod.RoutingPlan` route vision tokens (``mod.routed_block``).

Stacked layers (MaxText's ``scan_layers``): the stack is cut into runs of a repeating layer cycle
(:func:`layer_runs` on the routing plan; ``interleaved`` is one (dense, MoD) cycle repeated n/2
times), and the layers at one cycle position of one run are stored as ONE module whose
parameters carry a leading axis of logical name ``layers`` (``Decoder.stacks``; their routers
likewise in ``Decoder.routers``, keyed by stack). A run is one ``lax.scan`` over those stacked
parameters, so the layer body is compiled once per cycle position and the optimizer sees a few
large leaves, whatever the depth; the streaming step (:meth:`Decoder.cached`) scans the same
runs with the stacks' KV caches (stacked likewise) in the carry. Layer i is stack s, row r
(:meth:`Decoder.slot`); :meth:`Decoder.layer` / :meth:`Decoder.router` give a view of it (HF /
GGUF import and export, the training-free methods and tests address layers through them).
``model.scan_layers = False`` runs the same stacked parameters as an unrolled Python loop over
the layers (the reference). Each cycle is rematerialised with ``REMAT_POLICIES[train.remat]``
(in ``Decoder._run``).

Shape letters: b batch, l/t tokens, d model width, v vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mod_jax.model import lora, mod, rows
from mod_jax.model.attention import Attention, rope_tables
from mod_jax.model.layers import RMSNorm, SwiGLU, dense_init
from mod_jax.model.linalg import project
from mod_jax.model.partitioning import param, shard

# Rematerialisation policies (``train.remat``), MaxText's names (``layers/decoders.py``,
# ``get_remat_policy``) where they exist. The named policies save projection OUTPUTS, LoRA
# included (``query_proj`` / ``key_proj`` / ``value_proj`` after RoPE, ``context`` = attention
# before the out-projection, ``out_proj``, ``mlpwi_0`` / ``mlpwi_1`` = gate / up, ``mlpwo`` =
# down; names set in attention.py and layers.py), so a LoRA branch's [*, d_out] product is not
# saved a second time as ``save_dots`` does. In a MoD layer every named tensor is computed on the
# compact sequence (C = T + F·k tokens, ``mod.routed_block``), so these policies save
# C / L of a dense layer's bytes there: what they keep shrinks with MoD, unlike the residual
# stream (the scanned cycle's input, [L, d], saved by every policy).
_QKV = ("query_proj", "key_proj", "value_proj")
REMAT_POLICIES = {
  "none": None,  # keep every activation
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # MaxText "minimal"
  "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*_QKV),  # MaxText's name
  "save_dot_except_mlpwi": jax.checkpoint_policies.save_only_these_names(  # MaxText's name
    *_QKV, "out_proj", "mlpwo"
  ),
  # every projection output (MaxText's "minimal_with_context" without the LoRA internals): the
  # backward pass recomputes only norms, RoPE, SwiGLU's product and attention (its kernel's own
  # residuals)
  "save_proj": jax.checkpoint_policies.save_only_these_names(
    *_QKV, "context", "out_proj", "mlpwi_0", "mlpwi_1", "mlpwo"
  ),
  # ``save_proj`` less the down-projection output, the 8B config's default. A dense layer never
  # needs ``mlpwo`` (its output only joins the residual stream, which the next layer saves), so a
  # dense stack saves the same; a (dense, MoD) cycle saved it twice: the dense layer's [L, d], to
  # rebuild the MoD layer's full-length input (its router reads every token), and the MoD
  # layer's [C, d], for the gate's gradient (x + g·(y − x)). Without it the backward pass recomputes
  # the down projection (from the saved ``mlpwi_*``) once per layer of the cycle.
  "save_proj_except_mlpwo": jax.checkpoint_policies.save_only_these_names(
    *_QKV, "context", "out_proj", "mlpwi_0", "mlpwi_1"
  ),
}


def layer_runs(kinds: Sequence[Hashable]) -> tuple[tuple[int, int, int], ...]:
  """Splits a layer stack into runs of a repeating cycle: ``(start, period, repeats)``.

  ``kinds[i]`` is what makes layer i different (its routing); a run repeats the cycle
  ``kinds[start:start + period]`` ``repeats`` times, and is scanned (one compiled body) when
  repeats > 1. Periods 1 and 2 are tried, the one covering more layers wins (ties: 1), e.g.
  ``interleaved`` over 32 layers is one run (0, 2, 16); ``all_deep`` is (0, 1, 16), (16, 1, 16);
  an arbitrary list falls back to short runs.
  """
  runs, i, n = [], 0, len(kinds)
  while i < n:
    best = (1, 1)
    for period in (1, 2):
      reps = 1 if i + period <= n else 0
      while (
        reps
        and i + (reps + 1) * period <= n
        and (
          tuple(kinds[i + reps * period : i + (reps + 1) * period]) == tuple(kinds[i : i + period])
        )
      ):
        reps += 1
      if reps * period > best[0] * best[1]:
        best = (period, reps)
    runs.append((i, *best))
    i += best[0] * best[1]
  return tuple(runs)


def stack_layout(plan: mod.RoutingPlan, n_layers: int):
  """How ``Decoder`` stores its layers: ``(runs, members, slots)``.

  ``runs``: :func:`layer_runs` of the plan's per-layer kinds (k kept, own router);
  ``members[s]``: the layers stacked in stack s (cycle position j of a run: layers
  start + r·period + j, r = 0..repeats-1), stacks ordered by run then position; ``slots[i]``:
  (s, r) of layer i. E.g. ``interleaved`` over 4 layers: runs ((0, 2, 2),), members ((0, 2),
  (1, 3)), slots ((0, 0), (1, 0), (0, 1), (1, 1)).
  """
  runs = layer_runs([(plan.keep[i], plan.needs_router(i)) for i in range(n_layers)])
  members = tuple(
    tuple(start + r * period + j for r in range(reps))
    for start, period, reps in runs
    for j in range(period)
  )
  where = {i: (s, r) for s, m in enumerate(members) for r, i in enumerate(m)}
  return runs, members, tuple(where[i] for i in range(n_layers))


def layer_slots(cfg) -> tuple[tuple[int, int], ...]:
  """(s, r) per layer of the decoder of ``cfg`` (a ``config.model``): layer i's parameters are
  row r of ``Decoder.stacks[s]`` (:func:`stack_layout`)."""
  return stack_layout(mod.RoutingPlan.from_config(cfg), int(cfg.n_layers))[2]


LAYERS = "layers"  # logical name of the stacked layer axis (mesh.logical_axis_rules: unsharded)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def stack_modules(modules: Sequence[Any]) -> Any:
  """One module shaped like ``modules[0]`` whose every variable is the modules' variables stacked
  along a new leading axis, [len(modules), ...], with the logical name ``layers`` prepended to its
  ``out_sharding`` (MaxText's ``param_scan_axis`` 0). The modules must share one structure."""
  graphdef = nnx.split(modules[0])[0]

  def stack(*vs):
    names = vs[0].get_metadata().get("out_sharding")
    meta = {} if names is None else {"out_sharding": (LAYERS, *names)}
    return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **meta)

  states = [nnx.state(m) for m in modules]
  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_variable))


def unstacked(state, index=None):
  """The ``nnx.State`` of a stacked module (:func:`stack_modules`) with per-layer metadata
  (``layers`` dropped from ``out_sharding``): its row ``index`` (an int or a traced int32 [])
  when given, else every row (for ``lax.scan``, which slices the rows itself)."""

  def one(v):
    names = v.get_metadata().get("out_sharding")
    meta = {} if not names else {"out_sharding": tuple(names[1:])}
    x = v.get_value()
    return v.replace(x if index is None else x[index], **meta)

  return jax.tree.map(one, state, is_leaf=_is_variable)


def row_of(stacked, r):
  """Row ``r`` of a stacked module (:func:`stack_modules`) as a module of its own: a view whose
  parameters are slices of the stacked arrays (traced inside a transform)."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, unstacked(state, r))


def _per_layer(auxes, start: int, period: int, reps: int) -> dict:
  """A scanned run's aux (per cycle position, stacked over the ``reps`` cycles) as
  {"layer_i": aux of layer i}."""
  return {
    f"layer_{start + r * period + j}": jax.tree.map(lambda v, r=r: v[r], a)
    for j, a in enumerate(auxes)
    if a
    for r in range(reps)
  }


class DecoderLayer(nnx.Module):
  """One pre-norm block: x + attn(norm(x)); then + mlp(norm(·))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    self.input_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, rules=rules)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, rngs=rngs)
    self.mlp = SwiGLU(
      cfg.d_model,
      cfg.d_ff,
      rngs=rngs,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
    )
    self.rules = rules

  def __call__(
    self, x_bld, positions_bl, segment_ids_bl, rng=None, *, rope=None, ordered: bool = False
  ) -> jax.Array:
    """x [b, l, d]; positions, segment ids int32 [b, l]. ``rope``: the row's RoPE tables (else
    computed from positions); ``ordered``: tokens are in stream order (kernel attention, see
    ``Attention``); ``rng``: LoRA dropout key (training only)."""
    x = x_bld + self.attn(
      self.input_norm(x_bld),
      positions_bl,
      segment_ids_bl,
      lora.fold(rng, 0),
      rope=rope,
      ordered=ordered,
    ).astype(x_bld.dtype)
    x = x + self.mlp(self.post_attn_norm(x), lora.fold(rng, 1)).astype(x.dtype)
    return shard(x, ("batch", "length", "embed"), self.rules)

  def cached(
    self,
    x_bld,
    positions_bl,
    segment_ids_bl,
    cache,
    *,
    rope=None,
    rope_offset=0,
    visible=None,
    row=None,
  ):
    """The block over new tokens with this layer's KV cache (``Attention.cached``, ``visible``
    and ``row`` included: with ``row``, ``cache`` is its stack's and is written at that row);
    returns (x [b, l, d], the updated cache)."""
    a, cache = self.attn.cached(
      self.input_norm(x_bld),
      positions_bl,
      segment_ids_bl,
      cache,
      rope=rope,
      rope_offset=rope_offset,
      visible=visible,
      row=row,
    )
    x = x_bld + a.astype(x_bld.dtype)
    x = x + self.mlp(self.post_attn_norm(x)).astype(x.dtype)
    return x, cache

  def block(self, rng, ordered: bool, x_bld, seq: rows.TokenInfo) -> jax.Array:
    """The layer as ``block(x, seq)`` for ``mod.routed_block`` / ``compact_block`` once ``rng``
    (LoRA dropout) and ``ordered`` are bound (``functools.partial``)."""
    return self(x_bld, seq.positions, seq.segment_ids, rng, rope=seq.rope, ordered=ordered)

  def cached_block(
    self, cache, written: list, rope_offset, visible, x_bld, seq: rows.TokenInfo, *, row=None
  ):
    """:meth:`cached` as ``block(x, seq)`` once the cache, ``written``, ``rope_offset``,
    ``visible`` and ``row`` (the layer's row of a stacked ``cache``, or None) are bound; the
    updated cache (the whole stack with ``row``) is appended to ``written`` (the block may run
    inside ``mod.routed_block``, which returns only x)."""
    y, c = self.cached(
      x_bld,
      seq.positions,
      seq.segment_ids,
      cache,
      rope=seq.rope,
      rope_offset=rope_offset,
      visible=visible,
      row=row,
    )
    written.append(c)
    return y


class Decoder(nnx.Module):
  """Token embedding, decoder layers (some with a LayerExpert router), final norm, LM head.

  Layers are stored stacked (module docstring): ``stacks[s]`` is a :class:`DecoderLayer` whose
  parameters have a leading ``layers`` axis over the layers ``members[s]`` (one cycle position
  of one run of :func:`layer_runs`), ``routers[str(s)]`` their stacked LayerExperts (absent when
  the position has none). Static: ``n_layers``, ``runs`` ((start, period, repeats) per run),
  ``members`` (the layers of each stack), ``slots`` ((s, r) per layer).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, rules=None):
    pdt = jnp.dtype(cfg.param_dtype)
    self.plan = mod.RoutingPlan.from_config(cfg)
    n = self.n_layers = int(cfg.n_layers)
    self.embed = param(
      rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt
    )
    # Layers are created one by one, then stacked: layer i draws the same weights whatever the
    # stacking (a MoD model and its dense counterpart, scan_layers on or off).
    layers = [DecoderLayer(cfg, rngs=rngs, rules=rules) for _ in range(n)]
    self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, rngs=rngs)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else param(
        rngs, dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt
      )
    )
    # Routers last, so a MoD model and its dense counterpart draw identical weights for a seed.
    routers = {
      i: mod.LayerExpert(cfg.d_model, rngs=rngs) for i in range(n) if self.plan.needs_router(i)
    }
    # γ-MoD: one router shared by every MoD layer (sequence routing), after the LayerExperts.
    self.shared_router = (
      mod.SharedRouter(cfg.d_model, rngs=rngs)
      if self.plan.routing == "sequence" and any(self.plan.routed(i) for i in range(n))
      else None
    )
    self.deterministic = False  # nnx .eval() sets it: sequence routing then uses its threshold
    lora_cfg = cfg.get("lora")
    self.lora_dropout = bool(lora_cfg and lora_cfg.rank > 0 and lora_cfg.dropout > 0)
    if lora_cfg and lora_cfg.rank > 0:  # adapters after everything else (same base init)
      lora.attach(self, cfg, rngs=rngs, layers=layers)
    # Storage: one stacked module per cycle position of each run (the routing plan decides the
    # runs, text-only calls included, so the parameter tree does not depend on the input).
    self.runs, self.members, self.slots = stack_layout(self.plan, n)  # tuples: hashable
    self.stacks = nnx.List([stack_modules([layers[i] for i in m]) for m in self.members])
    self.routers = nnx.Dict(
      {
        str(s): stack_modules([routers[i] for i in m])
        for s, m in enumerate(self.members)
        if m[0] in routers
      }
    )
    self.dtype = jnp.dtype(cfg.dtype)
    self.scan_layers = bool(cfg.get("scan_layers", True))
    self.rules = rules
    self.compress = None  # a training-free peer method (mod_jax.compress.apply.attach)

  # ----------------------------------------------------------------------- layer i
  def slot(self, i: int) -> tuple[int, int]:
    """(s, r): layer ``i``'s parameters are row r of ``stacks[s]`` (its router's of
    ``routers[str(s)]``). Raises IndexError for a layer outside 0..n_layers - 1."""
    if not 0 <= i < self.n_layers:
      raise IndexError(f"layer {i} is outside 0..{self.n_layers - 1}.")
    return self.slots[i]

  def layer(self, i: int) -> DecoderLayer:
    """Layer ``i`` as a :class:`DecoderLayer` of its own: a view whose parameters are row r of
    the stacked arrays (traced slices inside a transform, so gradients reach the stack).
    Setting its parameters does not change the model: write ``nnx.state(self)['stacks'][s]``
    at row r (:meth:`slot`)."""
    s, r = self.slot(i)
    return row_of(self.stacks[s], r)

  def router(self, i: int) -> mod.LayerExpert | None:
    """Layer ``i``'s LayerExpert (a view, as :meth:`layer`), or None when it has none."""
    s, r = self.slot(i)
    stacked = self.routers.get(str(s))
    return None if stacked is None else row_of(stacked, r)

  def layer_cache(self, caches, i: int):
    """Layer ``i``'s ``KVCache`` of the stacked caches (``streaming.empty_caches``): row r of
    ``caches[s]``."""
    s, r = self.slot(i)
    return caches[s].row(r)

  @property
  def inv_freq(self) -> tuple[float, ...]:
    """RoPE inverse frequencies (static; every layer has the same)."""
    return self.stacks[0].attn.inv_freq

  def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
    """int32 [b, t] -> [b, t, d] in the compute dtype."""
    # Gather rows from a table replicated along vocab (all-gathered over its 'vocab' shards):
    # GSPMD cannot gather from a vocab-sharded table without rematerialising it whole.
    table = shard(self.embed[...], (None, "embed"), self.rules)
    x = jnp.take(table, tokens_bt, axis=0).astype(self.dtype)
    return shard(x, ("batch", "length", "embed"), self.rules)

  def __call__(
    self,
    x_bld: jax.Array,
    seq: rows.TokenInfo,
    layout: rows.StreamLayout | None = None,
    *,
    rng: jax.Array | None = None,
    remat: str = "none",
    ordered: bool = True,
    vision_keep: jax.Array | None = None,
    routable: jax.Array | None = None,
    router_mix=0.0,
  ):
    """Runs all layers; returns (final-normed hidden [b, l, d], aux per routed layer).

    Args:
      x_bld: embedded tokens [b, l, d], in stream order when ``ordered``.
      seq: their positions, segment ids and (optionally) RoPE tables; tables are computed here
        once for all layers when absent.
      layout: where the frames are (``rows.StreamLayout``); None for text only, where no layer
        routes anything.
      rng: routing key (``random`` selection) and LoRA dropout key.
      remat: a key of ``REMAT_POLICIES`` (``train.remat``), applied to each scanned cycle or
        layer.
      ordered: tokens are in stream order, so attention runs on the configured kernel; False
        uses the position mask (any order; the reference).
      vision_keep: bool [b, f, n], vision tokens a training-free method keeps (DyCoke TTM in
        streaming; ``mod_jax/compress/apply.py``); used only with ``self.compress``.
      routable: bool [b, l] (stream order), the tokens sequence routing (γ-MoD) may skip:
        vision and answer tokens; default the vision tokens.
      router_mix: float or float32 [], the annealed router gate's weight during training
        (``mod.router_gate``; ``model.mod.router_anneal_steps``); 0 at evaluation / inference.
    Raises:
      ValueError: an unknown ``remat`` policy.
    """
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
    if seq.rope is None:
      seq = seq._replace(rope=rope_tables(seq.positions, self.inv_freq))
    if layout is not None and layout.frame_start.shape[1] == 0:
      layout = None
    drop = lora.fold(rng, lora.DROPOUT_STREAM) if self.lora_dropout else None
    aux = {}
    x = x_bld
    if self.compress is not None:  # FastV / DyCoke: layer by layer (mod_jax/compress/apply.py)
      from mod_jax.compress import apply

      x, aux, _, _ = apply.run_layers(
        self, x, seq, layout, rng=rng, drop=drop, ordered=ordered, vision_keep=vision_keep
      )
      return self.final_norm(x), aux
    ctx = self._sequence_routing(layout, routable)
    for run in range(len(self.runs)):
      x, run_aux = self._run(run, x, seq, layout, rng, drop, ordered, remat, ctx, router_mix)
      aux.update(run_aux)
    return self.final_norm(x), aux

  def cached(
    self, x_bld, seq: rows.TokenInfo, layout, caches, *, rope_offset=0, rng=None, state=None
  ):
    """Streaming: all layers over new tokens with their KV caches (``Attention.cached``).

    Runs as :meth:`__call__` does: one ``lax.scan`` per run of the layer cycle over the stacked
    parameters, the stacks' caches carried through it (layer r of a stack reads and writes row r).

    Args:
      x_bld: embedded new tokens [b, l, d] (any slot order; padding has segment id 0).
      seq: their absolute stream positions and segment ids (``rope`` is ignored: the tables are
        computed at ``positions - rope_offset``).
      layout: where the frames are (``rows.StreamLayout``), or None for text only.
      caches: one ``attention.KVCache`` per stack of layers, with a leading axis over its layers
        (``mod_jax.infer.streaming.empty_caches``; layer i's: :meth:`layer_cache`).
      rope_offset: int32 [], the re-basing of the stream's positions (``KVCache.rope_positions``).
      rng: routing key (``random`` selection).
      state: with ``self.compress`` (FastV / DyCoke), the method's per-stream state
        (``mod_jax.compress.apply.StreamState``, from ``apply.empty_state``); else None.
    Returns:
      (final-normed hidden [b, l, d], aux per routed layer, tuple of the updated caches, the
      updated ``state``: None without ``self.compress``).
    Raises:
      ValueError: ``len(caches)`` is not the number of stacks, or ``state`` is missing for a
        compressed model.
    """
    if len(caches) != len(self.stacks):
      raise ValueError(f"{len(caches)} KV caches for {len(self.stacks)} stacks of layers.")
    seq = seq._replace(rope=rope_tables(seq.positions - rope_offset, self.inv_freq))
    if layout is not None and layout.frame_start.shape[1] == 0:
      layout = None
    if self.compress is not None:  # FastV / DyCoke: layer by layer (mod_jax/compress/apply.py)
      from mod_jax.compress import apply

      if state is None:
        raise ValueError(
          f"streaming with --compress {self.compress} needs its state: "
          f"mod_jax.compress.apply.empty_state(model, batch, sizes)."
        )
      x, aux, caches, state = apply.run_layers(
        self,
        x_bld,
        seq,
        layout,
        rng=rng,
        drop=None,
        ordered=False,
        caches=caches,
        state=state,
        rope_offset=rope_offset,
      )
      return self.final_norm(x), aux, caches, state
    ctx = self._sequence_routing(layout)  # γ-MoD at inference: vision tokens routable
    x, aux, caches = x_bld, {}, tuple(caches)
    for run in range(len(self.runs)):
      x, caches, run_aux = self._cached_run(run, x, seq, layout, caches, rope_offset, rng, ctx)
      aux.update(run_aux)
    return self.final_norm(x), aux, caches, None

  def _cached_run(self, run, x, seq, layout, caches, rope_offset, rng, ctx):
    """Run ``run`` of the streaming step (:meth:`cached`): as :meth:`_run`, with the run's
    stacked caches in the scan's carry; returns (x, all caches, {"layer_i": aux}).

    Layer r of a stack writes its new entries straight into row r of the carried stack
    (``KVCache.write(row=r)``) and reads its row as slices of it, so the carry (aliased to the
    step's donated caches) is updated in place; slicing the row out and setting it back made
    XLA copy one layer's K and V (2 x 33 MB per dense layer of the 8B config's window)."""
    start, period, reps, first, graphdefs, states = self._run_parts(run)

    def cycle(carry, states, r):
      x, run_caches = carry
      auxes, new = [], []
      for j, ((layer_gd, router_gd), (layer_st, router_st)) in enumerate(zip(graphdefs, states)):
        layer = nnx.merge(layer_gd, layer_st)
        router = None if router_gd is None else nnx.merge(router_gd, router_st)
        written: list[Any] = []  # the block runs once, inside routed_block for a MoD layer
        block = functools.partial(
          layer.cached_block, run_caches[j], written, rope_offset, None, row=r
        )
        i = start + r * period + j
        x, a = self._route(
          i, self.plan.keep[start + j], block, router, x, seq, layout, rng, ctx, layer
        )
        new.append(written[0])
        auxes.append(a)
      return (x, tuple(new)), auxes

    (x, run_caches), out = self._repeat(run, cycle, (x, caches[first : first + period]), states)
    return x, (*caches[:first], *run_caches, *caches[first + period :]), out

  def _sequence_routing(self, layout, routable=None):
    """γ-MoD's (shared router weights, routable flags [b, l]) or None (per-frame routing, or no
    frames); ``routable`` defaults to the vision tokens."""
    if self.shared_router is None or layout is None:
      return None
    return self.shared_router.weights(), layout.is_vision if routable is None else routable

  def router_fn(self, router, layer):
    """Layer ``layer``'s LayerExpert as ``router(x [b, l, d]) -> logits [b, l]`` on the residual
    stream (``router_input='hidden'``, VideoLLM-MoD) or on the layer's input-norm output
    (``'normed'``, as γ-MoD's router); None when the layer has no router."""
    if router is None or self.plan.router_input == "hidden":
      return router
    return lambda x: router(layer.input_norm(x))

  def _apply(self, i, keep, layer, router, x, seq, layout, rng, drop, ordered, ctx=None, mix=0.0):
    """Decoder layer ``i`` (a Python or traced int) on x: through ``mod.routed_block`` when
    ``keep`` (the plan's k for it) is set and there are frames (``mod.sequence_routed_block``
    with the shared router and ``ctx`` = (router weights, routable flags) for γ-MoD sequence
    routing); LoRA dropout key from ``drop``."""
    lrng = None if drop is None else jax.random.fold_in(drop, i)
    block = functools.partial(layer.block, lrng, ordered)
    return self._route(i, keep, block, router, x, seq, layout, rng, ctx, layer, mix)

  def _route(self, i, keep, block, router, x, seq, layout, rng, ctx=None, layer=None, mix=0.0):
    """``block(x, seq)`` on all tokens, or through ``mod.routed_block`` (layer ``i`` keeps
    ``keep`` vision tokens per frame) when ``keep`` is set and there are frames; γ-MoD sequence
    routing (``mod.sequence_routed_block``) with ``ctx`` = (shared router weights, routable
    flags) and ``layer``'s input norm."""
    if layout is None or keep is None:
      return block(x, seq), {}
    if self.plan.routing == "sequence":
      weights, routable = ctx
      length = x.shape[1]
      capacity = max(1, min(length, math.ceil(self.plan.capacity * length - 1e-9)))
      return mod.sequence_routed_block(
        block,
        x,
        seq,
        capacity=capacity,
        logits_bl2=mod.shared_router_logits(weights, layer.input_norm(x)),
        routable_bl=routable,
        weighting=self.plan.weighting,
        threshold=self.plan.threshold if self.deterministic else None,  # None: top-C
      )
    return mod.routed_block(
      block,
      x,
      seq,
      layout,
      k=keep,
      selection=self.plan.selection,
      weighting=self.plan.weighting,
      router=self.router_fn(router, layer),
      rng=lora.fold(rng, i),
      mix=mix,
      explore=self.plan.explore,
    )

  def _run_parts(self, run):
    """(start, period, reps, first stack, per cycle position (layer, router) graphdefs, per
    position (layer, router) states: stacked, with per-layer metadata) of run ``run``."""
    start, period, reps = self.runs[run]
    first = sum(p for _, p, _ in self.runs[:run])  # the stack of the run's cycle position 0
    graphdefs, states = [], []
    for s in range(first, first + period):
      layer_gd, layer_st = nnx.split(self.stacks[s])
      stacked_router = self.routers.get(str(s))
      router_gd, router_st = (
        nnx.split(stacked_router) if stacked_router is not None else (None,) * 2
      )
      graphdefs.append((layer_gd, router_gd))
      states.append((unstacked(layer_st), None if router_st is None else unstacked(router_st)))
    return start, period, reps, first, graphdefs, states

  def _run(self, run, x, seq, layout, rng, drop, ordered, remat, ctx=None, mix=0.0):
    """Run ``run`` of :attr:`runs`: a cycle of ``period`` layers repeated ``reps`` times over
    the stacked parameters of its ``period`` stacks, as one ``lax.scan`` when ``scan_layers``
    and reps > 1 (one compiled body whatever the depth; MaxText's scanned layers), else an
    unrolled loop over the rows. Each cycle is rematerialised with ``REMAT_POLICIES[remat]``.
    Returns (x, {"layer_i": aux}).
    """
    start, period, reps, _, graphdefs, states = self._run_parts(run)

    def cycle(x, states, r):
      auxes = []
      for j, ((layer_gd, router_gd), (layer_st, router_st)) in enumerate(zip(graphdefs, states)):
        layer = nnx.merge(layer_gd, layer_st)
        router = None if router_gd is None else nnx.merge(router_gd, router_st)
        x, a = self._apply(
          start + r * period + j,
          self.plan.keep[start + j],
          layer,
          router,
          x,
          seq,
          layout,
          rng,
          drop,
          ordered,
          ctx,
          mix,
        )
        auxes.append(a)
      return x, auxes

    if remat != "none":
      prevent_cse = not self._scanned(run)
      cycle = jax.checkpoint(cycle, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)
    return self._repeat(run, cycle, x, states)

  def _scanned(self, run) -> bool:
    """Whether run ``run`` is one ``lax.scan`` (``scan_layers`` and more than one cycle)."""
    return self.scan_layers and self.runs[run][2] > 1

  def _repeat(self, run, cycle, carry, states):
    """``cycle(carry, states of row r, r) -> (carry, auxes per cycle position)`` over the
    ``reps`` rows of run ``run``'s stacked ``states``: one ``lax.scan`` (:meth:`_scanned`), else
    an unrolled loop. Returns (carry, {"layer_i": aux}); shared by :meth:`_run` (training) and
    :meth:`_cached_run` (streaming)."""
    start, period, reps = self.runs[run]
    if self._scanned(run):
      carry, auxes = jax.lax.scan(
        lambda c, xs: cycle(c, *xs), carry, (states, jnp.arange(reps, dtype=jnp.int32))
      )
      return carry, _per_layer(auxes, start, period, reps)
    out = {}
    for r in range(reps):
      carry, auxes = cycle(carry, jax.tree.map(lambda v, r=r: v[r], states), r)
      out.update({f"layer_{start + r * period + j}": a for j, a in enumerate(auxes) if a})
    return carry, out

  def logits(self, h_btd: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """LM head, float32 [b, t, v] (accumulated in float32). ``rng``: LoRA dropout key."""
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    y = project(h_btd.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)
    drop = lora.fold(rng, lora.DROPOUT_STREAM) if self.lora_dropout else None
    delta = lora.adapter(self, "lm_head", h_btd, lora.fold(drop, self.n_layers), self.dtype)
    return y if delta is None else y + delta.astype(jnp.float32)

  def cross_entropy(
    self, h_bmd: jax.Array, targets_bm: jax.Array, rng: jax.Array | None = None, *, chunk: int = 512
  ):
    """LM head + token cross-entropy in chunks of ``chunk`` slots, never all logits at once.

    Each chunk's logits [b, chunk, V] (float32) are computed, reduced to the CE and the argmax,
    and dropped; the backward pass recomputes them (``jax.checkpoint``), so memory is
    O(b · chunk · V) instead of O(b · m · V) (the 8B config: 5,296 slots x 128,256 vocab would
    be 2.5 GiB per row in float32).

    Args:
      h_bmd: final-normed hidden states [b, m, d] at the slots that carry a loss.
      targets_bm: int32 [b, m] next-token ids.
      rng: LoRA dropout key (training only).
      chunk: slots per chunk (static); m need not be a multiple.
    Returns:
      (ce float32 [b, m], argmax int32 [b, m]).
    """
    b, m, d = h_bmd.shape
    c = max(1, min(chunk, m))
    nc = -(-m // c)
    pad = nc * c - m
    h = jnp.pad(h_bmd, ((0, 0), (0, pad), (0, 0))).reshape(b, nc, c, d).swapaxes(0, 1)
    tg = jnp.pad(targets_bm, ((0, 0), (0, pad))).reshape(b, nc, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(xs):
      h_c, t_c, j = xs
      logits = self.logits(h_c, lora.fold(rng, j))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, t_c)
      return ce, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    ce, pred = jax.lax.map(one, (h, tg, jnp.arange(nc, dtype=jnp.int32)))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(b, nc * c)[:, :m]
    return unchunk(ce), unchunk(pred)

  def text_logits(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
    """Plain causal LM call on token ids int32 [b, t] -> logits float32 [b, t, v].

    Without ``positions`` the tokens are 0..t-1 in order (kernel attention); with them, the
    position mask is used (any order)."""
    b, t = tokens_bt.shape
    ordered = positions_bt is None
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if positions_bt is not None:
      positions = positions_bt
    seq = rows.TokenInfo(positions, jnp.ones((b, t), jnp.int32))
    h, _ = self(self.embed_tokens(tokens_bt), seq, ordered=ordered)
    return self.logits(h)
