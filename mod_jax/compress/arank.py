"""ARank (γ-MoD, Luo et al. 2024, arXiv 2410.13859, §3.1): the rank of a layer's attention maps.

For one sample and one layer, each head's attention probabilities ``[q, k]`` are restricted to the
causal part (keys at or before the query, with the query rows aligned to the LAST q keys) and
their diagonal (a token's attention to itself) is set to zero; the fp32 matrix rank of that map
is averaged over heads. A low ARank marks a redundant layer, a candidate for MoD. The rank uses
the numerical tolerance of ``torch.linalg.matrix_rank`` / ``numpy.linalg.matrix_rank``
(σ_max · max(q, k) · ε_float32), as the γ-MoD reference computes it in fp32.

Calibration over a checkpoint (``mod-jax arank``) lives in ``arank_main.py``.
"""

from __future__ import annotations

import numpy as np


def attention_rank(probs) -> float:
  """Mean over heads of the fp32 rank of each head's causal attention map, diagonal zeroed.

  Args:
    probs: float ``[h, q, k]`` (any float dtype, numpy or jax; converted to float32 on the
      host), one sample's attention probabilities of one layer, q <= k. Query i is the token at
      key index ``i + k - q`` (the queries are the last q tokens, as with a KV cache).
  Returns:
    ARank, a Python float in [0, min(q, k)].
  Raises:
    ValueError: ``probs`` is not 3-D, or q > k.
  """
  p = np.asarray(probs, dtype=np.float32)
  if p.ndim != 3:
    raise ValueError(f"probs must be [heads, queries, keys]; got shape {p.shape}.")
  h, q, k = p.shape
  if q > k:
    raise ValueError(f"probs has {q} queries but only {k} keys; expected q <= k.")
  off = k - q
  rows = np.arange(q)[:, None] + off
  cols = np.arange(k)[None, :]
  keep = (cols <= rows) & (cols != rows)  # causal, diagonal zeroed
  masked = np.where(keep[None], p, np.float32(0.0))
  ranks = [int(np.linalg.matrix_rank(masked[i])) for i in range(h)]
  return float(np.mean(ranks)) if ranks else 0.0
