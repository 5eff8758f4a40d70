"""FastV (Chen et al. 2024, arXiv 2403.06764, §4; code ``pkunlp-icler/FastV``): after layer K,
drop the R share of image tokens that receive the least attention from the last token.

The score of an image token is the last query's attention to it at layer K-1, averaged over
heads (the reference's ``last_layer_attention_avg_last_tok``); the kept tokens keep their
original positions. The kept count is static: ``n_img - floor(R · n_img)`` (R = 0.5 keeps 288 of
LLaVA-1.5's 576, the reference's ``fast_v_attention_rank``).

Inside the model (``mod_jax/compress/apply.py``) a streaming video LLM has one "last token" per
frame — the frame's last vision token, where the stream decision is read — so FastV scores each
frame's tokens by that token's attention and keeps a static number per frame: the per-frame
top-k of ``mod.routed_block`` with these scores, in layers K..n-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def kept_count(num_image: int, r: float) -> int:
  """Image tokens FastV keeps of ``num_image`` at drop ratio ``r`` in [0, 1]."""
  if not 0.0 <= r <= 1.0:
    raise ValueError(f"FastV R={r} must be in [0, 1] (the share of image tokens dropped).")
  return int(num_image) - int(np.floor(r * num_image + 1e-9))


def last_token_scores(attn) -> jax.Array:
  """Head-averaged attention of the last query, float32 ``[k]``, from ``attn`` ``[h, q, k]``."""
  return jnp.mean(jnp.asarray(attn, jnp.float32)[:, -1, :], axis=0)


def fastv_keep(attn, image_mask, r: float) -> jax.Array:
  """FastV's keep mask over the keys of layer K-1.

  Args:
    attn: float ``[h, q, k]`` attention probabilities of layer K-1 (may be traced).
    image_mask: bool ``[k]``, the image tokens; must be concrete (numpy or a non-traced array),
      because the kept count ``n_img - floor(R · n_img)`` is a static shape.
    r: drop ratio R in [0, 1].
  Returns:
    bool ``[k]``: every non-image token, and the image tokens with the highest head-averaged
    attention from the last query (ties: the lower index).
  Raises:
    ValueError: R outside [0, 1] or mismatched shapes; TypeError: a traced ``image_mask``.
  """
  if isinstance(image_mask, jax.core.Tracer):
    raise TypeError(
      "fastv_keep: image_mask must be concrete (numpy), since the kept count is a static "
      "shape; close over it instead of passing it through jit."
    )
  mask = np.asarray(image_mask, bool)
  attn = jnp.asarray(attn)
  if attn.ndim != 3 or mask.shape != (attn.shape[-1],):
    raise ValueError(
      f"attn must be [h, q, k] and image_mask [k]; got {attn.shape} and {mask.shape}."
    )
  keep_n = kept_count(int(mask.sum()), r)
  scores = jnp.where(jnp.asarray(mask), last_token_scores(attn), -jnp.inf)
  _, idx = jax.lax.top_k(scores, keep_n)
  chosen = jnp.zeros(mask.shape, bool).at[idx].set(True)
  return jnp.asarray(~mask) | chosen
