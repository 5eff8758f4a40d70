"""Train state (a pytree) and the optax optimizer: AdamW, warmup + cosine, global-norm clipping.

The NNX model is used functionally: ``graphdef, params = nnx.split(model, nnx.Param)``; the
graphdef is static, ``TrainState`` holds arrays only, and the step is a pure function of it.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: Any  # int32 [] (or its sharding, in a tree of shardings)
  params: Any  # nnx.State of nnx.Param
  opt_state: Any  # optax state

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0: ``params`` (an ``nnx.State``) with ``tx``'s freshly initialised optimizer state."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then cosine decay to ``end_learning_rate_ratio``·lr."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train_cfg.learning_rate,
    warmup_steps=train_cfg.warmup_steps,
    decay_steps=train_cfg.steps,
    end_value=train_cfg.learning_rate * train_cfg.end_learning_rate_ratio,
  )


# Parameters stored with a leading ``layers`` axis (``mod_jax/model/llm.py``: stacked layers).
STACKED_PREFIXES = ("llm/stacks/", "llm/routers/")


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def trainable_labels(params, model_cfg):
  """'train' or 'frozen' per parameter.

  The vision tower is frozen unless ``vision.trainable``. With LoRA (``lora.rank`` > 0) the LLM
  base weights are frozen too: only adapters (paths with ``_lora``), the connector, the routers,
  a trainable vision tower and the paths matching ``lora.trainable`` regexes are updated.
  """
  lora_cfg = model_cfg.get("lora")
  lora_on = bool(lora_cfg and lora_cfg.rank > 0)
  extra = [re.compile(p) for p in (lora_cfg.trainable if lora_on else ())]

  def label(path, _):
    p = _path_str(path)
    if p.startswith("vision/"):
      return "train" if model_cfg.vision.trainable or any(r.search(p) for r in extra) else "frozen"
    if not lora_on or "_lora/" in p or p.startswith(("connector/", "llm/routers/")):
      return "train"
    return "train" if any(r.search(p) for r in extra) else "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params) -> optax.GradientTransformation:
  """AdamW (no decay on norms, biases and routers' scalars), clipping; frozen params untouched."""
  t = config.train

  def decay_mask(p):
    def decays(path, x):  # matrices, judged per layer: stacked layers have one axis more
      name = _path_str(path)
      per_layer_ndim = x.ndim - name.startswith(STACKED_PREFIXES)
      return per_layer_ndim >= 2 and "norm" not in name

    return jax.tree_util.tree_map_with_path(decays, p)

  adamw = optax.chain(
    optax.clip_by_global_norm(t.grad_clip_norm),
    optax.adamw(
      learning_rate_schedule(t),
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=t.weight_decay,
      mask=decay_mask,
    ),
  )
  return optax.multi_transform(
    {"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels(params, config.model)
  )
