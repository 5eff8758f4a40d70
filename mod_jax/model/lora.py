"""LoRA: low-rank adapters on the decoder's projections, dropout, merge for inference.

LoRA (Hu et al. 2021, arXiv 2106.09685, §4.1): a frozen weight W gets a trainable update
ΔW = (alpha / r) · A · B of rank r, A initialised like a Linear layer (Kaiming-uniform, as in
``peft``'s ``LoraLayer.reset_lora_parameters``) and B = 0, so training starts from the base model.
The forward pass adds the update as a side branch, ``y = x·W + (alpha / r) · dropout(x)·A·B``
(``peft.tuners.lora.layer.Linear.forward``), so the full-size ΔW is never materialised in training.
VideoLLM-online fine-tunes Llama-3-8B-Instruct with r = 128, alpha = 256, dropout 0.05 on the
q, k, v, o, gate, up, down projections and the LM head (docs/design.md §1).

Where adapters live: an adapter of the parameter ``name`` of a module is the sibling attribute
``{name}_lora`` of that module (``attn.q`` → ``attn.q_lora``, ``mlp.gate.kernel`` →
``mlp.gate.kernel_lora``, ``llm.lm_head`` → ``llm.lm_head_lora``). Adapters are attached after all
other parameters are created (:func:`attach`), so a model with LoRA draws the same base weights for
a seed as one without. The optimizer trains parameters whose path contains ``_lora``
(``mod_jax/train/state.py``); :func:`merge_and_unload` folds them into W for inference and export.

Shape letters: the weight W has input axes ``I`` (e.g. ``d`` or ``n, h``) then output axes ``O``;
A is ``[*I, r]`` and B ``[r, *O]``, so ΔW = A·B has W's layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mod_jax.model.linalg import project
from mod_jax.model.partitioning import param

# Projections that can carry an adapter (config ``model.lora.targets``).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
SUFFIX = "_lora"
_zeros = nnx.initializers.zeros_init()


def _kaiming_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's Kaiming-uniform with a = sqrt(5), peft's A init."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


RANK = "lora_rank"  # logical name of an adapter's rank axis (mesh.logical_axis_rules)


class LoRA(nnx.Module):
  """A low-rank update of one weight W with input axes ``in_shape`` and output axes ``out_shape``.

  Parameters: ``a`` [*in_shape, rank] and ``b`` [rank, *out_shape] (b starts at 0); the rank axis
  has the logical name ``lora_rank``, which the default rules shard over ``fsdp``, so every
  adapter and its optimizer moments are split over FSDP even when W's other axis is a tensor
  axis (``mlp``, ``heads``, ``vocab``). ``scale`` =
  alpha / rank (static). ``dropout`` is applied to the branch's input when an rng is given and
  ``deterministic`` is False (``model.eval()`` sets it, as for ``nnx.Dropout``).
  """

  def __init__(
    self,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    in_names,
    out_names,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    rngs: nnx.Rngs,
    param_dtype=jnp.float32,
  ):
    if rank < 1:
      raise ValueError(f"LoRA rank={rank} must be >= 1.")
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    self.a = param(
      rngs, _kaiming_uniform(math.prod(in_shape)), (*in_shape, rank), (*in_names, RANK), param_dtype
    )
    self.b = param(rngs, _zeros, (rank, *out_shape), (RANK, *out_names), param_dtype)
    self.scale = float(alpha) / rank
    self.dropout = float(dropout)
    self.deterministic = False
    self.n_in, self.n_out = len(in_shape), len(out_shape)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None, dtype=None) -> jax.Array:
    """The branch output ``scale · dropout(x)·A·B``: x [..., *in] → [..., *out] in ``dtype``.

    Dropout (inverted, keep probability 1 − dropout) is active only when ``rng`` is given and
    the module is not ``deterministic``.
    """
    dtype = x.dtype if dtype is None else dtype
    x = x.astype(dtype)
    if self.dropout > 0.0 and rng is not None and not self.deterministic:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(dtype)
    xa = project(x, self.a[...].astype(dtype), n_in=self.n_in)
    return project(xa, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

  def delta(self) -> jax.Array:
    """ΔW = scale · A·B in W's layout [*in, *out], float32; an adapter of stacked layers
    (A [L, *in, r], B [L, r, *out]: ``mod_jax/model/llm.py``) gives ΔW per layer, [L, *in, *out]."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    lead = a.shape[: a.ndim - self.n_in - 1]  # () or the stacked layers' axis
    in_shape, out_shape = a.shape[len(lead) : -1], b.shape[len(lead) + 1 :]
    a2 = a.reshape(*lead, math.prod(in_shape), a.shape[-1])
    b2 = b.reshape(*lead, b.shape[len(lead)], math.prod(out_shape))
    return jnp.matmul(a2, b2).reshape(*lead, *in_shape, *out_shape) * self.scale


