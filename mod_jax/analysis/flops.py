"""FLOPs and memory of one training step: an analytic count, XLA's count, the compiled footprint.

``mod-jax flops --config X`` (:mod:`mod_jax.analysis.main`) reports these for the configured model
and for its dense counterpart (the same config with ``model.mod.insertion = "none"``).

Analytic count (FLOPs = 2 × multiply-adds of products + element-wise estimate; per row × batch)
-----------------------------------------------------------------------------------------------
Notation: d model width, n / n_kv query / KV heads, h head dim, f MLP width, V vocabulary; a row
has T text slots and F frames of N vision tokens (docs/design.md §1.2). Decoder layer i keeps k_i vision
tokens per frame (k_i = N in a dense layer, ``RoutingPlan.keep``) and runs on the compact
sequence of c_i = T + F·k_i tokens (VideoLLM-MoD §3.2). Forward FLOPs of layer i, by token class:

  per token, linear   P   = 2·d·h·(2n + 2n_kv)  [q, k, v, o]  +  6·d·f  [SwiGLU gate, up, down]
  per token, attention A_i = 4·n·h·c_i          [q·kᵀ and p·v against all c_i keys: the masked
                                                 square is computed, as XLA does]
  text tokens          T·(P + A_i)
  vision tokens        F·k_i·(P + A_i)
  router (learned, k_i > 0)   2·d·L             [LayerExpert: one logit per slot, L = T + F·N]
  routing (k_i > 0)           3·d·F·k_i + d·L   [element-wise only: gate and residual of the
                                                 kept tokens, the final select; the gathers of
                                                 ``routed_block`` move rows, no FLOPs]

and outside the decoder: LM head 2·d·V·(T + F) (logits at text slots and frame ends only,
``VideoLLM.__call__``); connector 2·F·N·(w·d + d·d) (w = vision width); vision tower per frame,
with s = (S/p)² patches, vision MLP width m and depth D:
  patch embedding 2·s·3p²·w;  per encoder layer 8·s·w² + 4·s²·w + 4·s·w·m;
  MAP head 2·w² + 4·s·w² + 4·s·w + 2·w² + 4·w·m  (probe query, k/v, attention, out, MLP).

Training step = forward + backward. The backward of a product costs two forward products (the
gradient with respect to each operand), so most terms count 3×. Exceptions: where one operand
needs no gradient, 2× (the patch embedding, whose input is pixels; the connector's first layer
when the vision tower is frozen; the one-hot gather and scatter, whose one-hot operand is
constant; with LoRA, ``model.lora.rank`` = ρ > 0, every frozen base projection of the LLM), and a
frozen vision tower counts 1× (forward only, ``stop_gradient``). A LoRA adapter on a projection
d_in → d_out adds 2·ρ·(d_in + d_out) per token, 3×.

Element-wise work is estimated from an op count of the forward pass (3× in training, like the
products): per token and decoder layer 10·d (two RMSNorms, two residual adds) + 4·(n + n_kv)·h
(RoPE) + 5·f (SiLU gate) + (6n + 5)·c_i (scale, mask, max, subtract, sum, divide per attention
logit; the c_i-wide mask); LayerNorm 7, tanh-GELU 8, exact GELU ~10, bias 1 per element in the
vision tower and connector; 5 per logit for the cross-entropy; 16 per trainable parameter for
clipping and AdamW. Transcendentals (exp, rsqrt, tanh) are not FLOPs in XLA's count either. This
term is a few percent of the total on the tiny test config and less at larger widths; the test
bounds analytic vs XLA at 5%. XLA well above the analytic count means the compiled step does
work the formula deems unnecessary (e.g. weight gradients of frozen parameters).

XLA count and memory
--------------------
:func:`compile_train_step` lowers the real ``mod_jax.train.step.train_step`` (AdamW, state
donated, as ``mod_jax/train/loop.py`` jits it) on one device from abstract shapes, so nothing is
allocated. ``compiled.cost_analysis()["flops"]`` is XLA's count of the whole step, taken on the
:func:`counting_config` program (unrolled layers, materialised attention: XLA counts a
while-loop body once);
``compiled.memory_analysis()`` gives the bytes of arguments (params, optimizer state, batch),
outputs, aliased (donated) buffers and temporaries; peak = arguments + outputs − aliased + temp.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
from flax import nnx

from mod_jax.config import ConfigDict
from mod_jax.data import pipeline
from mod_jax.model.factory import build_model
from mod_jax.model.mod import RoutingPlan
from mod_jax.train import sharding
from mod_jax.train.state import TrainState, make_optimizer, trainable_labels


@dataclasses.dataclass(frozen=True)
class LayerCount:
  """Training-step FLOPs of decoder layer ``layer`` for the whole batch, by token class."""

  layer: int
  keep: int | None  # k_i vision tokens kept per frame; None = dense layer
  compact_len: int  # c_i tokens per row the layer runs on
  text: float
  vision: float
  router: float  # LayerExpert logits
  routing: float  # element-wise work of routing (gathers move rows: no FLOPs)

  @property
  def total(self) -> float:
    return self.text + self.vision + self.router + self.routing


def dense_counterpart(config: ConfigDict) -> ConfigDict:
  """The same config with no routing (Full computation): ``insertion="none"``, r = 1."""
  c = copy.deepcopy(config)  # keeps the object-typed routing fields (resolving would not)
  c.model.mod.insertion = "none"
  c.model.mod.keep_ratio = 1.0
  return c


def analytic_flops(config: ConfigDict) -> dict[str, Any]:
  """The analytic training-step FLOPs of ``config`` (module docstring), batch = train.batch_size.

  Returns:
    ``{"per_layer": [LayerCount], "by_class": {"vision_tower", "connector", "decoder_text",
    "decoder_vision", "router", "routing", "lm_head", "optimizer"}, "total", "products",
    "elementwise", "forward_total"}``: FLOPs of one step for the global batch (``products`` and
    ``elementwise`` split ``total``; ``forward_total`` is the forward pass alone).
  """
  m, dt = config.model, config.data
  v = m.vision
  plan = RoutingPlan.from_config(m)
  bsz = config.train.batch_size
  d, n, nkv, hd, f, voc = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, m.vocab_size
  t_cap, frames, tpf = dt.max_text, dt.max_frames, m.tokens_per_frame
  lin_p = 2 * d * hd * (2 * n + 2 * nkv) + 6 * d * f  # products / token
  lin_e = 8 * d + 2 * d + 4 * (n + nkv) * hd + 5 * f  # element-wise / token
  # LoRA (rank > 0): base weights frozen, so their products count 2x; adapters x·A·B count 3x.
  lora = m.get("lora")
  rank = int(lora.rank) if lora is not None else 0
  targets = set(lora.targets) if rank else set()
  base = 2 if rank else 3
  shapes = {
    "q": (d, n * hd),
    "k": (d, nkv * hd),
    "v": (d, nkv * hd),
    "o": (n * hd, d),
    "gate": (d, f),
    "up": (d, f),
    "down": (f, d),
  }
  lora_p = sum(2 * rank * (i + o) for t, (i, o) in shapes.items() if t in targets)
  lora_e = sum(2 * o for t, (_, o) in shapes.items() if t in targets)  # scale, add
  acc = _Acc()

  layers = []
  for i in range(m.n_layers):
    k = tpf if plan.keep[i] is None else plan.keep[i]
    c = t_cap + frames * k
    per_tok_p, per_tok_e = 4 * n * hd * c + lora_p, lin_e + lora_e + (6 * n + 5) * c
    text = acc.add(base, lin_p, count=t_cap) + acc.add(3, per_tok_p, per_tok_e, count=t_cap)
    vision = acc.add(base, lin_p, count=frames * k) + acc.add(
      3, per_tok_p, per_tok_e, count=frames * k
    )
    row = t_cap + frames * tpf
    router = acc.add(3, 2 * d * row if plan.needs_router(i) else 0)
    routing = acc.add(3, 0, 3 * d * frames * k + d * row if plan.routed(i) else 0)
    layers.append(
      LayerCount(
        layer=i,
        keep=plan.keep[i],
        compact_len=c,
        text=bsz * text,
        vision=bsz * vision,
        router=bsz * router,
        routing=bsz * routing,
      )
    )

  # Vision tower, per frame: s patches of width w; products then element-wise (LayerNorm 7,
  # tanh-GELU 8, bias 1, residual 1 per element; softmax 6 per logit). Not part of the step
  # when the batch carries pre-extracted features (data.input = "features").
  w, mlp, nv = v.width, v.mlp_dim, v.n_heads
  s = (v.image_size // v.patch_size) ** 2
  grad = 3 if v.trainable else 1
  tower_frames = 0 if dt.get("input", "frames") == "features" else frames
  tower = acc.add(
    2 if v.trainable else 1,
    2 * s * 3 * v.patch_size**2 * w,
    2 * 3 * v.image_size**2 + 2 * s * w,
    count=tower_frames,
  )  # pixels, bias + pos
  tower += acc.add(
    grad,
    v.depth * (8 * s * w * w + 4 * s * s * w + 4 * s * w * mlp),
    v.depth * (14 * s * w + 6 * s * w + 9 * s * mlp + s * w + 6 * nv * s * s),
    count=tower_frames,
  )
  tower += acc.add(
    grad,
    4 * w * w + 4 * s * w * w + 4 * s * w + 4 * w * mlp,
    7 * s * w + 2 * s * w + 6 * nv * s + 20 * w + 9 * mlp + s * w,
    count=tower_frames,
  )  # post norm, head
  # Connector (bias + exact GELU ~ 10 per element) and LM head with its cross-entropy (~5 per
  # logit: log-softmax and argmax) at the T text slots and F frame ends.
  connector = acc.add(3 if v.trainable else 2, 2 * w * d, 11 * d, count=frames * tpf) + acc.add(
    3, 2 * d * d, d, count=frames * tpf
  )
  head_lora = 2 * rank * (d + voc) if "lm_head" in targets else 0
  lm_head = acc.add(base, 2 * d * voc, 5 * voc, count=t_cap + frames) + acc.add(
    3, head_lora, 2 * voc if head_lora else 0, count=t_cap + frames
  )
  per_row_fwd = acc.forward
  optimizer = 16.0 * _trainable_parameter_count(config)  # clip + AdamW per parameter

  by_class = {
    "vision_tower": bsz * tower,
    "connector": bsz * connector,
    "decoder_text": sum(x.text for x in layers),
    "decoder_vision": sum(x.vision for x in layers),
    "router": sum(x.router for x in layers),
    "routing": sum(x.routing for x in layers),
    "lm_head": bsz * lm_head,
    "optimizer": optimizer,
  }
  return {
    "per_layer": layers,
    "by_class": by_class,
    "total": float(sum(by_class.values())),
    "products": float(bsz * acc.products),
    "elementwise": float(bsz * acc.elementwise + optimizer),
    "forward_total": float(bsz * per_row_fwd),
  }


class _Acc:
  """Accumulates forward FLOPs and training FLOPs (forward × multiplier) of products and
  element-wise work; ``add`` returns the training FLOPs of the item."""

  def __init__(self):
    self.products = self.elementwise = self.forward = 0.0

  def add(
    self, multiplier: int, products: float, elementwise: float = 0.0, count: int = 1
  ) -> float:
    self.products += count * multiplier * products
    self.elementwise += count * multiplier * elementwise
    self.forward += count * (products + elementwise)
    return count * multiplier * (products + elementwise)


def _trainable_parameter_count(config: ConfigDict) -> int:
  params = nnx.state(nnx.eval_shape(lambda: build_model(config.model, rngs=config.seed)), nnx.Param)
  labels = trainable_labels(params, config.model)
  return int(
    sum(
      x.size for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if lab == "train"
    )
  )


def abstract_batch(config: ConfigDict, sharding_of=None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global training batch (``mod_jax.data.pipeline.batch_spec``).

  ``sharding_of(ndim)``, if given, gives each field's sharding (e.g.
  ``mod_jax.train.sharding.batch_sharding``).
  """
  spec = pipeline.batch_spec(config, config.train.batch_size)
  return {
    k: jax.ShapeDtypeStruct(
      shape, dtype, sharding=None if sharding_of is None else sharding_of(len(shape))
    )
    for k, (shape, dtype) in spec.items()
  }


