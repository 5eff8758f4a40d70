"""Train state (a pytree) and the optax optimizer: AdamW, warmup + cosine, global-norm clipping.

The NNX model is used functionally: ``graphdef, params = nnx.split(model, nnx.Param)``; the
graphdef is static, ``TrainState`` holds arrays only, and the step is a pure function of it.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 []
  params: Any            # nnx.State of nnx.Param
  opt_state: Any         # optax state


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then cosine decay to ``end_learning_rate_ratio``·lr."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=train_cfg.warmup_steps,
      decay_steps=train_cfg.steps,
      end_value=train_cfg.learning_rate * train_cfg.end_learning_rate_ratio)


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def trainable_labels(params, model_cfg):
  """'train' or 'frozen' per parameter; the vision tower is frozen unless vision.trainable."""
  def label(path, _):
    return "frozen" if (_path_str(path).startswith("vision/") and not model_cfg.vision.trainable) \
        else "train"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params) -> optax.GradientTransformation:
  """AdamW (no decay on norms, biases and routers' scalars), clipping; frozen params untouched."""
  t = config.train

  def decay_mask(p):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "norm" not in _path_str(path), p)

  adamw = optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.adamw(learning_rate_schedule(t), b1=0.9, b2=0.95, eps=1e-8,
                  weight_decay=t.weight_decay, mask=decay_mask))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               trainable_labels(params, config.model))
