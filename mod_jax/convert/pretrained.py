"""Pretrained weights into mod_jax models: one entry point for every supported checkpoint kind.

Kinds (:func:`kind_of`):

* ``gguf``      — a ``.gguf`` file (:mod:`mod_jax.convert.gguf`; Llama / Qwen2 LLM);
* ``hf_llm``    — a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory;
* ``hf_vision`` — a Hugging Face ``SiglipVisionModel`` / ``SiglipModel`` directory;
* ``mod_jax``   — a directory written by ``mod-jax convert --from-hf`` (``model_config.json`` +
  orbax ``params/``, :func:`save_native`), or a training workdir (``config.json`` +
  ``checkpoints/``; the parameters of the latest step are restored, the optimizer state is not).

Loading replaces parameters of an existing model state **in place, one tensor at a time**: each
tensor is read from the memory-mapped file, converted to the parameter's dtype, placed with the
parameter's sharding (``jax.make_array_from_callback``, which also works across hosts) and the
random initial value is dropped. Peak host memory is one tensor; peak device memory is the model.
Config fields of the checkpoint must equal the model config's (:func:`check_fields`).
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from mod_jax.config import ConfigError, base_config
from mod_jax.convert import hf
from mod_jax.convert.hf import CheckpointError

KINDS = ("gguf", "hf_llm", "hf_vision", "mod_jax")
_LLM_FIELDS = (
  "vocab_size",
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "head_dim",
  "d_ff",
  "rope_theta",
  "rope_scaling",
  "rms_norm_eps",
  "tie_embeddings",
  "qkv_bias",
)
_VISION_FIELDS = (
  "image_size",
  "patch_size",
  "width",
  "depth",
  "n_heads",
  "mlp_dim",
  "layer_norm_eps",
)


# ===================================================================================== kinds
def kind_of(path: str) -> str:
  """Which checkpoint ``path`` is (one of :data:`KINDS`).

  Raises:
    CheckpointError: the path does not exist or is none of the kinds.
  """
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read(4) == b"GGUF":
        return "gguf"
    raise CheckpointError(
      f"{path!r} is a file but not GGUF; give a .gguf file or a checkpoint directory."
    )
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path!r} does not exist.")
  if os.path.isfile(os.path.join(path, "model_config.json")) or os.path.isdir(
    os.path.join(path, "checkpoints")
  ):
    return "mod_jax"
  cfg = hf.read_config(path)
  return (
    "hf_vision" if hf.architecture(cfg, os.path.join(path, "config.json")) == "siglip" else "hf_llm"
  )


@functools.lru_cache(maxsize=2)
def _gguf_source(path: str, mtime_ns: int):
  del mtime_ns  # cache key only: a rewritten file is parsed again
  from mod_jax.convert import gguf

  return gguf.GGUFSource(path)


def gguf_source(path: str):
  """A (cached) :class:`mod_jax.convert.gguf.GGUFSource`: parsing the metadata takes seconds."""
  path = os.path.abspath(os.path.expanduser(path))
  return _gguf_source(path, os.stat(path).st_mtime_ns)


def llm_source(path: str):
  """(tensor source, transformers-style config dict, name for messages) of an LLM checkpoint."""
  path = os.path.expanduser(path)
  kind = kind_of(path)
  if kind == "gguf":
    src = gguf_source(path)
    return src, src.hf_config(), path
  if kind == "hf_llm":
    return hf.SafetensorsSource(path), hf.read_config(path), path
  raise CheckpointError(
    f"{path!r} is a {kind} checkpoint; a language model (HF Llama/Qwen2 "
    f"directory or .gguf) was expected."
  )


def llm_fields(path: str) -> dict:
  """``config.model`` fields (architecture sizes) of an LLM checkpoint, read from metadata only."""
  _, cfg, where = llm_source(path)
  return hf.llm_fields(cfg, where)


def vision_fields(path: str) -> dict:
  """``config.model.vision`` fields of a SigLIP checkpoint directory."""
  path = os.path.expanduser(path)
  return hf.vision_fields(hf.read_config(path), os.path.join(path, "config.json"))


def _plain(x):
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  return list(x) if isinstance(x, tuple) else x


def check_fields(cfg, fields: dict, prefix: str, where: str) -> None:
  """Raises ConfigError naming every field of ``cfg`` that differs from the checkpoint's.

  Floats are compared with a relative tolerance of 1e-6 (GGUF stores ``rms_norm_eps`` in float32).
  """
  bad = []
  for k, want in fields.items():
    have = _plain(cfg.get(k))
    want = _plain(want)
    same = (
      math.isclose(have, want, rel_tol=1e-6)
      if isinstance(want, float) and isinstance(have, (int, float))
      else have == want
    )
    if not same:
      bad.append(f"{prefix}{k}={have!r} but the checkpoint has {want!r}")
  if bad:
    raise ConfigError(
      f"config does not match {where}: " + "; ".join(bad) + ". Set these fields "
      "(or build the config from the checkpoint with mod_jax.from_pretrained)."
    )


# ===================================================================================== loading
def _child(state, key):
  try:
    return state[key]
  except (KeyError, TypeError):
    raise CheckpointError(f"model has no parameter at key {key!r}.") from None


def assign(state, path: tuple, value: np.ndarray, where: str) -> None:
  """Replaces the parameter at ``path`` of an ``nnx.State`` in place (dtype, sharding kept).

  Raises:
    CheckpointError: no such parameter, or ``value`` has another shape.
  """
  node = state
  for key in path:
    node = _child(node, key)
  old = node.get_value()
  if tuple(value.shape) != tuple(old.shape):
    raise CheckpointError(
      f"{where}: parameter {'/'.join(map(str, path))} has shape "
      f"{tuple(old.shape)} but the checkpoint gives {tuple(value.shape)}."
    )
  host = np.asarray(value).astype(old.dtype)
  sharding = getattr(old, "sharding", None)
  if sharding is None:
    node.value = jax.numpy.asarray(host)
  else:
    node.value = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _llm_plan(model_cfg, path: str):
  """(source, specs, prefix, where, extra_ok) of an LLM checkpoint, config and tensors checked."""
  source, cfg, where = llm_source(path)
  check_fields(model_cfg, hf.llm_fields(cfg, where), "model.", where)
  specs = hf.llm_specs(model_cfg)
  prefix = hf.find_prefix(source.names(), "model.embed_tokens.weight", where)
  extra = (
    hf.tied_head_check(source, prefix, where) if model_cfg.tie_embeddings else (lambda _: False)
  )
  hf.check_tensors(source, specs, prefix, where, extra)
  return source, specs, prefix, where, extra


def _vision_plan(vision_cfg, path: str):
  path = os.path.expanduser(path)
  if kind_of(path) != "hf_vision":
    raise CheckpointError(f"{path!r} is not a SigLIP checkpoint directory.")
  check_fields(vision_cfg, vision_fields(path), "model.vision.", path)
  source = hf.SafetensorsSource(path)
  prefix = hf.find_prefix(source.names(), "embeddings.patch_embedding.weight", path)
  specs = hf.vision_specs(vision_cfg)
  hf.check_tensors(source, specs, prefix, path)
  return source, specs, prefix, path, lambda _: False


def check_llm(model_cfg, path: str) -> None:
  """Checks an LLM checkpoint against ``model_cfg`` (fields, tensor names and shapes) without
  reading tensors. Raises ConfigError / CheckpointError naming the problem."""
  _llm_plan(model_cfg, path)


def check_vision(vision_cfg, path: str) -> None:
  """:func:`check_llm` for a SigLIP checkpoint."""
  _vision_plan(vision_cfg, path)


def _load(state, plan) -> int:
  """Reads ``plan``'s tensors into ``state``; the rows of a stacked parameter (one per decoder
  layer, ``TensorSpec.index``) are gathered on the host and assigned once."""
  source, specs, prefix, where, extra = plan
  n = 0
  rows: list = [None, None, set()]  # path, host array, rows filled

  def flush():
    path, host, filled = rows
    if path is not None:
      if len(filled) != host.shape[0]:
        raise CheckpointError(
          f"{where}: parameter {'/'.join(map(str, path))} got layers {sorted(filled)} of "
          f"{host.shape[0]}."
        )
      assign(state, path, host, where)
    rows[:] = [None, None, set()]

  for spec, array in hf.read_tensors(source, specs, prefix, where, extra):
    n += 1
    if spec.index is None:
      assign(state, spec.path, array, where)
      continue
    if rows[0] != spec.path:
      flush()
      node = state
      for key in spec.path:
        node = _child(node, key)
      old = node.get_value()
      rows[:] = [spec.path, np.empty(old.shape, old.dtype), set()]
    host = rows[1]
    if tuple(array.shape) != host.shape[1:]:
      raise CheckpointError(
        f"{where}: {spec.name!r} has shape {tuple(array.shape)} in our layout but layer "
        f"{spec.index} of {'/'.join(map(str, spec.path))} is {host.shape[1:]}."
      )
    host[spec.index] = array
    rows[2].add(spec.index)
  flush()
  return n


def load_llm(state, model_cfg, path: str) -> int:
  """Loads an LLM checkpoint into ``state`` (``nnx.State`` of a ``Decoder``, in place).

  Returns the number of tensors read.

  Raises:
    ConfigError: ``model_cfg`` differs from the checkpoint's architecture.
    CheckpointError: missing / misshapen / unexpected tensors (named).
  """
  return _load(state, _llm_plan(model_cfg, path))


def load_vision(state, vision_cfg, path: str) -> int:
  """Loads a SigLIP checkpoint into ``state`` (``nnx.State`` of a ``VisionEncoder``, in place).

  Only tensors under the vision tower's prefix are read (a SiglipModel's text tower is ignored).
  """
  return _load(state, _vision_plan(vision_cfg, path))


# ===================================================================================== native
def config_from_json(text: str, template: ml_collections.ConfigDict | None = None):
  """A ConfigDict from JSON written by ``to_json``, typed like ``template`` (default: base).

  JSON turns tuples into lists; fields whose template value is a tuple get tuples back.
  """
  template = base_config() if template is None else template

  def merge(dst, src, where):
    for k, v in src.items():
      if k in dst and isinstance(dst[k], ml_collections.ConfigDict) and isinstance(v, dict):
        merge(dst[k], v, f"{where}{k}.")
        continue
      if k in dst and isinstance(dst[k], tuple) and isinstance(v, list):
        v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
      try:
        dst[k] = v
      except (TypeError, KeyError) as e:
        raise ConfigError(
          f"saved config field {where}{k}={v!r} does not fit this version of mod_jax ({e})."
        ) from None

  out = ml_collections.ConfigDict(template.to_dict(), type_safe=False)
  merge(out, json.loads(text), "")
  return out


def save_native(params, model_cfg, out_dir: str, tokenizer=None) -> None:
  """Writes ``model_config.json`` + orbax ``params/`` (+ ``tokenizer.json``) to ``out_dir``.

  ``params``: ``nnx.State`` of a ``VideoLLM``'s parameters; ``tokenizer``: a
  ``tokenizers.Tokenizer`` or None.
  """
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(out_dir, "params"), _as_tree(params), force=True)
  with open(os.path.join(out_dir, "model_config.json"), "w", encoding="utf-8") as f:
    f.write(model_cfg.to_json_best_effort(indent=2))
  if tokenizer is not None:
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def _as_tree(params):
  """nnx.State → nested dict with string keys (orbax stores string keys)."""
  pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params

  def walk(x):
    return {str(k): walk(v) for k, v in x.items()} if isinstance(x, dict) else x

  return walk(pure)


def native_config(path: str):
  """The config of a ``mod_jax`` checkpoint: a training workdir's ``config.json`` (local or
  ``gs://``), or base defaults with the converted directory's ``model_config.json`` as ``model``.

  Raises:
    FileNotFoundError: neither file exists (not a ``mod-jax train`` / ``convert`` directory).
  """
  root = epath.Path(os.path.expanduser(str(path)))
  if (root / "model_config.json").is_file():
    return config_from_json(
      json.dumps({"model": json.loads((root / "model_config.json").read_text())})
    )
  if not (root / "config.json").is_file():
    raise FileNotFoundError(
      f"{root / 'config.json'} does not exist: give a directory written by `mod-jax train` "
      f"(config.json + checkpoints/) or `mod-jax convert` (model_config.json + params/)."
    )
  return config_from_json((root / "config.json").read_text())


def restore_params(workdir: str, step: int | None = None, *, shardings=None):
  """A trained model from a ``mod-jax train`` workdir: config, graphdef and parameters.

  The frozen base is rebuilt as training built it (the saved config's seed, then its
  ``init_from`` weights) and the checkpoint's trainable parameters are read onto it
  (``mod_jax.train.checkpoint``); no optimizer or data state is read.

  Args:
    workdir: directory with ``config.json`` and ``checkpoints/``.
    step: checkpoint step; None takes the latest.
    shardings: pytree of shardings like the parameters (default: all on the first local device).

  Returns:
    ``(config, graphdef, params, step)``; ``nnx.merge(graphdef, params)`` is the model.

  Raises:
    FileNotFoundError: no ``config.json``, no checkpoint, or no checkpoint at ``step``.
    ConfigError: the checkpoint was trained from another frozen base than its config names.
  """
  from flax import nnx

  from mod_jax.model.factory import build_model
  from mod_jax.train import checkpoint

  config = native_config(workdir)
  if not checkpoint.steps(workdir):  # before building anything
    raise FileNotFoundError(
      f"no checkpoint in {workdir}/checkpoints; train first (mod-jax train --workdir {workdir})."
    )
  graphdef, abstract = nnx.split(
    nnx.eval_shape(lambda: build_model(config.model, rngs=config.seed)), nnx.Param
  )
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  params = jax.jit(
    lambda: nnx.state(build_model(config.model, rngs=config.seed), nnx.Param),
    out_shardings=shardings,
  )()
  if config.model.init_from or config.model.vision.get("init_from"):
    init_from_pretrained(config, params)
  params, step = checkpoint.restore_trainable(
    workdir, params, checkpoint.base_reference(config), step
  )
  return config, graphdef, params, step


def load_native(state, path: str, *, optional=lambda p: False) -> tuple[int, list[str]]:
  """Restores the parameters of a ``mod_jax`` checkpoint into ``state`` (in place).

  Args:
    state: ``nnx.State`` of a ``VideoLLM``; arrays are restored straight into its shardings
      (each host reads only its shards).
    path: a converted directory (``params/``, read straight into the shardings), or a training
      workdir (latest step: its model is rebuilt by :func:`restore_params` on the first local
      device, frozen base + trained parameters, then placed in ``state``'s shardings; one
      process).
    optional: path string → True for parameters the checkpoint may lack (e.g. LoRA adapters,
      routers of layers that did not route); they keep their current values.

  Returns:
    (number of tensors restored, checkpoint parameters the model has no place for).

  Raises:
    CheckpointError: a required parameter is missing or has another shape (named).
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(os.path.join(path, "params")):  # a training workdir
    _, _, saved_params, _ = restore_params(path)
    saved = {"/".join(map(str, p)): v.get_value() for p, v in saved_params.flat_state()}
    return _assign_named(state, saved, path, optional, lambda name, v: saved[name])
  item = os.path.join(path, "params")
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(item)
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  shapes = {}
  for kp, m in jax.tree_util.tree_flatten_with_path(meta)[0]:
    shapes["/".join(str(getattr(k, "key", k)) for k in kp)] = m
  abstract: dict = {}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for p, v in state.flat_state():
    name = "/".join(map(str, p))
    if name in shapes and tuple(shapes[name].shape) == tuple(v.get_value().shape):
      x = v.get_value()
      _set_leaf(
        abstract,
        tuple(name.split("/")),
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default),
      )
  args = ocp.args.PyTreeRestore(
    item=abstract,
    partial_restore=True,
    restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract),
  )
  with ocp.PyTreeCheckpointer() as ckpt:
    restored = ckpt.restore(item, args=args)

  def value(name, v):
    node = restored
    for k in name.split("/"):
      node = node[k]
    return node

  return _assign_named(state, shapes, path, optional, value)


