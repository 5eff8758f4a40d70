"""MoD routing (docs/design.md §1.1): per-frame top-k, text always processed, static compact length,
router gradients, and r = 1 equal to the dense model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.model import mod, rows
from mod_jax.model.video_llm import VideoLLM
from tests.helpers import frame_scores_router, ordered_row, synthetic_batch


def _plus_one_block(seen):
  """A stand-in decoder layer: adds 1 to every token it processes, records what it saw."""

  def block(x, seq):
    seen.append((x.shape, np.asarray(seq.positions), np.asarray(seq.segment_ids)))
    return x + 1.0

  return block


def test_top_k_per_frame_processed_and_text_always():
  b, t, f, n, d, k = 2, 3, 2, 4, 5, 1
  scores = jnp.array(
    [[[0.1, 0.9, 0.3, 0.2], [0.4, 0.0, 0.8, 0.7]], [[0.5, 0.1, 0.2, 0.3], [0.0, 0.1, 0.2, 0.9]]]
  )
  x = jnp.zeros((b, t + f * n, d))
  pos = jnp.broadcast_to(jnp.arange(t + f * n, dtype=jnp.int32) + 100, (b, t + f * n))
  seg = jnp.ones((b, t + f * n), jnp.int32)
  seen = []
  x_s, seq, layout = ordered_row(x, pos, seg, t, n)
  y, aux = mod.routed_block(
    _plus_one_block(seen),
    x_s,
    seq,
    layout,
    k=k,
    selection="learned",
    weighting="ste",
    router=frame_scores_router(scores, layout),
  )
  processed = np.asarray(rows.take(y, layout.inverse)[..., 0]) == 1.0
  expected = np.zeros((b, t + f * n), bool)
  expected[:, :t] = True  # text always processed
  for bi, frames in enumerate([[1, 2], [0, 3]]):  # argmax per frame
    for fi, j in enumerate(frames):
      expected[bi, t + fi * n + j] = True
  np.testing.assert_array_equal(processed, expected)
  # The block ran on the compact sequence C = T + F*k, with the ORIGINAL positions.
  ((shape, seen_pos, _),) = seen
  assert shape == (b, t + f * k, d)
  np.testing.assert_array_equal(seen_pos[0], [100, 101, 102, 100 + t + 1, 100 + t + n + 2])
  np.testing.assert_array_equal(np.asarray(aux["kept_index"])[:, :, 0], [[1, 2], [0, 3]])


@pytest.mark.parametrize("k", [0, 2, 3])
def test_keeps_exactly_k_per_frame(k):
  b, t, f, n, d = 1, 2, 3, 5, 4
  scores = jax.random.normal(jax.random.key(0), (b, f, n))
  x = jnp.zeros((b, t + f * n, d))
  pos = jnp.arange(t + f * n, dtype=jnp.int32)[None]
  x_s, seq, layout = ordered_row(x, pos, jnp.ones_like(pos), t, n)
  y, _ = mod.routed_block(
    _plus_one_block([]),
    x_s,
    seq,
    layout,
    k=k,
    selection="learned",
    weighting="ste",
    router=frame_scores_router(scores, layout),
  )
  y = rows.take(y, layout.inverse)
  vis = np.asarray(y[0, t:, 0]).reshape(f, n)
  assert (vis.sum(axis=1) == k).all()
  if k:
    top = np.argsort(-np.asarray(scores[0]), axis=1)[:, :k]
    for fi in range(f):
      assert set(np.flatnonzero(vis[fi])) == set(top[fi])
  assert (np.asarray(y[0, :t, 0]) == 1).all()


def test_compact_length_is_static_in_model():
  """Inside a MoD layer the decoder layer runs on T_cap + F_cap*k tokens at trace time."""
  c = tiny.get_config()
  c.model.attention = "xla"  # materialises the [C, C] scores this test looks for
  model = VideoLLM(c.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(c, 2)
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda p, bt: nnx.merge(graphdef, p)(bt))(params, batch)
  _, _, aux = jax.eval_shape(lambda p, bt: nnx.merge(graphdef, p)(bt), params, batch)
  k = mod.keep_count(c.model.mod.keep_ratio, c.model.tokens_per_frame)
  assert k == 2
  expected = c.data.max_text + c.data.max_frames * k
  assert set(aux) == {"layer_1", "layer_3"}
  assert all(a["kept_index"].shape == (2, c.data.max_frames, k) for a in aux.values())
  # The attention logits of routed layers really have the compact shape [.., C, C].
  full = c.data.max_text + c.data.max_frames * c.model.tokens_per_frame
  text = str(jaxpr)
  assert f"{expected},{expected}]" in text.replace(" ", "")
  assert f"{full},{full}]" in text.replace(" ", "")


def _logits(config, batch, seed=0):
  model = VideoLLM(config.model, rngs=nnx.Rngs(seed))
  return model(batch)


def test_keep_ratio_one_equals_dense():
  dense_cfg = tiny.get_config("dense")
  mod_cfg = tiny.get_config()
  mod_cfg.model.mod.keep_ratio = 1.0
  mod_cfg.model.mod.insertion = "all"
  batch = synthetic_batch(dense_cfg, 2)
  t_d, f_d, _ = _logits(dense_cfg, batch)
  t_m, f_m, aux = _logits(mod_cfg, batch)
  assert set(aux) == {f"layer_{i}" for i in range(mod_cfg.model.n_layers)}  # routing really ran
  np.testing.assert_allclose(t_m, t_d, atol=1e-5, rtol=0)
  np.testing.assert_allclose(f_m, f_d, atol=1e-5, rtol=0)


def test_routing_changes_vision_but_is_deterministic():
  c = tiny.get_config()
  batch = synthetic_batch(c, 2)
  a = _logits(c, batch)[1]
  b = _logits(c, batch)[1]
  d = _logits(tiny.get_config("dense"), batch)[1]
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["ste", "sigmoid", "score"])
def test_router_receives_gradient(weighting):
  c = tiny.get_config()
  c.model.mod.router_weighting = weighting
  model = VideoLLM(c.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(c, 2)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    tl, fl, _ = nnx.merge(graphdef, p)(batch)
    return jnp.mean(tl**2) + jnp.mean(fl**2)

  grads = jax.grad(loss)(params)
  # Layer 1 routes; its kept tokens feed layers 2-3, so its router must learn from the loss.
  # (Layer 3 is the last layer: its router only matters via the frame-end token it keeps.)
  for name in ("1",):
    g = np.asarray(grads["llm"]["routers"][name]["kernel"][...])
    assert np.abs(g).max() > 0, f"router {name} got zero gradient with {weighting}"


def test_insertion_strategies():
  assert mod.mod_layer_indices("interleaved", 8) == (1, 3, 5, 7)
  assert mod.mod_layer_indices("all_deep", 8) == (4, 5, 6, 7)
  assert mod.mod_layer_indices("interleaved_deep", 8) == (5, 7)
  assert mod.mod_layer_indices("all", 3) == (0, 1, 2)
  assert mod.mod_layer_indices([6, 2], 8) == (2, 6)
  assert mod.mod_layer_indices("none", 8) == ()


def test_uniform_and_random_selection():
  idx = mod.select(None, 2, 10, "uniform", (1, 2), None)
  np.testing.assert_array_equal(np.asarray(idx), [[[2, 7], [2, 7]]])
  r1 = mod.select(None, 3, 10, "random", (2, 4), jax.random.key(0))
  r2 = mod.select(None, 3, 10, "random", (2, 4), jax.random.key(1))
  assert r1.shape == (2, 4, 3) and not np.array_equal(r1, r2)
  assert (np.diff(np.asarray(r1), axis=-1) > 0).all()
