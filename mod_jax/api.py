"""Notebook entry points: ``from_pretrained`` and a plain greedy decoder.

  >>> import mod_jax
  >>> model, tok = mod_jax.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> ids = jnp.asarray([tok.encode("The capital of France is").ids])
  >>> logits = model.text_logits(ids)         # float32 [1, T, vocab]
  >>> out = mod_jax.api.generate_greedy(model, ids[0].tolist(), 20, stop_ids=[2])

The returned model is a :class:`mod_jax.model.video_llm.VideoLLM` (LLM + vision tower +
connector + routers) in eval mode: ``model.text_logits(ids)`` on int32 token ids [B, T] is the plain
causal LM; ``model(batch)`` on a batch dict (``mod_jax/data/pipeline.py``) is the streaming video LLM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mod_jax.config import base_config, validate
from mod_jax.convert import hf, pretrained
from mod_jax.model import rows
from mod_jax.model.factory import build_model, check_model_config
from mod_jax.model.vision import VisionEncoder


def _init(cls, cfg, seed: int, given=lambda path: False):
  """Builds ``cls(cfg)`` in one trace: (graphdef, state) where the parameters ``given`` selects
  (those a checkpoint will provide) are left abstract (``jax.ShapeDtypeStruct``) and all others
  are randomly initialised. The initialisation is one jit returning only the latter, so XLA
  drops the random-number work for everything that will be loaded.
  """
  box = {}

  def init():
    graphdef, state = nnx.split(cls(cfg, rngs=nnx.Rngs(params=seed)))
    box["graphdef"] = graphdef
    box["state"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return [v.get_value() for p, v in state.flat_state() if not given(p)]

  values = iter(jax.jit(init)())
  is_var = lambda x: isinstance(x, nnx.Variable)
  # Fresh Variables at this trace level (those made inside the jit cannot be mutated here).
  state = jax.tree.map(lambda v: v.replace(v.get_value()), box["state"], is_leaf=is_var)
  for p, v in state.flat_state():
    if not given(p):
      v.set_value(next(values))
  return box["graphdef"], state


def init_model(model_cfg, seed: int = 0, cls=build_model):
  """A freshly initialised ``cls(model_cfg)`` (the video LLM by default) built in one jit (much faster than eager init)."""
  graphdef, state = _init(cls, model_cfg, seed)
  return nnx.merge(graphdef, state)


def _finish(graphdef, state, cls, cfg, seed: int):
  """Merges ``state`` into a module; parameters no checkpoint filled are initialised first."""
  left = {p for p, v in state.flat_state() if isinstance(v.get_value(), jax.ShapeDtypeStruct)}
  if left:
    _, fresh = _init(cls, cfg, seed, given=lambda p: p not in left)
    fresh = dict(fresh.flat_state())
    for p, v in state.flat_state():
      if p in left:
        v.set_value(fresh[p].get_value())
  return nnx.merge(graphdef, state)


def _tokenizer_file(path: str):
  import tokenizers

  return tokenizers.Tokenizer.from_file(path) if os.path.isfile(path) else None


def from_pretrained(
  path: str,
  *,
  vision: str | None = None,
  config: ml_collections.ConfigDict | None = None,
  dtype: str | None = None,
  param_dtype: str | None = None,
  tokenizer: str | None = None,
  seed: int = 0,
):
  """Loads a pretrained model and its tokenizer: ``(model, tokenizer)``.

  Same arguments as :func:`load_pretrained`, which also returns the config.
  """
  model, tok, _ = load_pretrained(
    path,
    vision=vision,
    config=config,
    dtype=dtype,
    param_dtype=param_dtype,
    tokenizer=tokenizer,
    seed=seed,
  )
  return model, tok


def load_pretrained(
  path: str,
  *,
  vision: str | None = None,
  config: ml_collections.ConfigDict | None = None,
  dtype: str | None = None,
  param_dtype: str | None = None,
  tokenizer: str | None = None,
  seed: int = 0,
):
  """Loads a pretrained model, its tokenizer and the config it was built from.

  Args:
    path: a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory, a ``.gguf`` file,
      a ``SiglipVisionModel`` / ``SiglipModel`` directory (returns the vision tower alone), or a
      mod_jax checkpoint (``mod-jax convert`` output or a training workdir).
    vision: optional SigLIP directory for the vision tower of an LLM checkpoint.
    config: a full config whose ``model`` section supplies what the checkpoint does not (MoD
      routing, LoRA, the vision tower's pooling); default ``base_config()``. The checkpoint's
      architecture fields override it.
    dtype, param_dtype: compute / parameter dtype (e.g. "bfloat16"); default: the config's.
    tokenizer: a ``tokenizer.json`` overriding the checkpoint's.
    seed: initialisation of the parts the checkpoint lacks (connector, routers, vision tower
      without ``vision``, LoRA adapters).

  Returns:
    (model, tokenizer, config): a ``VideoLLM`` in eval mode (a ``VisionEncoder`` for a SigLIP
    path), a ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or the GGUF metadata; a training
    workdir's ``data.tokenizer``) or None if the checkpoint has none, and the full ConfigDict.

  Raises:
    CheckpointError: unsupported or malformed checkpoint (the message names the tensor / field).
    ConfigError: the resulting config is impossible (e.g. the patch grid is not divisible by
      ``model.vision.pool_size``).
  """
  path = os.path.expanduser(path)
  kind = pretrained.kind_of(path)
  cfg = pretrained.config_from_json((config or base_config()).to_json_best_effort(), base_config())
  tok = None
  if kind == "mod_jax":
    saved = pretrained.native_config(path)
    cfg.model = saved.model
    if saved.data.tokenizer:  # a training workdir: its data config names the tokenizer
      cfg.data.tokenizer = saved.data.tokenizer
  elif kind == "hf_vision":
    cfg.model.vision.update(pretrained.vision_fields(path))
  else:
    cfg.model.update(pretrained.llm_fields(path))
  if vision:
    cfg.model.vision.update(pretrained.vision_fields(vision))
  if dtype:
    cfg.model.dtype = dtype
  if param_dtype:
    cfg.model.param_dtype = param_dtype
  validate(cfg)
  check_model_config(cfg.model)
  # Fail fast, before anything is allocated: config fields, tensor names and shapes.
  if kind in ("gguf", "hf_llm"):
    pretrained.check_llm(cfg.model, path)
  if kind == "hf_vision" or vision:
    pretrained.check_vision(cfg.model.vision, vision or path)

  if kind == "hf_vision":
    graphdef, state = _init(
      VisionEncoder, cfg.model.vision, seed, given=lambda p: "_lora" not in str(p)
    )
    pretrained.load_vision(state, cfg.model.vision, path)
    return _finish(graphdef, state, VisionEncoder, cfg.model.vision, seed), None, cfg

  if kind == "mod_jax":
    given = lambda p: "_lora" not in "/".join(map(str, p))
  else:
    paths = {("llm",) + t.path for t in hf.llm_specs(cfg.model)}
    if vision:
      paths |= {("vision",) + t.path for t in hf.vision_specs(cfg.model.vision)}
    given = lambda p: tuple(p) in paths
  graphdef, state = _init(build_model, cfg.model, seed, given)
  if kind == "mod_jax":
    pretrained.load_native(state, path, optional=lambda p: "_lora/" in p)
    tok = _tokenizer_file(os.path.join(path, "tokenizer.json")) or (
      _tokenizer_file(os.path.expanduser(cfg.data.tokenizer)) if cfg.data.tokenizer else None
    )
  else:
    pretrained.load_llm(state["llm"], cfg.model, path)
    if kind == "gguf":
      tok = pretrained.gguf_source(path).tokenizer()
    else:
      tok = _tokenizer_file(os.path.join(path, "tokenizer.json"))
  if vision:
    pretrained.load_vision(state["vision"], cfg.model.vision, vision)
  model = _finish(graphdef, state, build_model, cfg.model, seed)
  if tokenizer:
    tok = _tokenizer_file(tokenizer)
    if tok is None:
      raise FileNotFoundError(f"tokenizer file {tokenizer!r} does not exist.")
  model.eval()
  return model, tok, cfg


def generate_greedy(
  model,
  prompt_ids: Sequence[int],
  max_new_tokens: int,
  *,
  stop_ids: Sequence[int] = (),
  max_len: int | None = None,
) -> list[int]:
  """Greedy decoding with the text-only LM, recomputing the whole sequence every step (no cache).

  A reference decoder for checks and notebooks (the streaming engine has the cached one). The
  sequence lives in a fixed buffer of ``max_len`` tokens, so one compiled step serves all lengths.

  Args:
    model: a ``VideoLLM`` (or ``Decoder``).
    prompt_ids: token ids of the prompt.
    max_new_tokens: how many tokens to generate at most.
    stop_ids: generation ends after emitting one of these (it is included in the output).
    max_len: buffer length; default ``len(prompt) + max_new_tokens``.

  Returns:
    The generated ids (without the prompt).
  """
  llm = model.llm if hasattr(model, "llm") else model
  n0 = len(prompt_ids)
  size = max_len or n0 + max_new_tokens
  if n0 < 1 or n0 + max_new_tokens > size:
    raise ValueError(
      f"prompt of {n0} tokens + {max_new_tokens} new tokens does not fit a buffer "
      f"of max_len={size}."
    )
  graphdef, params = nnx.split(llm)

  @jax.jit
  def next_token(params, ids, length):
    m = nnx.merge(graphdef, params)
    pos = jnp.arange(size, dtype=jnp.int32)[None]
    seg = (pos < length).astype(jnp.int32)
    h, _ = m(m.embed_tokens(ids), rows.TokenInfo(pos, seg))  # in order; padding at the end
    return jnp.argmax(m.logits(h[:, length - 1][:, None])[0, 0])

  buf = np.zeros((1, size), np.int32)
  buf[0, :n0] = prompt_ids
  out = []
  for i in range(max_new_tokens):
    tok = int(next_token(params, jnp.asarray(buf), n0 + i))
    out.append(tok)
    if tok in stop_ids:
      break
    buf[0, n0 + i] = tok
  return out
