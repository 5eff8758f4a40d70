"""From a config to a model: the model-side config checks and the one model factory.

``mod_jax.config.validate`` checks what a config can decide alone (shapes, enums, mesh); the checks
here need model code (RoPE scaling tables, LoRA target names, the routing plan) and run whenever a
model is built, so training, loading and the analysis tools all see the same errors up front.
"""

from __future__ import annotations

import re

from flax import nnx

from mod_jax.config import ConfigError
from mod_jax.model.attention import rope_inv_freq
from mod_jax.model.lora import LORA_TARGETS
from mod_jax.model.mod import RoutingPlan
from mod_jax.model.video_llm import VideoLLM


def check_model_config(m) -> None:
  """Model-side checks of ``config.model``: RoPE scaling, LoRA, the MoD routing plan.

  Raises:
    ConfigError: naming the field, the value and what to do.
  """
  try:
    rope_inv_freq(m.head_dim, m.rope_theta, m.rope_scaling)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(
      f"model.rope_scaling={m.rope_scaling!r} is not usable ({e!r}); give None or "
      f"a dict with rope_type default/linear/llama3 and its fields."
    ) from None
  try:
    RoutingPlan.from_config(m)  # keep_ratio range, schedule length
  except ValueError as e:
    raise ConfigError(f"model.mod: {e}") from None
  lo = m.lora
  if lo.rank < 0:
    raise ConfigError(f"model.lora.rank={lo.rank} must be >= 0 (0 disables LoRA).")
  if lo.rank == 0:
    return
  if lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0:
    raise ConfigError(
      f"model.lora.alpha={lo.alpha} must be > 0 and model.lora.dropout={lo.dropout} in [0, 1)."
    )
  unknown = sorted(set(lo.targets) - set(LORA_TARGETS))
  if unknown or not lo.targets:
    raise ConfigError(
      f"model.lora.targets={tuple(lo.targets)}: {unknown or 'empty'}; choose from {LORA_TARGETS}."
    )
  if "lm_head" in lo.targets and m.tie_embeddings:
    raise ConfigError(
      "model.lora.targets includes 'lm_head' but model.tie_embeddings=True: a "
      "merged adapter would change the input embedding too. Drop 'lm_head'."
    )
  for pattern in lo.trainable:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"model.lora.trainable pattern {pattern!r} is not a regex: {e}") from None


def build_model(model_cfg, *, rngs: nnx.Rngs | int = 0, rules=None) -> VideoLLM:
  """The video LLM of ``model_cfg`` (``config.model``); the one place a model is built.

  Args:
    model_cfg: ``config.model`` (``mod_jax.config.base_config``), already ``validate``-d.
    rngs: ``nnx.Rngs`` or an int seed for the ``params`` stream.
    rules: logical-axis rules (``mod_jax.train.sharding.rules_of``) to shard parameters at
      creation; None builds unsharded. Use under ``nnx.eval_shape`` for shapes only.

  Raises:
    ConfigError: from :func:`check_model_config`.
  """
  check_model_config(model_cfg)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs)
  return VideoLLM(model_cfg, rngs=rngs, rules=rules)
