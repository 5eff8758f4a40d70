"""Hugging Face checkpoints ↔ mod_jax parameters: ``config.json`` + ``*.safetensors``.

Supported architectures (transformers' names):

* ``LlamaForCausalLM`` (Llama 2/3, SmolLM2; Llama-3 rope scaling; tied or untied embeddings) and
  ``Qwen2ForCausalLM`` (q/k/v biases) → :class:`mod_jax.model.llm.Decoder`;
* ``SiglipVisionModel`` or the vision tower of a ``SiglipModel`` (tensor names with or without the
  ``vision_model.`` prefix: transformers 5 saves a ``SiglipVisionModel`` without it) →
  :class:`mod_jax.model.vision.VisionEncoder`.

Both config dialects are read: transformers 4 (``rope_theta``, ``rope_scaling``) and 5
(``rope_parameters``); exports write both, so either version loads them.

Reading is tensor by tensor (``safetensors.safe_open`` memory-maps the file and copies out one
tensor at a time), so an 8B checkpoint never needs twice its size in host memory, and only
JSON and safetensors are parsed: nothing from the checkpoint is executed (no pickle, no
``trust_remote_code``). Every tensor is checked against the shape its config implies; a missing,
misshapen or unexpected tensor or an unsupported config field raises :class:`CheckpointError`
naming it.

Layouts (transformers ``nn.Linear`` stores W as [out, in]; mod_jax stores einsum layouts):

  ============================== ===================== =========================================
  transformers                   shape                 mod_jax
  ============================== ===================== =========================================
  q_proj.weight (k, v alike)     [n·h, d]              attn/q [d, n, h]      (W.T, reshape)
  q_proj.bias                    [n·h]                 attn/q_bias [n, h]
  o_proj.weight                  [d, n·h]              attn/o [n, h, d]
  gate/up/down_proj.weight       [f, d] / [d, f]       mlp/{gate,up,down}/kernel (W.T)
  embed_tokens.weight            [V, d]                embed [V, d]
  lm_head.weight                 [V, d]                lm_head [d, V]
  patch_embedding.weight (conv)  [W, C, p, p]          patch_embed/kernel [p·p·C, W], rows in
                                                       (ph, pw, c) order
  head.attention.in_proj_weight  [3W, W]               head/attn/{q,k,v}/kernel [W, W] each
  head.probe                     [1, 1, W]             head/probe [1, W]
  ============================== ===================== =========================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from mod_jax.model.llm import layer_slots

LLM_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
VISION_ARCHITECTURES = ("SiglipVisionModel", "SiglipModel")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Buffers some checkpoints carry that are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as-is: missing/misshapen tensor, unsupported field."""


# ===================================================================================== configs
def read_config(directory: str) -> dict:
  """``{directory}/config.json`` as a dict (JSON only; no code is run).

  Raises:
    CheckpointError: no config.json, or it is not valid JSON.
  """
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(
      f"{directory!r} has no config.json; expected a Hugging Face checkpoint "
      f"directory (config.json + *.safetensors)."
    )
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e}).") from None


def architecture(hf: Mapping[str, Any], where: str = "config.json") -> str:
  """``llama``, ``qwen2`` or ``siglip`` from ``architectures`` / ``model_type``.

  Raises:
    CheckpointError: any other architecture (the message names the field and value).
  """
  archs = list(hf.get("architectures") or [])
  for a in archs:
    if a in LLM_ARCHITECTURES:
      return LLM_ARCHITECTURES[a]
    if a in VISION_ARCHITECTURES:
      return "siglip"
  model_type = hf.get("model_type")
  if not archs and model_type in ("llama", "qwen2"):
    return model_type
  if not archs and model_type in ("siglip", "siglip_vision_model"):
    return "siglip"
  raise CheckpointError(
    f"{where}: architectures={archs} model_type={model_type!r} is not supported; mod_jax loads "
    f"{sorted(LLM_ARCHITECTURES)} and {list(VISION_ARCHITECTURES)}."
  )


def _require(hf: Mapping[str, Any], key: str, where: str):
  if hf.get(key) is None:
    raise CheckpointError(f"{where}: field {key!r} is missing.")
  return hf[key]


