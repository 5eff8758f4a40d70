"""DyCoke (Tao et al. 2024, arXiv 2411.15024; code ``KD-TAO/DyCoke``), training-free.

**Temporal token merging (TTM)**, §3.1, at prefill on the connector outputs. The paper: windows
of 4 frames; in each, frame 0 is kept whole and frames 1–3 keep the ``(1−K)·N`` tokens that are
least cosine-similar to the same spatial position of their reference frame, so a window retains
``(1 + 3(1−K))/4`` of its tokens. :func:`temporal_token_merging` is the reference
``llava/model/llava_arch.py::dycole_ttm`` exactly, including where its code differs from that
description (we follow the code and say so):

* pairs (2p, 2p+1) are compared position by position; frame 2p+1 keeps its ``int((1−K)·N)``
  least similar tokens, but by the similarity of the PREVIOUS pair (``similarities[(i - 2) // 2]``;
  the first pair uses the LAST pair's similarity);
* frame i+2 of a window starting at i keeps its least similar tokens against frame i, only when
  ``i < F − 4`` — the last full window keeps its frame i+2 whole;
* with an odd number of frames the last frame is dropped entirely;
* the reference reorders kept tokens by similarity; a keep mask keeps their original positions
  (the project keeps original positions everywhere).

Because of the first two points the reference is not causal (frame 1 depends on the last pair,
and whether frame i+2 is pruned depends on later frames), so it cannot run on a live stream.
:func:`causal_keep` is the paper's definition — frame 1 vs frame 0, frame 2 vs frame 0, frame 3
vs frame 2 — on windows counted from the first frame of the stream, with no last-window
exception; it is what the model runs (teacher-forced and streaming alike).

**Dynamic KV pruning** (§3.2, decoding): from layer L on, attend only to the top (1−P) image
entries by the last token's head-averaged attention at layer L−1, re-selected when that
attention changes (cosine < 0.9); the full cache is kept (``mod_jax/compress/apply.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 4


def keep_per_frame(k: float, n: int) -> int:
  """Tokens a pruned frame keeps: ``int((1 − K) · N)`` (the reference's ``merging_ratio``)."""
  if not 0.0 <= k <= 1.0:
    raise ValueError(f"DyCoke K={k} must be in [0, 1] (the TTM pruning rate).")
  return int((1 - k) * n)


def _cosine(a, b) -> jax.Array:
  """Per-position cosine similarity of [n, d] and [n, d] (float32 [n]), eps as torch (1e-8)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)
  return num / den


def _least_similar(sim, keep_n: int) -> jax.Array:
  """bool [n]: the ``keep_n`` positions of lowest similarity (ties: the lower index)."""
  _, idx = jax.lax.top_k(-sim, keep_n)
  return jnp.zeros(sim.shape, bool).at[idx].set(True)


def temporal_token_merging(x, k: float) -> jax.Array:
  """TTM keep mask of one video, exactly as the reference ``dycole_ttm`` (module docstring).

  Args:
    x: float ``[F, N, d]``, one video's connector outputs (frames × tokens per frame × width).
    k: the pruning rate K in [0, 1].
  Returns:
    bool ``[F, N]``: True for the tokens the reference keeps. Retained fraction of a 4-frame
    window that is not the last: ``(N + 3·int((1−K)·N)) / 4N`` = (1 + 3(1−K))/4 when (1−K)·N is
    an integer; the last full window keeps frame 2 whole; an odd F drops the last frame.
    F = 1 (the reference fails on an empty stack) keeps the frame whole.
  Raises:
    ValueError: x not 3-D or K outside [0, 1].
  """
  x = jnp.asarray(x)
  if x.ndim != 3:
    raise ValueError(f"x must be [frames, tokens, width]; got shape {x.shape}.")
  f, n, _ = x.shape
  keep_n = keep_per_frame(k, n)
  if f == 1:
    return jnp.ones((1, n), bool)
  whole = jnp.ones((n,), bool)
  out = [jnp.zeros((n,), bool) for _ in range(f)]  # an odd F's last frame stays dropped
  pair_sims = [_cosine(x[i], x[i + 1]) for i in range(0, f - 1, 2)]
  for p, i in enumerate(range(0, f - 1, 2)):
    out[i] = whole
    out[i + 1] = _least_similar(pair_sims[p - 1], keep_n)  # p = 0: the LAST pair (reference)
  for i in range(0, f - 4, 4):
    out[i] = whole
    out[i + 2] = _least_similar(_cosine(x[i], x[i + 2]), keep_n)
  return jnp.stack(out)


def pruned_count(k: float, n: int, *, keep_last: bool = False, keep_first: bool = False) -> int:
  """Tokens a frame at window offset 1–3 keeps under :func:`causal_keep` (static): the
  ``int((1−K)·S)`` least similar of its S ranked tokens (S = N, or N − 1 with ``keep_first``),
  at least 1 with ``keep_last``, plus the unranked first token with ``keep_first``."""
  ranked = n - int(keep_first)
  m = keep_per_frame(k, ranked)
  if keep_last:
    m = max(m, 1)
  return min(m, ranked) + int(keep_first)


def pruned_frame(ref_nd, x_nd, count: int, *, keep_last: bool, keep_first: bool) -> jax.Array:
  """bool [n]: the ``count`` (:func:`pruned_count`) tokens a pruned frame ``x_nd`` [n, d] keeps
  against its reference frame ``ref_nd`` [n, d] — its least similar ranked tokens, the last
  token among them with ``keep_last``, the first token kept unranked with ``keep_first``."""
  n = x_nd.shape[0]
  sim = _cosine(ref_nd, x_nd)
  if keep_last:
    sim = sim.at[n - 1].set(-jnp.inf)  # always among the least similar
  first = int(keep_first)
  ranked = count - first
  keep = _least_similar(sim[first:], ranked) if ranked else jnp.zeros((n - first,), bool)
  return jnp.concatenate([jnp.ones((first,), bool), keep])


def causal_keep(
  x, k: float, *, start: int = 0, keep_last: bool = False, keep_first: bool = False, context=None
):
  """TTM keep mask of consecutive frames of a stream, causal (the paper's pairs).

  Args:
    x: float ``[F, N, d]`` connector outputs of frames ``start .. start + F − 1`` of a stream.
    k: pruning rate K in [0, 1].
    start: stream index of ``x[0]`` (static); windows are frames 4w .. 4w + 3.
    keep_last: also keep every pruned frame's last token (the model's stream-decision slot);
      the frame then keeps ``max(int((1−K)·N), 1)`` tokens in all, that one included.
    keep_first: token 0 has no spatial position (the model's MAP-pooled token): keep it in
      every frame and rank only tokens 1..N−1, which keep ``int((1−K)·(N−1))`` (DyCoke ranks
      spatial patch tokens only; the reference appends its one non-spatial token, LLaVA-OV's
      ``image_newline``, after TTM). :func:`pruned_count` gives a pruned frame's count.
    context: float ``[start mod 4, N, d]``, the earlier frames of ``x[0]``'s window (needed
      when ``start`` is not a window start); None when ``start`` is a multiple of 4.
  Returns:
    bool ``[F, N]``; frames at window offset 0 keep all N, offset 1 vs offset 0, offset 2 vs
    offset 0, offset 3 vs offset 2 keep their least similar tokens.
  Raises:
    ValueError: missing or mis-sized ``context``, or K outside [0, 1].
  """
  x = jnp.asarray(x)
  f, n, _ = x.shape
  count = pruned_count(k, n, keep_last=keep_last, keep_first=keep_first)
  lead = start % WINDOW
  if lead:
    if context is None or np.shape(context)[0] != lead:
      raise ValueError(
        f"start={start} is frame {lead} of its window: pass the window's {lead} earlier frames "
        f"as context ([{lead}, N, d]); got {None if context is None else np.shape(context)}."
      )
    x = jnp.concatenate([jnp.asarray(context, x.dtype), x], axis=0)
  ref_offset = {1: 0, 2: 0, 3: 2}
  out = []
  for j in range(lead, lead + f):
    off = (start - lead + j) % WINDOW
    if off == 0 or count >= n:
      out.append(jnp.ones((n,), bool))
      continue
    ref = x[j - off + ref_offset[off]]
    out.append(pruned_frame(ref, x[j], count, keep_last=keep_last, keep_first=keep_first))
  return jnp.stack(out)


def causal_keep_counts(
  k: float, n: int, num_frames: int, *, keep_last: bool = False, keep_first: bool = False
) -> int:
  """Upper bound on the vision tokens :func:`causal_keep` keeps over ``num_frames`` consecutive
  frames starting anywhere (static): at most ceil(F/4) window starts keep all N."""
  m = pruned_count(k, n, keep_last=keep_last, keep_first=keep_first)
  if m >= n:
    return num_frames * n
  starts = -(-num_frames // WINDOW)
  return starts * n + (num_frames - starts) * m
