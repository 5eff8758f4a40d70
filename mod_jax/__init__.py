"""mod_jax: streaming video-language models with Mixture-of-Depths vision computation in JAX/Flax.

Implements VideoLLM-MoD (Wu et al., NeurIPS 2024, arXiv 2408.16730) on the VideoLLM-online / LIVE
streaming base (Chen et al., CVPR 2024, arXiv 2406.11816). See README.md for the layout.
"""

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
  """Loads a Hugging Face / GGUF / mod_jax checkpoint: ``(model, tokenizer)``.

  See :func:`mod_jax.api.from_pretrained` (imported lazily so ``import mod_jax`` stays cheap).
  """
  from mod_jax import api

  return api.from_pretrained(path, **kwargs)