def rope_from_hf(hf: Mapping[str, Any], where: str = "config.json"):
  """(rope_theta, rope_scaling dict or None) from either transformers dialect.

  transformers 5: ``rope_parameters = {"rope_type", "rope_theta", ...}``; transformers 4:
  ``rope_theta`` and ``rope_scaling = {"rope_type" | "type", "factor", ...}`` (or null).

  Raises:
    CheckpointError: a rope type other than default / linear / llama3, or a missing field.
  """
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params:  # per-layer-type dialect
    params = params["full_attention"]
  if isinstance(params, Mapping):
    scaling = dict(params)
    theta = scaling.pop("rope_theta", hf.get("rope_theta", 10000.0))
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
  kind = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
  if kind not in SUPPORTED_ROPE_TYPES:
    raise CheckpointError(
      f"{where}: rope type {kind!r} is not supported; mod_jax implements {SUPPORTED_ROPE_TYPES}."
    )
  if kind == "default":
    return float(theta), None
  needed = (
    ("factor",)
    if kind == "linear"
    else ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  )
  for key in needed:
    if scaling.get(key) is None:
      raise CheckpointError(f"{where}: rope type {kind!r} needs field {key!r}.")
  typed = {
    k: int(scaling[k]) if k == "original_max_position_embeddings" else float(scaling[k])
    for k in needed
  }
  return float(theta), {"rope_type": kind, **typed}