def adapter(module: nnx.Module, name: str, x: jax.Array, rng: jax.Array | None, dtype):
  """Output of the adapter of ``module.{name}`` on ``x``, or None when it has none."""
  lora = getattr(module, name + SUFFIX, None)
  return None if lora is None else lora(x, rng, dtype)


def fold(rng: jax.Array | None, i: int) -> jax.Array | None:
  """A distinct dropout key per branch (None stays None: no dropout)."""
  return None if rng is None else jax.random.fold_in(rng, i)


# Dropout keys are folded from the model call's rng with this tag, so they never coincide with the
# routing keys (``fold_in(rng, layer)`` in ``llm.Decoder``).
DROPOUT_STREAM = 0x4C6F5241  # "LoRA"


def attach(decoder: Any, cfg, *, rngs: nnx.Rngs, layers: Sequence[Any]) -> None:
  """Creates the adapters ``cfg.lora.targets`` on every decoder layer (and the LM head).

  Args:
    decoder: a :class:`mod_jax.model.llm.Decoder` whose base parameters already exist.
    layers: its ``DecoderLayer`` s, one per layer, before they are stacked (the adapters are
      created layer by layer and stacked with them: the same draws whatever the stacking).
    cfg: the ``config.model`` ConfigDict (``lora.rank`` > 0, ``lora.alpha``, ``lora.dropout``,
      ``lora.targets``, ``lora.param_dtype``).

  Raises:
    ValueError: an unknown target, or ``lm_head`` with tied embeddings (a merged adapter would
      change the input embedding too).
  """
  lc = cfg.lora
  targets = tuple(lc.targets)
  unknown = sorted(set(targets) - set(LORA_TARGETS))
  if unknown:
    raise ValueError(f"model.lora.targets has {unknown}; choose from {LORA_TARGETS}.")
  kw = dict(
    rank=int(lc.rank),
    alpha=float(lc.alpha),
    dropout=float(lc.dropout),
    rngs=rngs,
    param_dtype=jnp.dtype(lc.param_dtype),
  )
  d, n, kh, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  attn_shapes = {
    "q": ((d,), (n, h), ("embed",), ("heads", "head_dim")),
    "k": ((d,), (kh, h), ("embed",), ("kv_heads", "head_dim")),
    "v": ((d,), (kh, h), ("embed",), ("kv_heads", "head_dim")),
    "o": ((n, h), (d,), ("heads", "head_dim"), ("embed",)),
  }
  mlp_shapes = {
    "gate": ((d,), (f,), ("embed",), ("mlp",)),
    "up": ((d,), (f,), ("embed",), ("mlp",)),
    "down": ((f,), (d,), ("mlp",), ("embed",)),
  }
  for layer in layers:
    for t in targets:
      if t in attn_shapes:
        setattr(layer.attn, t + SUFFIX, LoRA(*attn_shapes[t], **kw))
      elif t in mlp_shapes:
        setattr(getattr(layer.mlp, t), "kernel" + SUFFIX, LoRA(*mlp_shapes[t], **kw))
  if "lm_head" in targets:
    if decoder.lm_head is None:
      raise ValueError(
        "model.lora.targets includes 'lm_head' but model.tie_embeddings=True: a "
        "merged LM-head adapter would also change the input embedding. Remove "
        "'lm_head' from the targets or untie the embeddings."
      )
    decoder.lm_head_lora = LoRA((d,), (cfg.vocab_size,), ("embed",), ("vocab",), **kw)


def adapters(model: nnx.Module) -> list[tuple[tuple, nnx.Module, str, LoRA]]:
  """Every adapter in ``model``: (path, parent module, base parameter name, LoRA)."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, LoRA):
      parent: Any = model
      keys: list[Any] = list(path[:-1])
      for key in keys:
        parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict)) else getattr(parent, key)
      out.append((tuple(path), parent, str(path[-1])[: -len(SUFFIX)], node))
  return out


def merge_and_unload(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its weight (W ← W + (alpha/r)·A·B, in float32) and removes it.

  Mutates and returns ``model``; afterwards it has exactly the parameters of the same model
  without LoRA, so ``nnx.state(model, nnx.Param)`` loads into a ``lora.rank = 0`` model and
  exports as plain weights. Dropout is not part of the merged model (it is a training-time
  regulariser), so merged and unmerged models agree when called without an rng.
  """
  for _, parent, name, lora in adapters(model):
    w = getattr(parent, name)
    w.value = (w[...].astype(jnp.float32) + lora.delta()).astype(w[...].dtype)
    setattr(parent, name + SUFFIX, None)
  return model