def abstract_train_state(config: ConfigDict):
  """(abstract TrainState, graphdef, optax tx) of ``config``, without allocating parameters."""
  abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=config.seed))
  graphdef, abs_params = nnx.split(abstract, nnx.Param)
  tx = make_optimizer(config, abs_params)

  def init():
    return TrainState.create(nnx.state(build_model(config.model, rngs=config.seed), nnx.Param), tx)

  return jax.eval_shape(init), graphdef, tx


def jit_train_step(config: ConfigDict, graphdef, tx, params):
  """The jitted training step, as ``mod_jax/train/loop.py`` builds it (state donated; frozen
  parameters labelled from ``params``, abstract or real)."""
  return sharding.jit_train_step(config, graphdef, tx, params)


def compile_train_step(config: ConfigDict):
  """AOT-compiles the training step of ``config`` for one device from abstract shapes."""
  abs_state, graphdef, tx = abstract_train_state(config)
  step = jit_train_step(config, graphdef, tx, abs_state.params)
  return step.lower(abs_state, abstract_batch(config)).compile()


def counting_config(config: ConfigDict) -> ConfigDict:
  """The program whose XLA FLOP count is the step's: layers unrolled and attention
  materialised (XLA's cost analysis counts a while-loop body once: a scanned layer cycle, a
  blockwise kernel's block loop), no rematerialisation and no accumulation loop."""
  c = copy.deepcopy(config)
  c.model.scan_layers, c.model.attention = False, "xla"
  c.train.remat, c.train.grad_accum_steps = "none", 1
  return c