def _assign_named(state, saved: dict, path: str, optional, value) -> tuple[int, list[str]]:
  """Sets every parameter of ``state`` named in ``saved`` (name -> array or metadata with a
  shape) to ``value(name, variable)``; checks presence and shapes (see :func:`load_native`)."""
  todo = []
  for p, v in state.flat_state():
    name = "/".join(map(str, p))
    if name not in saved:
      if not optional(name):
        raise CheckpointError(f"{path}: parameter {name!r} is missing from the checkpoint.")
      continue
    if tuple(saved[name].shape) != tuple(v.get_value().shape):
      raise CheckpointError(
        f"{path}: parameter {name!r} has shape {tuple(saved[name].shape)} in the "
        f"checkpoint but {tuple(v.get_value().shape)} in the model."
      )
    todo.append((name, v))
  for name, v in todo:
    x = value(name, v)
    old = v.get_value()
    v.value = jax.device_put(x, old.sharding) if hasattr(old, "sharding") else x
  return len(todo), sorted(set(saved) - {n for n, _ in todo})


def _set_leaf(tree: dict, keys: tuple, leaf) -> None:
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  node[keys[-1]] = leaf


# ===================================================================================== training
def check_init_from(config) -> None:
  """Checks ``model.init_from`` / ``model.vision.init_from`` against the config (metadata only),
  so a mismatch fails before the model is built. Raises ConfigError / CheckpointError."""
  m = config.model
  if m.init_from:
    if kind_of(m.init_from) == "mod_jax":
      saved = native_config(m.init_from).model
      check_fields(m, {k: saved.get(k) for k in _LLM_FIELDS}, "model.", m.init_from)
      check_fields(
        m.vision, {k: saved.vision.get(k) for k in _VISION_FIELDS}, "model.vision.", m.init_from
      )
    else:
      check_llm(m, m.init_from)
  if m.vision.get("init_from"):
    check_vision(m.vision, m.vision.init_from)


def init_from_pretrained(config, params) -> list[str]:
  """Loads ``config.model.init_from`` / ``config.model.vision.init_from`` into ``params``.

  ``params``: the ``nnx.State`` of a ``VideoLLM`` (e.g. ``TrainState.params``), modified in
  place. Adapters (LoRA) are never in a pretrained checkpoint and keep their initial values;
  a ``mod_jax`` checkpoint restores every other parameter it has. Returns log lines.

  Raises:
    ConfigError / CheckpointError: architecture mismatch, bad checkpoint (named).
  """
  m = config.model
  lines = []
  check_init_from(config)
  if m.init_from:
    kind = kind_of(m.init_from)
    if kind == "mod_jax":
      n, unused = load_native(
        params, m.init_from, optional=lambda p: "_lora/" in p or p.startswith("llm/routers/")
      )
      if unused:
        lines.append(f"not loaded (no such parameter in this model): {unused}")
    else:
      n = load_llm(params["llm"], m, m.init_from)
    lines.append(f"loaded {n} tensors from {m.init_from} ({kind})")
  if m.vision.get("init_from"):
    n = load_vision(params["vision"], m.vision, m.vision.init_from)
    lines.append(f"loaded {n} vision tensors from {m.vision.init_from}")
  return lines
