"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Loss (VideoLLM-online, docs/design.md §2): token cross-entropy summed over labelled text slots (weight 1)
and frame-end slots (weight ``stream_loss_weight``), divided by the number of labelled tokens of
the whole batch. The LM head and cross-entropy run in chunks of slots (``Decoder.cross_entropy``)
so that full-vocabulary logits never exist at once.

Gradient accumulation (``train.grad_accum_steps`` = A): the batch of B rows is split into A
micro-batches of B / A rows (row r goes to micro-batch r mod A, so each keeps its share of every
device's rows), run one after another in a ``lax.scan``; gradients are summed in float32
accumulators over the trainable parameters only. Each micro-batch's loss is divided by the
WHOLE batch's label count, so the accumulated gradient equals the full-batch gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mod_jax.model import rows
from mod_jax.train.state import TrainState, trainable_labels


def _denominators(batch) -> dict[str, jax.Array]:
  """Whole-batch counts that normalise the loss: labelled slots, and real frames (router BCE)."""
  return {
    "labelled": jnp.maximum(batch["text_weights"].sum() + batch["frame_weights"].sum(), 1.0),
    "frames": jnp.maximum((batch["frame_segment_ids"] != 0).sum().astype(jnp.float32), 1.0),
  }


def forward_losses(model, batch, rng, *, remat: str = "none", ce_chunk: int = 512, router_mix=0.0):
  """Per-slot CE and argmax at text and frame-end slots; returns (dict of [b, T] / [b, F]
  arrays, the model aux). ``router_mix``: the annealed router gate's weight (training)."""
  h_text, h_end, aux = model.hidden(batch, rng=rng, remat=remat, router_mix=router_mix)
  # With a context axis of size R each device computes the loss of its own chunk of every row
  # (its T/R text slots and F/R frame ends; mod_jax/model/rows.py): fold, then unfold the CE.
  r = rows.context_chunks(model.rules)
  fold = lambda *xs: rows.fold(xs, r, model.rules)
  h_text, h_end, t_tg, f_tg = fold(h_text, h_end, batch["text_targets"], batch["frame_targets"])
  t = h_text.shape[1]
  h = jnp.concatenate([h_text, h_end], axis=1)
  targets = jnp.concatenate([t_tg, f_tg], axis=1)
  ce, pred = model.llm.cross_entropy(h, targets, rng, chunk=ce_chunk)
  text_ce, frame_ce, text_pred, frame_pred = rows.unfold(
    (ce[:, :t], ce[:, t:], pred[:, :t], pred[:, t:]), r
  )
  return dict(
    text_ce=text_ce,
    frame_ce=frame_ce,
    text_pred=text_pred,
    frame_pred=frame_pred,
    text_w=batch["text_weights"].astype(jnp.float32),
    frame_w=batch["frame_weights"].astype(jnp.float32),
  ), aux


def loss_fn(
  params,
  graphdef,
  batch,
  rng,
  *,
  stream_loss_weight: float,
  router_aux_weight: float = 0.0,
  denominators=None,
  remat: str = "none",
  ce_chunk: int = 512,
  router_mix=0.0,
):
  """The training loss of ``batch`` and the sums its metrics are made of.

  Args:
    params: ``nnx.State`` of the model's parameters; graphdef: its static structure.
    batch: a (micro-)batch in the slot layout (``mod_jax/model/video_llm.py``).
    rng: routing / LoRA dropout key.
    stream_loss_weight: weight of the frame-end (streaming decision) CE.
    router_aux_weight: weight of the Mixture-of-Depths router BCE (``mod.py``; config
      ``model.mod.router_aux_loss_weight``); its value is a metric whatever the weight.
    denominators: whole-batch counts (:func:`_denominators`); default: this batch's.
    remat: ``train.remat`` policy; ce_chunk: slots per LM-head chunk.
    router_mix: float32 [], the annealed router gate's weight (:func:`router_mix`).
  Returns:
    (loss float32 [], sums: dict of float32 [] that add up over micro-batches).
  """
  model = nnx.merge(graphdef, params)
  den = _denominators(batch) if denominators is None else denominators
  out, aux = forward_losses(
    model, batch, rng, remat=remat, ce_chunk=ce_chunk, router_mix=router_mix
  )
  text_sum = (out["text_ce"] * out["text_w"]).sum()
  frame_sum = (out["frame_ce"] * out["frame_w"]).sum()
  loss = (text_sum + stream_loss_weight * frame_sum) / den["labelled"]
  sums = {
    "loss": loss,
    "text_ce_sum": text_sum,
    "frame_ce_sum": frame_sum,
    "text_count": out["text_w"].sum(),
    "frame_count": out["frame_w"].sum(),
    "frame_correct": ((out["frame_pred"] == batch["frame_targets"]) * out["frame_w"]).sum(),
  }
  bce = [a["router_bce_sum"] for a in aux.values() if "router_bce_sum" in a]
  if bce:
    router_aux = sum(bce) / (den["frames"] * model.tokens_per_frame)
    sums["router_aux_loss"] = router_aux
    if router_aux_weight > 0:
      loss = loss + router_aux_weight * router_aux
      sums["loss"] = loss
  ce = [  # γ-MoD sequence routing: 2-class router CE per layer (a per-micro-batch mean)
    a["router_ce_sum"] / jnp.maximum(a["router_ce_count"], 1.0)
    for a in aux.values()
    if "router_ce_sum" in a
  ]
  if ce:
    sums["router_aux_loss"] = sum(ce)
    if router_aux_weight > 0:
      loss = loss + router_aux_weight * sums["router_aux_loss"]
      sums["loss"] = loss
  for name, a in aux.items():  # per micro-batch means (averaged over micro-batches)
    if "processed_fraction" in a:
      sums[f"router/{name}/processed"] = a["processed_fraction"]
      sums[f"router/{name}/forced_overflow"] = jnp.sum(a["forced_overflow"]).astype(jnp.float32)
    if "kept_index" in a:  # how often the pooled (CLS-like) token 0 of a frame is kept
      sums[f"router/{name}/pooled_token_kept"] = jnp.mean(
        jnp.any(a["kept_index"] == 0, axis=-1).astype(jnp.float32)
      )
    if "router_prob_kept" in a:
      sums[f"router/{name}/prob_kept"] = a["router_prob_kept"]
      sums[f"router/{name}/prob_all"] = a["router_prob_all"]
  return loss, sums


def _metrics(sums, micro_batches: int) -> dict[str, jax.Array]:
  """Logged metrics from summed ``loss_fn`` sums (router statistics averaged)."""
  nt, nf = jnp.maximum(sums["text_count"], 1.0), jnp.maximum(sums["frame_count"], 1.0)
  m = {
    "loss": sums["loss"],
    "lm_loss": sums["text_ce_sum"] / nt,
    "stream_loss": sums["frame_ce_sum"] / nf,
    "stream_accuracy": sums["frame_correct"] / nf,
    "labelled_tokens": sums["text_count"] + sums["frame_count"],
  }
  if "router_aux_loss" in sums:
    m["router_aux_loss"] = sums["router_aux_loss"]
  m.update({k: v / micro_batches for k, v in sums.items() if k.startswith("router/")})
  return m


def micro_batches(batch, steps: int):
  """Splits every [B, ...] field into [steps, B / steps, ...]; row r goes to micro-batch
  r mod steps (so a batch sharded by rows keeps each device's share in every micro-batch).

  Raises:
    ValueError: B not divisible by ``steps``.
  """
  b = jax.tree.leaves(batch)[0].shape[0]
  if b % steps:
    raise ValueError(
      f"batch of {b} rows does not split into grad_accum_steps={steps} "
      f"micro-batches; use a batch size divisible by it."
    )
  return jax.tree.map(lambda x: x.reshape(b // steps, steps, *x.shape[1:]).swapaxes(0, 1), batch)


def router_mix(step, anneal_steps: int):
  """The annealed router gate's weight at ``step``: max(0, 1 − step / A), float32 []; 0 when
  A = ``model.mod.router_anneal_steps`` is 0 (``mod.router_gate``)."""
  if anneal_steps <= 0:
    return jnp.zeros((), jnp.float32)
  return jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)


def train_step(
  state: TrainState,
  batch,
  *,
  graphdef,
  tx,
  stream_loss_weight: float,
  base_rng: jax.Array | int,
  router_aux_weight: float = 0.0,
  trainable=None,
  remat: str = "none",
  grad_accum_steps: int = 1,
  ce_chunk: int = 512,
  router_anneal_steps: int = 0,
):
  """One AdamW step. Pure: jit it with shardings (``mod_jax/train/loop.py``).

  Args:
    state: the :class:`TrainState`; batch: global batch of B rows (slot layout).
    graphdef, tx: the model's static structure and the optimizer.
    stream_loss_weight, router_aux_weight: see :func:`loss_fn`.
    base_rng: PRNG key, or an int seed for a key made inside the trace; the step's key
      is ``fold_in(base_rng, step)`` (and the micro-batch's ``fold_in(·, i)``).
    trainable: optional 'train'/'frozen' labels (``state.trainable_labels``). Frozen parameters
      are then constants of the loss (no gradient computed), gradient accumulators exist for
      trainable parameters only, and ``grad_norm`` covers trainable parameters.
    remat: ``train.remat`` (``mod_jax.model.llm.REMAT_POLICIES``).
    grad_accum_steps: micro-batches per step (module docstring).
    ce_chunk: slots per LM-head chunk.
    router_anneal_steps: A of the annealed router gate (:func:`router_mix`; 0: off).
  Returns:
    (new state, metrics dict of float32 []): the losses, ``grad_norm`` (trainable gradients,
    before clipping) and ``update_norm`` (the applied parameter change).
  """
  if isinstance(base_rng, int):
    base_rng = jax.random.key(base_rng)
  rng = jax.random.fold_in(base_rng, state.step)
  labels = trainable if trainable is not None else jax.tree.map(lambda _: "train", state.params)
  is_train = lambda l: l == "train"
  frozen = lambda p, l: p if is_train(l) else jax.lax.stop_gradient(p)
  den = _denominators(batch)
  mix = router_mix(state.step, router_anneal_steps)

  def grads_of(mb, key):
    params = jax.tree.map(frozen, state.params, labels)
    return jax.grad(loss_fn, has_aux=True)(
      params,
      graphdef,
      mb,
      key,
      stream_loss_weight=stream_loss_weight,
      router_aux_weight=router_aux_weight,
      denominators=den,
      remat=remat,
      ce_chunk=ce_chunk,
      router_mix=mix,
    )

  if grad_accum_steps == 1:
    grads, sums = grads_of(batch, rng)
  else:

    def body(carry, xs):
      acc, sums = carry
      mb, i = xs
      g, s = grads_of(mb, jax.random.fold_in(rng, i))
      acc = jax.tree.map(
        lambda a, g_, l: a + g_.astype(jnp.float32) if is_train(l) else a, acc, g, labels
      )
      return (acc, jax.tree.map(jnp.add, sums, s)), None

    mbs = micro_batches(batch, grad_accum_steps)
    acc0 = jax.tree.map(
      lambda p, l: jnp.zeros(p.shape if is_train(l) else (), jnp.float32), state.params, labels
    )
    sums0 = jax.tree.map(
      jnp.zeros_like, jax.eval_shape(lambda: grads_of(jax.tree.map(lambda x: x[0], mbs), rng)[1])
    )
    (acc, sums), _ = jax.lax.scan(
      body, (acc0, sums0), (mbs, jnp.arange(grad_accum_steps, dtype=jnp.int32))
    )
    grads = jax.tree.map(
      lambda a, p, l: a.astype(p.dtype) if is_train(l) else jnp.zeros_like(p),
      acc,
      state.params,
      labels,
    )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = _metrics(sums, grad_accum_steps)
  metrics["grad_norm"] = optax.tree.norm(
    jax.tree.map(lambda g, l: g if is_train(l) else jnp.zeros((), g.dtype), grads, labels)
  )
  metrics["update_norm"] = optax.tree.norm(updates)  # after clipping, schedule and decay
  if router_anneal_steps > 0:
    metrics["router/mix"] = mix
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step_options(config, graphdef, tx, params) -> dict:
  """The keyword arguments that bind :func:`train_step` to ``config`` (for ``functools.partial``).

  ``base_rng`` is the integer seed: the step makes its key inside the trace (so it can be lowered
  for devices that cannot compute, e.g. an AOT TPU topology). The key is jax's default
  (threefry, partitionable): GSPMD generates each chip's share of the LoRA dropout bits. An
  ``rbg`` key was tried and rejected: its ``RngBitGenerator`` is not partitioned, so every chip
  generated the bits of the whole global batch (u32 [64, 16096, 14336] = 55 GiB per chip for
  the down projection's dropout on the 8B config).
  """
  t = config.train
  return dict(
    graphdef=graphdef,
    tx=tx,
    stream_loss_weight=t.stream_loss_weight,
    router_aux_weight=float(config.model.mod.router_aux_loss_weight),
    base_rng=int(config.seed),
    trainable=trainable_labels(params, config.model),
    remat=t.remat,
    grad_accum_steps=int(t.grad_accum_steps),
    ce_chunk=int(t.ce_chunk),
    router_anneal_steps=int(config.model.mod.get("router_anneal_steps", 0)),
  )


def eval_step(params, batch, *, graphdef, base_rng: jax.Array, interval_id: int):
  """Sums for held-out metrics: CE and counts for text and frame-end slots, decision accuracy.

  Stream-decision accuracy is also split into frames where the model should speak (target is the
  stream-close token) and frames where it should stay silent, since silent frames dominate.
  """
  model = nnx.merge(graphdef, params)
  model.eval()  # deterministic: no LoRA dropout (the rng is only for random routing)
  out, _ = forward_losses(model, batch, base_rng)
  correct = (out["frame_pred"] == batch["frame_targets"]).astype(jnp.float32) * out["frame_w"]
  speak = (batch["frame_targets"] != interval_id).astype(jnp.float32) * out["frame_w"]
  return {
    "text_ce_sum": (out["text_ce"] * out["text_w"]).sum(),
    "text_count": out["text_w"].sum(),
    "frame_ce_sum": (out["frame_ce"] * out["frame_w"]).sum(),
    "frame_count": out["frame_w"].sum(),
    "frame_correct": correct.sum(),
    "speak_count": speak.sum(),
    "speak_correct": (correct * speak).sum(),
    "text_correct": ((out["text_pred"] == batch["text_targets"]) * out["text_w"]).sum(),
  }