def xla_step_analysis(config: ConfigDict, compiled=None) -> dict[str, float]:
  """:func:`xla_analysis` of the step: memory of the configured program (``compiled``, else
  compiled here), FLOPs of its :func:`counting_config` (compiled when the two differ)."""
  out = xla_analysis(compile_train_step(config) if compiled is None else compiled)
  counting = counting_config(config)
  if counting.to_dict() != config.to_dict():
    out["flops"] = xla_analysis(compile_train_step(counting))["flops"]
  return out


def xla_analysis(compiled) -> dict[str, float]:
  """XLA's FLOPs and memory (bytes) of a compiled step.

  Returns ``{"flops", "transcendentals", "argument_bytes", "output_bytes", "alias_bytes",
  "temp_bytes", "peak_bytes"}``; peak = arguments + outputs − aliased + temporaries.

  Raises:
    RuntimeError: the backend gives no cost or memory analysis.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
    cost = cost[0]
  mem = compiled.memory_analysis()
  if not cost or mem is None:
    raise RuntimeError(f"backend {jax.default_backend()!r} gives no cost/memory analysis.")
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  return {
    "flops": float(cost.get("flops", 0.0)),
    "transcendentals": float(cost.get("transcendentals", 0.0)),
    "argument_bytes": float(arg),
    "output_bytes": float(out),
    "alias_bytes": float(alias),
    "temp_bytes": float(temp),
    "peak_bytes": float(arg + out - alias + temp),
  }


def analyze(config: ConfigDict, *, with_xla: bool = True) -> dict[str, Any]:
  """Analytic + XLA FLOPs and compiled memory for ``config`` and its dense counterpart.

  Returns:
    ``{"config": {...}, "mod": report, "dense": report, "ratios": {...}}`` where a report is
    ``{"analytic": analytic_flops(...) (per_layer as dicts), "xla": xla_analysis(...)}`` and the
    ratios are MoD / dense (``flops_analytic``, ``flops_xla``, ``peak_memory``, ``temp_memory``),
    plus ``xla_over_analytic`` for each model. Without ``with_xla`` nothing is compiled.
  """
  out: dict[str, Any] = {
    "config": {
      "batch_size": config.train.batch_size,
      "max_text": config.data.max_text,
      "max_frames": config.data.max_frames,
      "tokens_per_frame": config.model.tokens_per_frame,
      "n_layers": config.model.n_layers,
      "d_model": config.model.d_model,
      "insertion": _plain(config.model.mod.insertion),
      "keep_ratio": _plain(config.model.mod.keep_ratio),
      "keep_per_layer": list(RoutingPlan.from_config(config.model).keep),
      "selection": config.model.mod.selection,
      "device": jax.devices()[0].device_kind,
    }
  }
  for name, c in (("mod", config), ("dense", dense_counterpart(config))):
    a = analytic_flops(c)
    rep = {"analytic": {**a, "per_layer": [dataclasses.asdict(x) for x in a["per_layer"]]}}
    if with_xla:
      rep["xla"] = xla_step_analysis(c)
      rep["xla_over_analytic"] = rep["xla"]["flops"] / a["total"]
    out[name] = rep
  mod_r, den = out["mod"], out["dense"]
  ratios = {"flops_analytic": mod_r["analytic"]["total"] / den["analytic"]["total"]}
  if with_xla:
    ratios.update(
      flops_xla=mod_r["xla"]["flops"] / den["xla"]["flops"],
      peak_memory=mod_r["xla"]["peak_bytes"] / den["xla"]["peak_bytes"],
      temp_memory=mod_r["xla"]["temp_bytes"] / den["xla"]["temp_bytes"],
    )
  out["ratios"] = ratios
  return out


def _plain(x):
  return x if isinstance(x, (str, int, float)) else list(x)
