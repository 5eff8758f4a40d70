"""Export a mod_jax model as Hugging Face checkpoints that transformers loads.

``OUT/`` gets the language model (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``: ``config.json``,
``model.safetensors`` or shards + index, ``tokenizer.json`` when given) with every LoRA adapter
merged (W + (alpha/r)·A·B, computed per tensor, so no second copy of the model is made);
``OUT/vision_tower/`` gets the vision tower as a ``SiglipVisionModel``. The connector and the
routers have no transformers counterpart: they stay in the mod_jax checkpoint (the returned
summary says so).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from mod_jax.convert import hf
from mod_jax.model import lora


def export_hf(
  model,
  model_cfg,
  out_dir: str,
  *,
  tokenizer=None,
  vision: bool = True,
  max_shard_bytes: int = 4 << 30,
) -> dict:
  """Writes ``model`` (a ``VideoLLM``) to ``out_dir``; returns a summary dict.

  Args:
    model: the model (its parameters are read, never modified).
    model_cfg: its ``config.model``.
    out_dir: output directory (created).
    tokenizer: a ``tokenizers.Tokenizer`` to save next to the LLM, or None.
    vision: also write the vision tower to ``out_dir/vision_tower``.
    max_shard_bytes: largest safetensors file; bigger models get shards and an index.

  Returns:
    {"llm_files": [...], "vision_files": [...], "merged_lora": adapters merged, counted per
    layer, "not_exported": [...]}
  """
  state = nnx.state(model, nnx.Param)
  merged = {tuple(path[:-1]) + (name,): ad for path, _, name, ad in lora.adapters(model)}

  def param(path):
    node = state
    for k in path:
      node = node[k]
    w = node[...]
    ad = merged.get(tuple(path))
    return w if ad is None else (w.astype(jnp.float32) + ad.delta()).astype(w.dtype)

  dtype = str(jnp.dtype(model_cfg.param_dtype))
  hf.write_config(out_dir, hf.llm_hf_config(model_cfg, dtype))
  llm_files = hf.write_safetensors(
    hf.hf_tensors(lambda p: param(("llm",) + tuple(p)), hf.llm_specs(model_cfg)),
    out_dir,
    max_shard_bytes=max_shard_bytes,
  )
  if tokenizer is not None:
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  vision_files = []
  if vision:
    vdir = os.path.join(out_dir, "vision_tower")
    hf.write_config(vdir, hf.vision_hf_config(model_cfg.vision))
    vision_files = hf.write_safetensors(
      hf.hf_tensors(lambda p: param(("vision",) + tuple(p)), hf.vision_specs(model_cfg.vision)),
      vdir,
      max_shard_bytes=max_shard_bytes,
    )
  rest = sorted(
    {
      "connector" if p[0] == "connector" else "llm/routers"
      for p, _ in state.flat_state()
      if p[0] == "connector" or (p[0] == "llm" and p[1] == "routers")
    }
  )
  return {
    "llm_files": llm_files,
    "vision_files": vision_files,
    # per layer: an adapter of stacked layers (A [layers, *in, r]) counts once per layer
    "merged_lora": sum(ad.a.shape[0] if ad.a.ndim > ad.n_in + 1 else 1 for ad in merged.values()),
    "not_exported": rest,
  }
