"""FastV, DyCoke and ARank as published definitions, on hand-built inputs with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mod_jax.compress import arank, dycoke, fastv


# ------------------------------------------------------------------------------------ ARank
def test_attention_rank_hand_built_maps():
  q = 6
  sink = np.zeros((q, q), np.float32)
  sink[:, 0] = 1.0  # every token attends to the first: rank 1 (row 0's self-attention zeroed)
  self_only = np.eye(q, dtype=np.float32)  # diagonal only: nothing left, rank 0
  uniform = np.tril(np.ones((q, q), np.float32))
  uniform /= uniform.sum(-1, keepdims=True)  # strictly lower part has rank q - 1
  assert arank.attention_rank(sink[None]) == 1.0
  assert arank.attention_rank(self_only[None]) == 0.0
  assert arank.attention_rank(uniform[None]) == q - 1
  assert arank.attention_rank(np.stack([sink, self_only, uniform])) == pytest.approx(q / 3)


def test_attention_rank_ignores_the_non_causal_part():
  q = 5
  upper = np.triu(np.ones((q, q), np.float32), 1)  # only future keys: masked away
  assert arank.attention_rank(upper[None]) == 0.0
  # Last 2 queries over 5 keys (a KV-cache call): query i sits at key i + 3.
  p = np.zeros((1, 2, 5), np.float32)
  p[0, 0, 4] = 1.0  # future key of query 0 (at key 3): masked
  p[0, 1, 4] = 1.0  # query 1's own key: the diagonal, zeroed
  assert arank.attention_rank(p) == 0.0
  p[0, 1, 2] = 1.0
  assert arank.attention_rank(p) == 1.0
  with pytest.raises(ValueError, match="queries"):
    arank.attention_rank(np.zeros((1, 3, 2)))


# ------------------------------------------------------------------------------------ FastV
def test_fastv_keep_one_hot_last_row():
  h, q, k = 2, 3, 8
  image = np.array([0, 1, 1, 1, 1, 0, 0, 0], bool)  # 4 image tokens among 8 keys
  attn = np.full((h, q, k), 0.01, np.float32)
  attn[:, -1, :] = 0.0
  attn[0, -1, 3] = 1.0  # head 0 looks only at key 3
  attn[1, -1, 2] = 0.6  # head 1 splits between keys 2 and 4
  attn[1, -1, 4] = 0.4
  keep = np.asarray(fastv.fastv_keep(attn, image, 0.5))  # keep 2 of 4: keys 3 (0.5), 2 (0.3)
  np.testing.assert_array_equal(keep, [1, 0, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(fastv.fastv_keep(attn, image, 0.0)), np.ones(k, bool))
  np.testing.assert_array_equal(np.asarray(fastv.fastv_keep(attn, image, 1.0)), ~image)
  # Static count under jit, with a traced attention map.
  jitted = jax.jit(lambda a: fastv.fastv_keep(a, image, 0.75))
  assert int(np.asarray(jitted(attn))[image].sum()) == 1
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda a, m: fastv.fastv_keep(a, m, 0.5))(attn, image)


def test_fastv_kept_count():
  assert fastv.kept_count(576, 0.5) == 288
  assert fastv.kept_count(10, 0.5) == 5
  assert fastv.kept_count(10, 0.25) == 8
  with pytest.raises(ValueError, match="R="):
    fastv.kept_count(10, 1.5)


# ------------------------------------------------------------------------------------ DyCoke
def test_ttm_identical_adjacent_frames_keep_the_window_fraction():
  n, d, k = 10, 6, 0.7
  rng = np.random.default_rng(0)
  frame = rng.normal(size=(n, d)).astype(np.float32)
  x = np.broadcast_to(frame, (8, n, d))  # all frames identical
  keep = np.asarray(dycoke.temporal_token_merging(x, k))
  m = int((1 - k) * n)  # 3
  np.testing.assert_array_equal(keep.sum(1), [n, m, m, m, n, m, n, m])
  # The first window is not the last: (1 + 3(1 - K)) / 4 retained.
  assert keep[:4].sum() / (4 * n) == pytest.approx((1 + 3 * (1 - k)) / 4)
  # The last full window keeps its frame 2 whole (reference: range(0, F - 4, 4)).
  assert keep[4:].sum() / (4 * n) == pytest.approx((2 + 2 * (1 - k)) / 4)


def test_ttm_keeps_the_changed_tokens_and_reference_quirks():
  n, d, k = 4, 3, 0.5  # keep 2 per pruned frame
  rng = np.random.default_rng(1)
  base = rng.normal(size=(n, d)).astype(np.float32)
  x = np.stack([base] * 6)
  x[1, 3] = -base[3]  # frame 1 differs from frame 0 at token 3
  x[1, 0] = -base[0]  # and at token 0
  x[2, 2] = -base[2]  # frame 2 differs from frame 0 at token 2
  x[3] = x[2]
  x[3, 1:3] *= -1  # frame 3 differs from frame 2 at tokens 1, 2
  keep = np.asarray(dycoke.temporal_token_merging(x[:5], k))  # odd F: last frame dropped
  assert not keep[4].any()
  # Reference: frame 3 (pair (2, 3)) is pruned by the similarity of the PREVIOUS pair (0, 1),
  # whose least similar tokens are 0 and 3; frame 1 by the LAST pair's (2, 3): tokens 1, 2.
  np.testing.assert_array_equal(keep[3], [1, 0, 0, 1])
  np.testing.assert_array_equal(keep[1], [0, 1, 1, 0])
  # Frame 4 exists after window 0, so frame 2 is pruned against frame 0 (token 2, then ties).
  np.testing.assert_array_equal(keep[2], [1, 0, 1, 0])
  assert keep[0].all()
  # With F = 4 the window is the last one: the reference keeps frame 2 whole.
  assert np.asarray(dycoke.temporal_token_merging(x[:4], k))[2].all()
  # The causal form compares frame 1 with 0, frame 2 with 0, frame 3 with 2.
  causal = np.asarray(dycoke.causal_keep(x[:4], k))
  np.testing.assert_array_equal(causal[1], [1, 0, 0, 1])
  assert causal[2][2] and causal[2].sum() == 2
  np.testing.assert_array_equal(causal[3], [0, 1, 1, 0])


def test_causal_ttm_in_pieces_equals_whole_and_keep_last():
  n, d, k = 10, 4, 0.7
  x = np.random.default_rng(2).normal(size=(9, n, d)).astype(np.float32)
  whole = np.asarray(dycoke.causal_keep(x, k, keep_last=True))
  pieces = [
    np.asarray(
      dycoke.causal_keep(x[i : i + 1], k, start=i, keep_last=True, context=x[i - i % 4 : i])
    )
    for i in range(9)
  ]
  np.testing.assert_array_equal(np.concatenate(pieces), whole)
  assert whole[:, -1].all()  # the stream-decision slot is always kept
  np.testing.assert_array_equal(whole.sum(1), [n, 3, 3, 3, n, 3, 3, 3, n])
  assert dycoke.causal_keep_counts(k, n, 9, keep_last=True) == whole.sum()
  assert dycoke.causal_keep_counts(k, n, 1) == n  # a lone frame may start a window
  with pytest.raises(ValueError, match="context"):
    dycoke.causal_keep(x[1:2], k, start=1)


def test_causal_ttm_keep_first_ranks_only_the_spatial_tokens():
  """keep_first: token 0 (no spatial position) is kept in every frame even when it is the most
  similar token, and the K rate applies to tokens 1..N−1: int((1−K)·(N−1)) of them are kept."""
  n, d, k = 5, 3, 0.5
  ref = np.eye(d, dtype=np.float32)[[0, 1, 1, 1, 1]]  # token 0 = e0, grid tokens = e1
  x = np.stack([ref] * 4)
  # frame 1: grid token j has cosine c_j to the reference; token 0 stays identical (cosine 1)
  for j, c in zip(range(1, n), [0.9, 0.1, 0.5, 0.99]):
    x[1, j] = [0.0, c, np.sqrt(1 - c * c)]
  keep = np.asarray(dycoke.causal_keep(x, k, keep_first=True))
  # int(0.5 · 4) = 2 least similar grid tokens (2: 0.1, 3: 0.5) + token 0
  np.testing.assert_array_equal(keep[1], [1, 0, 1, 1, 0])
  plain = np.asarray(dycoke.causal_keep(x, k))  # without: token 0 competes and loses
  np.testing.assert_array_equal(plain[1], [0, 0, 1, 1, 0])
  both = np.asarray(dycoke.causal_keep(x, k, keep_first=True, keep_last=True))
  np.testing.assert_array_equal(both[1], [1, 0, 1, 0, 1])  # last + least similar (2) + token 0
  assert dycoke.pruned_count(k, n, keep_first=True) == 3 == keep[1:].sum(1).max()
  assert dycoke.pruned_count(1.0, n, keep_first=True, keep_last=True) == 2
  assert dycoke.causal_keep_counts(k, n, 4, keep_first=True) == n + 3 * 3 == keep.sum()


def test_ttm_k_zero_keeps_everything():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 5, 3)), jnp.float32)
  assert bool(jnp.all(dycoke.temporal_token_merging(x, 0.0)))
  assert bool(jnp.all(dycoke.causal_keep(x, 0.0, keep_last=True)))