def llm_fields(hf: Mapping[str, Any], where: str = "config.json") -> dict:
  """mod_jax ``config.model`` fields of a Llama / Qwen2 ``config.json``.

  Raises:
    CheckpointError: unsupported architecture or feature (hidden_act other than silu, o_proj or
      MLP biases, sliding-window attention), or a missing size field.
  """
  kind = architecture(hf, where)
  if kind == "siglip":
    raise CheckpointError(
      f"{where}: a SigLIP vision checkpoint where a language model (Llama / Qwen2) was expected."
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{where}: hidden_act={act!r}; the decoder's MLP is SwiGLU (silu).")
  if kind == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise CheckpointError(
      f"{where}: attention_bias/mlp_bias=True (biases on o_proj / MLP) are "
      f"not supported; Qwen2-style q/k/v biases are."
    )
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise CheckpointError(
      f"{where}: use_sliding_window=True is not supported (full attention only)."
    )
  d = int(_require(hf, "hidden_size", where))
  n = int(_require(hf, "num_attention_heads", where))
  head_dim = hf.get("head_dim") or d // n
  theta, scaling = rope_from_hf(hf, where)
  return dict(
    vocab_size=int(_require(hf, "vocab_size", where)),
    d_model=d,
    n_layers=int(_require(hf, "num_hidden_layers", where)),
    n_heads=n,
    n_kv_heads=int(hf.get("num_key_value_heads") or n),
    head_dim=int(head_dim),
    d_ff=int(_require(hf, "intermediate_size", where)),
    rope_theta=theta,
    rope_scaling=scaling,
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    qkv_bias=kind == "qwen2",
  )


def vision_fields(hf: Mapping[str, Any], where: str = "config.json") -> dict:
  """mod_jax ``config.model.vision`` fields of a SigLIP ``config.json`` (vision or full model).

  Raises:
    CheckpointError: not SigLIP, no attention-pooling head, non-RGB input or another activation.
  """
  if architecture(hf, where) != "siglip":
    raise CheckpointError(
      f"{where}: expected a SigLIP vision checkpoint (SiglipVisionModel or "
      f"SiglipModel), got architectures={hf.get('architectures')}."
    )
  v = hf.get("vision_config", hf) if hf.get("model_type") == "siglip" else hf
  if not v.get("vision_use_head", True):
    raise CheckpointError(
      f"{where}: vision_use_head=False; mod_jax's pooled token is the "
      f"attention-pooling head's output."
    )
  if v.get("num_channels", 3) != 3:
    raise CheckpointError(f"{where}: num_channels={v.get('num_channels')}; frames are RGB (3).")
  act = v.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
    raise CheckpointError(f"{where}: vision hidden_act={act!r}; the tower uses tanh-GELU.")
  return dict(
    image_size=int(v.get("image_size", 224)),
    patch_size=int(v.get("patch_size", 16)),
    width=int(v.get("hidden_size", 768)),
    depth=int(v.get("num_hidden_layers", 12)),
    n_heads=int(v.get("num_attention_heads", 12)),
    mlp_dim=int(v.get("intermediate_size", 3072)),
    layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
  )


def llm_hf_config(m, dtype: str = "float32") -> dict:
  """config.json of the decoder ``m`` (a ``config.model``) for transformers 4 and 5."""
  scaling = m.get("rope_scaling")
  scaling = (
    None if scaling is None else dict(scaling.to_dict() if hasattr(scaling, "to_dict") else scaling)
  )
  rope_parameters = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
  if scaling:
    rope_parameters.update(scaling)
  arch = "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"
  out = {
    "architectures": [arch],
    "model_type": "qwen2" if m.qkv_bias else "llama",
    "vocab_size": int(m.vocab_size),
    "hidden_size": int(m.d_model),
    "intermediate_size": int(m.d_ff),
    "num_hidden_layers": int(m.n_layers),
    "num_attention_heads": int(m.n_heads),
    "num_key_value_heads": int(m.n_kv_heads),
    "head_dim": int(m.head_dim),
    "hidden_act": "silu",
    "rms_norm_eps": float(m.rms_norm_eps),
    "tie_word_embeddings": bool(m.tie_embeddings),
    "rope_parameters": rope_parameters,  # transformers 5
    "rope_theta": float(m.rope_theta),  # transformers 4
    "rope_scaling": scaling,
    "max_position_embeddings": 131072,  # not tracked by mod_jax; RoPE numerics ignore it
    "dtype": dtype,
  }
  if not m.qkv_bias:
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  return out


def vision_hf_config(v) -> dict:
  """config.json of the vision tower ``v`` (a ``config.model.vision``) as a SiglipVisionModel."""
  return {
    "architectures": ["SiglipVisionModel"],
    "model_type": "siglip_vision_model",
    "hidden_size": int(v.width),
    "intermediate_size": int(v.mlp_dim),
    "num_hidden_layers": int(v.depth),
    "num_attention_heads": int(v.n_heads),
    "num_channels": 3,
    "image_size": int(v.image_size),
    "patch_size": int(v.patch_size),
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": float(v.layer_norm_eps),
    "vision_use_head": True,
    "dtype": "float32",
  }


# ===================================================================================== tables
@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One mod_jax parameter and where it lives in a Hugging Face checkpoint.

  Attributes:
    path: parameter path inside the module (e.g. ``("stacks", 0, "attn", "q")``).
    name: HF tensor name without the checkpoint's prefix.
    hf_shape: the HF tensor's full shape implied by the config.
    to_ours: HF array (or its ``part``) → our layout.
    to_hf: our array → HF layout (of the part).
    part: (i, count) when the HF tensor is ``count`` equal blocks along axis 0 and this
      parameter is block i (the SigLIP head's fused in_proj).
    index: the row of a stacked parameter (the decoder's layers: ``model.layers.{i}.*`` is row
      r of ``stacks/{s}/*``, ``mod_jax.model.llm.layer_slots``); None for a whole parameter.
  """

  path: tuple
  name: str
  hf_shape: tuple
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  part: tuple[int, int] | None = None
  index: int | None = None


def _same(x):
  return x


def _linear(path, name, our_shape, n_in, hf_shape=None, part=None):
  """nn.Linear weight [out, in] ↔ our kernel with ``n_in`` leading input axes."""
  fan_in = math.prod(our_shape[:n_in])
  fan_out = math.prod(our_shape[n_in:])
  return TensorSpec(
    path,
    name,
    hf_shape or (fan_out, fan_in),
    lambda w: w.T.reshape(our_shape),
    lambda x: x.reshape(fan_in, fan_out).T,
    part,
  )


def _vector(path, name, our_shape, hf_shape=None, part=None):
  """A tensor that only changes shape (biases [n·h] ↔ [n, h], the probe [1, 1, W] ↔ [1, W])."""
  hf_shape = tuple(hf_shape or (math.prod(our_shape),))
  part_shape = hf_shape if part is None else (hf_shape[0] // part[1],) + hf_shape[1:]
  return TensorSpec(
    path, name, hf_shape, lambda w: w.reshape(our_shape), lambda x: x.reshape(part_shape), part
  )


def _as_is(path, name, shape):
  return TensorSpec(path, name, tuple(shape), _same, _same)


def llm_specs(m) -> list[TensorSpec]:
  """Tensors of a Llama / Qwen2 decoder with config ``m`` (paths relative to ``Decoder``)."""
  d, n, kh, h, f, v = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, m.vocab_size
  specs = [
    _as_is(("embed",), "model.embed_tokens.weight", (v, d)),
    _as_is(("final_norm", "scale"), "model.norm.weight", (d,)),
  ]
  if not m.tie_embeddings:
    specs.append(_linear(("lm_head",), "lm_head.weight", (d, v), 1))
  slots = layer_slots(m)
  per_layer = [  # (our path in a layer, HF name in a layer, maker, extra args)
    (("input_norm", "scale"), "input_layernorm.weight", _as_is, ((d,),)),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", _as_is, ((d,),)),
    (("attn", "q"), "self_attn.q_proj.weight", _linear, ((d, n, h), 1)),
    (("attn", "k"), "self_attn.k_proj.weight", _linear, ((d, kh, h), 1)),
    (("attn", "v"), "self_attn.v_proj.weight", _linear, ((d, kh, h), 1)),
    (("attn", "o"), "self_attn.o_proj.weight", _linear, ((n, h, d), 2)),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", _linear, ((d, f), 1)),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", _linear, ((d, f), 1)),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", _linear, ((f, d), 1)),
  ]
  if m.qkv_bias:
    per_layer += [
      (("attn", "q_bias"), "self_attn.q_proj.bias", _vector, ((n, h),)),
      (("attn", "k_bias"), "self_attn.k_proj.bias", _vector, ((kh, h),)),
      (("attn", "v_bias"), "self_attn.v_proj.bias", _vector, ((kh, h),)),
    ]
  # Layers are stored stacked: one spec per (tensor, layer), those of one stacked parameter
  # consecutive (read_tensors / hf_tensors then touch one stacked array at a time).
  for ours, theirs, make, args in per_layer:
    for s in sorted({s for s, _ in slots}):
      for i in (i for i, (si, _) in enumerate(slots) if si == s):
        spec = make(("stacks", s) + ours, f"model.layers.{i}.{theirs}", *args)
        specs.append(dataclasses.replace(spec, index=slots[i][1]))
  return specs


def _dense(path, name, d_in, d_out):
  """A biased nn.Linear ↔ our Dense (kernel [in, out], bias [out])."""
  return [
    _linear(path + ("kernel",), name + "weight", (d_in, d_out), 1),
    _as_is(path + ("bias",), name + "bias", (d_out,)),
  ]


def vision_specs(v) -> list[TensorSpec]:
  """Tensors of a SigLIP vision tower with config ``v`` (paths relative to ``VisionEncoder``)."""
  w, p, mlp = v.width, v.patch_size, v.mlp_dim
  grid = v.image_size // p
  specs = [
    TensorSpec(
      ("patch_embed", "kernel"),
      "embeddings.patch_embedding.weight",
      (w, 3, p, p),
      lambda k: k.transpose(2, 3, 1, 0).reshape(p * p * 3, w),
      lambda x: x.reshape(p, p, 3, w).transpose(3, 2, 0, 1),
    ),
    _as_is(("patch_embed", "bias"), "embeddings.patch_embedding.bias", (w,)),
    _as_is(("pos_embed",), "embeddings.position_embedding.weight", (grid * grid, w)),
    _as_is(("post_norm", "scale"), "post_layernorm.weight", (w,)),
    _as_is(("post_norm", "bias"), "post_layernorm.bias", (w,)),
    _vector(("head", "probe"), "head.probe", (1, w), (1, 1, w)),
    _as_is(("head", "norm", "scale"), "head.layernorm.weight", (w,)),
    _as_is(("head", "norm", "bias"), "head.layernorm.bias", (w,)),
    *_dense(("head", "mlp", "fc1"), "head.mlp.fc1.", w, mlp),
    *_dense(("head", "mlp", "fc2"), "head.mlp.fc2.", mlp, w),
    *_dense(("head", "attn", "o"), "head.attention.out_proj.", w, w),
  ]
  for j, q in enumerate("qkv"):  # nn.MultiheadAttention's fused in-projection [3W, W]
    specs += [
      _linear(
        ("head", "attn", q, "kernel"),
        "head.attention.in_proj_weight",
        (w, w),
        1,
        (3 * w, w),
        (j, 3),
      ),
      _vector(("head", "attn", q, "bias"), "head.attention.in_proj_bias", (w,), (3 * w,), (j, 3)),
    ]
  for i in range(v.depth):
    pp, a = ("layers", i), f"encoder.layers.{i}."
    specs += [
      _as_is(pp + ("norm1", "scale"), a + "layer_norm1.weight", (w,)),
      _as_is(pp + ("norm1", "bias"), a + "layer_norm1.bias", (w,)),
      _as_is(pp + ("norm2", "scale"), a + "layer_norm2.weight", (w,)),
      _as_is(pp + ("norm2", "bias"), a + "layer_norm2.bias", (w,)),
      *_dense(pp + ("attn", "q"), a + "self_attn.q_proj.", w, w),
      *_dense(pp + ("attn", "k"), a + "self_attn.k_proj.", w, w),
      *_dense(pp + ("attn", "v"), a + "self_attn.v_proj.", w, w),
      *_dense(pp + ("attn", "o"), a + "self_attn.out_proj.", w, w),
      *_dense(pp + ("mlp", "fc1"), a + "mlp.fc1.", w, mlp),
      *_dense(pp + ("mlp", "fc2"), a + "mlp.fc2.", mlp, w),
    ]
  return specs


# ===================================================================================== reading
class SafetensorsSource:
  """Tensor-by-tensor reader of a checkpoint directory (one file, or shards with an index).

  ``get`` memory-maps the file and copies out one tensor (bf16 included, via ml_dtypes).
  """

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise CheckpointError(f"{index}: not a safetensors index ({e!r}).") from None
      self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
    elif os.path.isfile(single):
      self._file_of = None
      self._single = single
    else:
      others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      hint = (
        (
          f" It has {others}: pickle-based files are never loaded (they can run code); "
          f"convert them with transformers' save_pretrained(safe_serialization=True)."
        )
        if others
        else ""
      )
      raise CheckpointError(
        f"{directory!r} has no model.safetensors or model.safetensors.index.json.{hint}"
      )
    self._handles: dict[str, Any] = {}
    self._shapes: dict[str, tuple] = {}
    for path in self._files():
      if not os.path.isfile(path):
        raise CheckpointError(f"{path}: listed in the index but missing.")
      h = self._open(path)
      for k in h.keys():
        self._shapes[k] = tuple(h.get_slice(k).get_shape())
    if self._file_of is not None:
      missing = sorted(set(self._file_of) - set(self._shapes))
      if missing:
        raise CheckpointError(
          f"{directory}: tensors {missing[:5]} are in the index but not in their files."
        )

  def _files(self) -> list[str]:
    return [self._single] if self._file_of is None else sorted(set(self._file_of.values()))

  def _open(self, path: str):
    if path not in self._handles:
      from safetensors import safe_open

      self._handles[path] = safe_open(path, framework="flax")
    return self._handles[path]

  def names(self) -> set[str]:
    return set(self._shapes)

  def shape(self, name: str) -> tuple:
    return self._shapes[name]

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` as a host numpy array in its stored dtype."""
    path = self._single if self._file_of is None else self._file_of[name]
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return np.asarray(self._open(path).get_tensor(name))


def find_prefix(names: Iterable[str], anchor: str, where: str) -> str:
  """The prefix before ``anchor`` in the checkpoint's names ('' or e.g. 'vision_model.').

  Raises:
    CheckpointError: no name ends with ``anchor``, or several prefixes do.
  """
  prefixes = sorted({n[: -len(anchor)] for n in names if n.endswith(anchor)})
  if len(prefixes) != 1:
    raise CheckpointError(
      f"{where}: expected exactly one tensor named '*{anchor}', found "
      f"{[p + anchor for p in prefixes] or 'none'}."
    )
  return prefixes[0]


def check_tensors(
  source,
  specs: list[TensorSpec],
  prefix: str,
  where: str,
  extra_ok: Callable[[str], bool] = lambda _: False,
) -> None:
  """Checks names and shapes (metadata only, no tensor is read).

  Args:
    source: a :class:`SafetensorsSource` (or anything with ``names``/``shape``/``get``).
    specs: the tensors to read (:func:`llm_specs` / :func:`vision_specs`).
    prefix: the checkpoint's name prefix (:func:`find_prefix`).
    where: shown in errors (the directory or file).
    extra_ok: names under ``prefix`` that may be present without being read.

  Raises:
    CheckpointError: a tensor is missing or has another shape than the config implies, or the
      checkpoint has tensors under ``prefix`` that nothing reads (they would be silently lost).
  """
  names = source.names()
  used = set()
  for s in specs:
    full = prefix + s.name
    if full not in names:
      raise CheckpointError(
        f"{where}: tensor {full!r} is missing (needed for {'/'.join(map(str, s.path))})."
      )
    if tuple(source.shape(full)) != tuple(s.hf_shape):
      raise CheckpointError(
        f"{where}: tensor {full!r} has shape {tuple(source.shape(full))} but "
        f"config.json implies {tuple(s.hf_shape)}."
      )
    used.add(full)
  unused = sorted(
    n
    for n in names
    if n.startswith(prefix)
    and n not in used
    and not n.endswith(_IGNORED_SUFFIXES)
    and not extra_ok(n)
  )
  if unused:
    raise CheckpointError(
      f"{where}: {len(unused)} tensors are not part of the architecture in "
      f"config.json and would be lost: {unused[:8]}."
    )


def read_tensors(
  source,
  specs: list[TensorSpec],
  prefix: str,
  where: str,
  extra_ok: Callable[[str], bool] = lambda _: False,
) -> Iterator[tuple[TensorSpec, np.ndarray]]:
  """Yields (spec, array in our layout) one tensor at a time, after :func:`check_tensors`."""
  check_tensors(source, specs, prefix, where, extra_ok)
  cache: tuple[str, np.ndarray] | None = None  # a fused tensor is read once for its parts
  for s in specs:
    full = prefix + s.name
    if cache is None or cache[0] != full:
      cache = (full, source.get(full))
    w = cache[1]
    if s.part is not None:
      i, count = s.part
      step = w.shape[0] // count
      w = w[i * step : (i + 1) * step]
    yield s, s.to_ours(w)


def tied_head_check(source, prefix: str, where: str) -> Callable[[str], bool]:
  """For tied embeddings: allows a stored lm_head.weight only if it equals the embedding."""
  name = prefix + "lm_head.weight"

  def ok(n: str) -> bool:
    if n != name:
      return False
    if not np.array_equal(source.get(name), source.get(prefix + "model.embed_tokens.weight")):
      raise CheckpointError(
        f"{where}: tie_word_embeddings=True but {name!r} differs from the "
        f"input embedding; set tie_word_embeddings=false in config.json."
      )
    return True

  return ok


# ===================================================================================== writing
def write_safetensors(
  tensors: Iterable[tuple[str, Any]], directory: str, *, max_shard_bytes: int = 4 << 30
) -> list[str]:
  """Writes (name, array) pairs as transformers-loadable safetensors; returns the file names.

  Tensors are gathered into shards of at most ``max_shard_bytes`` (only one shard is in host
  memory at a time); several shards get a ``model.safetensors.index.json``.
  """
  from safetensors.flax import save_file

  os.makedirs(directory, exist_ok=True)
  shards: list[dict[str, str]] = []
  current: dict[str, Any] = {}
  size = 0
  tmp_names = []

  def flush():
    nonlocal current, size
    if current:
      name = f"model-{len(tmp_names) + 1:05d}.safetensors.tmp"
      save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
      tmp_names.append(name)
      shards.append({k: name for k in current})
      current, size = {}, 0

  total = 0
  cpu = jax.local_devices(backend="cpu")[0]
  for name, array in tensors:
    array = jax.device_put(np.asarray(array), cpu)  # host memory, whatever the default device
    nbytes = array.size * array.dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      flush()
    current[name] = array
    size += nbytes
    total += nbytes
  flush()
  if len(tmp_names) == 1:
    final = ["model.safetensors"]
  else:
    final = [
      f"model-{i + 1:05d}-of-{len(tmp_names):05d}.safetensors" for i in range(len(tmp_names))
    ]
  for tmp, fin in zip(tmp_names, final):
    os.replace(os.path.join(directory, tmp), os.path.join(directory, fin))
  if len(final) > 1:
    weight_map = {k: final[tmp_names.index(v)] for shard in shards for k, v in shard.items()}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return final


def hf_tensors(
  get: Callable[[tuple], Any], specs: list[TensorSpec], prefix: str = ""
) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor of ``specs``; fused parts are concatenated along axis 0.

  ``get(path)`` returns our parameter at ``path`` (any array type).
  """
  pending: dict[str, list] = {}
  fetched: tuple = (None, None)  # the last parameter read: a stacked one serves its rows
  for s in specs:
    if fetched[0] != s.path:
      fetched = (s.path, np.asarray(jax.device_get(get(s.path))))
    x = s.to_hf(fetched[1] if s.index is None else fetched[1][s.index])
    if s.part is None:
      yield prefix + s.name, x
      continue
    parts = pending.setdefault(s.name, [None] * s.part[1])
    parts[s.part[0]] = x
    if all(p is not None for p in parts):
      yield prefix + s.name, np.concatenate(pending.pop(s.name), axis=0)


def write_config(directory: str, config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
