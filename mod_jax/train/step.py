"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Loss (VideoLLM-online, SPEC §2): token cross-entropy summed over labelled text slots (weight 1)
and frame-end slots (weight ``stream_loss_weight``), divided by the number of labelled tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mod_jax.train.state import TrainState


def _ce(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def forward_losses(model, batch, rng):
  """Per-slot CE and masks; returns dict of [b, T] / [b, F] arrays and the model aux."""
  text_logits, frame_logits, aux = model(batch, rng=rng)
  return dict(
      text_ce=_ce(text_logits, batch["text_targets"]),
      frame_ce=_ce(frame_logits, batch["frame_targets"]),
      text_w=batch["text_weights"].astype(jnp.float32),
      frame_w=batch["frame_weights"].astype(jnp.float32),
      frame_pred=jnp.argmax(frame_logits, axis=-1),
      text_pred=jnp.argmax(text_logits, axis=-1)), aux


def loss_fn(params, graphdef, batch, rng, stream_loss_weight: float):
  model = nnx.merge(graphdef, params)
  out, aux = forward_losses(model, batch, rng)
  n_text, n_frame = out["text_w"].sum(), out["frame_w"].sum()
  text_sum = (out["text_ce"] * out["text_w"]).sum()
  frame_sum = (out["frame_ce"] * out["frame_w"]).sum()
  denom = jnp.maximum(n_text + n_frame, 1.0)
  loss = (text_sum + stream_loss_weight * frame_sum) / denom
  metrics = {
      "loss": loss,
      "lm_loss": text_sum / jnp.maximum(n_text, 1.0),
      "stream_loss": frame_sum / jnp.maximum(n_frame, 1.0),
      "stream_accuracy": ((out["frame_pred"] == batch["frame_targets"]) * out["frame_w"]).sum()
                         / jnp.maximum(n_frame, 1.0),
      "labelled_tokens": n_text + n_frame,
  }
  aux_w = model.llm.plan.aux_loss_weight  # Mixture-of-Depths router loss (mod.py), static
  if aux_w > 0:
    router_aux = sum(a["router_bce"] for a in aux.values() if "router_bce" in a)
    loss = loss + aux_w * router_aux
    metrics["loss"], metrics["router_aux_loss"] = loss, router_aux
  for name, a in aux.items():
    if "kept_index" in a:  # how often the pooled (CLS-like) token 0 of a frame is kept
      metrics[f"router/{name}/pooled_token_kept"] = jnp.mean(
          jnp.any(a["kept_index"] == 0, axis=-1).astype(jnp.float32))
    if "router_prob_kept" in a:
      metrics[f"router/{name}/prob_kept"] = a["router_prob_kept"]
      metrics[f"router/{name}/prob_all"] = a["router_prob_all"]
  return loss, metrics


def train_step(state: TrainState, batch, *, graphdef, tx, stream_loss_weight: float,
               base_rng: jax.Array, trainable=None):
  """One AdamW step. Pure: jit it with shardings (``mod_jax/train/loop.py``).

  ``trainable``: optional 'train'/'frozen' labels (``state.trainable_labels``); the reported
  ``grad_norm`` then covers trainable parameters only, so XLA can drop frozen weights' gradients
  (under LoRA most of the model) instead of computing them just for the metric.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, graphdef, batch, rng,
                                                   stream_loss_weight)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if trainable is not None:
    grads = jax.tree.map(lambda g, l: g if l == "train" else jnp.zeros((), g.dtype), grads,
                         trainable)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


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
