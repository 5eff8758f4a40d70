"""The MoD design space (docs/design.md §1.1): insertion and selection strategies, keep schedules, the
EarlyExit / LayerSkip baselines as k = 0 routing, and the auxiliary router loss.

Oracle: a masked dense computation. A routed layer equals the dense decoder layer run on the whole
row with the skipped vision tokens removed as keys (segment id 0), keeping its outputs only for
text and kept tokens; skipped tokens keep their input. Kept tokens are hand-computed (uniform
stride, numpy top-k of the LayerExpert scores).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.config import ConfigError, validate
from mod_jax.model import mod
from mod_jax.model.factory import check_model_config
from mod_jax.model.llm import DecoderLayer
from mod_jax.model.video_llm import VideoLLM, frame_token_layout
from mod_jax.train.step import loss_fn
from tests.helpers import frame_scores_router, ordered_row, synthetic_batch

N_LAYERS = 4  # tiny config
UNIFORM_2_OF_10 = (2, 7)  # floor((j + 0.5) * 10 / 2), j = 0, 1


def _config(**mod_settings):
  c = tiny.get_config()
  c.model.mod.update(mod_settings)
  validate(c)
  return c


def _model_and_batch(c, seed=0):
  return VideoLLM(c.model, rngs=nnx.Rngs(seed)), synthetic_batch(c, 2, seed=seed)


def _row_inputs(model, batch):
  """Embedded row x [b, l, d], positions, segment ids, and the text/vision split."""
  n = model.tokens_per_frame
  text = model.llm.embed_tokens(jnp.asarray(batch["text_tokens"]))
  vis = model.embed_frames(jnp.asarray(batch["frames"]))
  b, t, d = text.shape
  f = vis.shape[1]
  x = jnp.concatenate([text, vis.reshape(b, f * n, d)], axis=1)
  v_pos, v_seg = frame_token_layout(
    jnp.asarray(batch["frame_positions"]), jnp.asarray(batch["frame_segment_ids"]), n
  )
  pos = jnp.concatenate([jnp.asarray(batch["text_positions"]), v_pos], axis=1)
  seg = jnp.concatenate([jnp.asarray(batch["text_segment_ids"]), v_seg], axis=1)
  return x, pos, seg, t, f


def _oracle_logits(model, batch, kept_fn):
  """Masked-dense forward. ``kept_fn(layer, x_vis [b, f, n, d]) -> bool [b, f, n]`` or None."""
  x, pos, seg, t, f = _row_inputs(model, batch)
  b, _, d = x.shape
  n = model.tokens_per_frame
  for i in range(model.llm.n_layers):
    layer = model.llm.layer(i)
    kept = kept_fn(i, np.asarray(x[:, t:]).reshape(b, f, n, d))
    if kept is None:
      x = layer(x, pos, seg)
      continue
    keep_l = np.concatenate([np.ones((b, t), bool), kept.reshape(b, f * n)], axis=1)
    y = layer(x, pos, jnp.where(keep_l, seg, 0))
    x = jnp.where(keep_l[..., None], y, x)
  h = model.llm.final_norm(x)
  frame_end = h[:, t:].reshape(b, f, n, d)[:, :, -1]
  return model.llm.logits(h[:, :t]), model.llm.logits(frame_end)


def _assert_logits_match(got, want, batch):
  """Compare at real (non-padding) text slots and frames: padding queries attend to nothing."""
  text_ok = np.asarray(batch["text_segment_ids"]) != 0
  frame_ok = np.asarray(batch["frame_segment_ids"]) != 0
  np.testing.assert_allclose(
    np.asarray(got[0])[text_ok], np.asarray(want[0])[text_ok], atol=2e-5, rtol=0
  )
  np.testing.assert_allclose(
    np.asarray(got[1])[frame_ok], np.asarray(want[1])[frame_ok], atol=2e-5, rtol=0
  )


def _uniform_kept(layers, k_idx):
  def kept_fn(i, x_vis):
    if i not in layers:
      return None
    b, f, n, _ = x_vis.shape
    kept = np.zeros((b, f, n), bool)
    kept[..., list(k_idx)] = True
    return kept

  return kept_fn


# ------------------------------------------------------------------ insertion strategies
@pytest.mark.parametrize(
  "insertion,layers",
  [
    ("all", (0, 1, 2, 3)),
    ("all_deep", (2, 3)),
    ("interleaved", (1, 3)),
    ("interleaved_deep", (3,)),
    ([0, 2], (0, 2)),
  ],
)
def test_insertion_routes_exactly_its_layers(insertion, layers, monkeypatch):
  """Each layer sees the tokens it should: routed layers T + F·k tokens, with the kept vision
  tokens at their original positions; the others the whole row. Output equals the oracle."""
  c = _config(insertion=insertion, selection="uniform")
  c.model.scan_layers = False  # the recording below needs concrete values, not scan tracers
  model, batch = _model_and_batch(c)
  seen = []  # positions per layer: the unrolled stack calls layers 0, 1, ... in order
  original = DecoderLayer.__call__

  def recording(self, x, positions, segment_ids, rng=None, **kw):
    seen.append(np.asarray(positions))
    return original(self, x, positions, segment_ids, rng, **kw)

  monkeypatch.setattr(DecoderLayer, "__call__", recording)
  got = model(batch)
  monkeypatch.setattr(DecoderLayer, "__call__", original)

  t, f, n = c.data.max_text, c.data.max_frames, c.model.tokens_per_frame
  fpos = np.asarray(batch["frame_positions"])
  assert len(seen) == N_LAYERS
  for i in range(N_LAYERS):
    if i in layers:  # text slots, then per frame the tokens at offsets 2 and 7
      kept_pos = (fpos[:, :, None] + np.array(UNIFORM_2_OF_10)).reshape(2, -1)
      want = np.concatenate([batch["text_positions"], kept_pos], axis=1)
    else:
      want = np.concatenate(
        [batch["text_positions"], (fpos[:, :, None] + np.arange(n)).reshape(2, -1)], axis=1
      )
    # The layer sees the row in stream order: the same positions, ascending within the sample.
    np.testing.assert_array_equal(np.sort(seen[i]), np.sort(want), err_msg=f"layer {i}")
    real = seen[i][:, : (np.asarray(batch["text_segment_ids"]) != 0).sum(1).min()]
    assert (np.diff(real, axis=1) > 0).all(), f"layer {i} is not in stream order"
  assert seen[layers[0]].shape[1] == t + f * 2
  _assert_logits_match(
    got, _oracle_logits(model, batch, _uniform_kept(layers, UNIFORM_2_OF_10)), batch
  )


# ------------------------------------------------------------------ selection strategies
@pytest.mark.parametrize(
  "n,k,want",
  [(10, 1, [5]), (10, 2, [2, 7]), (10, 3, [1, 5, 8]), (5, 2, [1, 3]), (4, 4, [0, 1, 2, 3])],
)
def test_uniform_selection_is_strided(n, k, want):
  idx = np.asarray(mod.select(None, k, n, "uniform", (2, 3), None))
  assert idx.shape == (2, 3, k)
  assert (idx == np.array(want)).all()


def test_learned_selection_equals_masked_dense_oracle():
  """Learned routing on real router weights: kept = numpy top-k of x·w + b per frame."""
  c = _config(insertion="interleaved", keep_ratio=0.3)
  model, batch = _model_and_batch(c)
  k = 3

  def kept_fn(i, x_vis):
    if i not in (1, 3):
      return None
    r = model.llm.router(i)
    scores = x_vis @ np.asarray(r.kernel[...]) + float(r.bias[...])  # [b, f, n]
    top = np.argsort(-scores, axis=-1)[..., :k]
    kept = np.zeros(scores.shape, bool)
    np.put_along_axis(kept, top, True, axis=-1)
    return kept

  _assert_logits_match(model(batch), _oracle_logits(model, batch, kept_fn), batch)


def test_learned_selection_follows_router_scores():
  """A LayerExpert reading feature 0 keeps, in each frame, the k tokens with the largest x[0]."""
  b, t, f, n, d, k = 1, 2, 2, 5, 3, 2
  router = mod.LayerExpert(d, rngs=nnx.Rngs(0))
  router.kernel[...] = jnp.array([1.0, 0.0, 0.0])
  router.bias[...] = jnp.array(0.0)
  x = np.zeros((b, t + f * n, d), np.float32)
  x[0, t:, 0] = [
    0.3,
    0.9,
    0.1,
    0.5,
    0.2,  # frame 0: keep 1, 3
    0.8,
    0.0,
    0.7,
    0.1,
    0.6,
  ]  # frame 1: keep 0, 2
  pos = jnp.arange(t + f * n, dtype=jnp.int32)[None]
  x_s, seq, layout = ordered_row(x, pos, jnp.ones_like(pos), t, n)
  _, aux = mod.routed_block(
    lambda xc, sc: xc, x_s, seq, layout, k=k, selection="learned", weighting="ste", router=router
  )
  np.testing.assert_array_equal(np.asarray(aux["kept_index"]), [[[1, 3], [0, 2]]])


def test_random_selection_is_uniform_and_fresh():
  """Random keeps k distinct tokens per frame, each slot with probability k/n, new draws per
  key (the model folds the step rng with the layer index)."""
  n, k = 10, 2
  idx = np.asarray(mod.select(None, k, n, "random", (64, 64), jax.random.key(3)))
  assert (np.diff(idx, axis=-1) > 0).all() and idx.min() >= 0 and idx.max() < n
  freq = np.bincount(idx.ravel(), minlength=n) / idx[..., 0].size
  np.testing.assert_allclose(freq, k / n, atol=0.02)  # 4096 frames: std 0.006
  other = np.asarray(mod.select(None, k, n, "random", (64, 64), jax.random.key(4)))
  assert (other != idx).any(axis=-1).mean() > 0.9


def test_random_selection_in_model_equals_oracle_with_its_draw():
  c = _config(insertion="interleaved", selection="random")
  model, batch = _model_and_batch(c)
  rng = jax.random.key(7)
  t_logits, f_logits, aux = model(batch, rng=rng)
  draws = {i: np.asarray(aux[f"layer_{i}"]["kept_index"]) for i in (1, 3)}
  assert not np.array_equal(draws[1], draws[3])  # a fresh draw per layer

  def kept_fn(i, x_vis):
    if i not in draws:
      return None
    kept = np.zeros(x_vis.shape[:3], bool)
    np.put_along_axis(kept, draws[i], True, axis=-1)
    return kept

  _assert_logits_match((t_logits, f_logits), _oracle_logits(model, batch, kept_fn), batch)


# ------------------------------------------------------------------ baselines and schedules
def test_early_exit_is_k0_routing_of_the_deep_layers():
  """EarlyExit(E=1): vision tokens are processed by layer 0 only; text by every layer, attending
  to no vision token from layer 1 on."""
  settings = mod.baseline_routing("early_exit", N_LAYERS, exit_layer=1)
  c = _config(**settings)
  assert mod.RoutingPlan.from_config(c.model).keep == (None, 0, 0, 0)
  model, batch = _model_and_batch(c)
  _assert_logits_match(
    model(batch), _oracle_logits(model, batch, _uniform_kept({1, 2, 3}, ())), batch
  )


def test_layer_skip_is_k0_routing_of_interleaved_layers():
  c = _config(**mod.baseline_routing("layer_skip", N_LAYERS))
  assert mod.RoutingPlan.from_config(c.model).keep == (None, 0, None, 0)
  model, batch = _model_and_batch(c)
  assert not model.llm.routers  # k = 0 layers need no router
  _assert_logits_match(model(batch), _oracle_logits(model, batch, _uniform_kept({1, 3}, ())), batch)


def test_full_computation_baseline_is_dense():
  assert mod.baseline_routing("full", N_LAYERS)["insertion"] == "none"
  c = _config(**mod.baseline_routing("full", N_LAYERS))
  model, batch = _model_and_batch(c)
  _assert_logits_match(model(batch), _oracle_logits(model, batch, lambda i, xv: None), batch)


def test_keep_schedule_per_layer():
  """One r per routed layer; a schedule of ones equals the dense model."""
  c = _config(insertion="all", keep_ratio=[0.1, 0.3, 0.0, 1.0])
  assert mod.RoutingPlan.from_config(c.model).keep == (1, 3, 0, 10)
  ones = _config(insertion="interleaved", keep_ratio=[1.0, 1.0])
  model, batch = _model_and_batch(ones)
  _, _, aux = model(batch)
  assert set(aux) == {"layer_1", "layer_3"}  # routing ran
  _assert_logits_match(model(batch), _oracle_logits(model, batch, lambda i, xv: None), batch)


@pytest.mark.parametrize(
  "settings,match",
  [
    (dict(insertion="interleaved", keep_ratio=[0.2]), r"2 layers \[1, 3\]"),
    (dict(insertion="all", keep_ratio=[0.2, 0.2, 1.5, 0.2]), r"\[1.5\] are outside"),
    (dict(keep_ratio=0.0), r"keep_ratio=0.0 must be in \(0, 1\].*baseline_routing"),
    (dict(router_aux_loss_weight=-1.0), "router_aux_loss_weight=-1.0"),
  ],
)
def test_bad_routing_settings_are_named(settings, match):
  c = tiny.get_config()
  c.model.mod.update(settings)
  with pytest.raises(ConfigError, match=match):
    validate(c)
    check_model_config(c.model)


def test_baseline_routing_rejects_bad_input():
  with pytest.raises(ValueError, match="exit_layer=4"):
    mod.baseline_routing("early_exit", 4, exit_layer=4)
  with pytest.raises(ValueError, match="unknown baseline 'skip'"):
    mod.baseline_routing("skip", 4)


# ------------------------------------------------------------------ auxiliary router loss
def test_router_bce_is_bce_of_logits_against_membership():
  b, t, f, n, d, k = 1, 1, 3, 4, 2, 1
  scores = np.array([[[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, -2.0, 1.0], [1.0, 1.0, 1.0, 9.0]]])
  x = jnp.zeros((b, t + f * n, d))
  pos = jnp.arange(t + f * n, dtype=jnp.int32)[None]
  seg = jnp.array([[1] + [1] * (2 * n) + [0] * n])  # frame 2 is padding: not counted
  x_s, seq, layout = ordered_row(x, pos, seg, t, n)
  _, aux = mod.routed_block(
    lambda xc, sc: xc,
    x_s,
    seq,
    layout,
    k=k,
    selection="learned",
    weighting="ste",
    router=frame_scores_router(scores, layout),
  )
  member = np.zeros((f, n))
  member[0, 0] = member[1, 1] = 1.0  # argmax of frames 0 and 1
  s = scores[0, :2]
  bce = -(
    member[:2] * np.log(1 / (1 + np.exp(-s))) + (1 - member[:2]) * np.log(1 - 1 / (1 + np.exp(-s)))
  )
  np.testing.assert_allclose(
    float(aux["router_bce_sum"] / aux["router_bce_count"]), bce.mean(), rtol=1e-5
  )


def test_aux_loss_weight_adds_to_the_training_loss():
  c = _config(router_aux_loss_weight=0.5)
  model, batch = _model_and_batch(c)
  graphdef, params = nnx.split(model, nnx.Param)
  loss, metrics = loss_fn(
    params, graphdef, batch, jax.random.key(0), stream_loss_weight=1.0, router_aux_weight=0.5
  )
  _, _, aux = model(batch)
  bce_sum = sum(
    float(aux[f"layer_{i}"]["router_bce_sum"] / aux[f"layer_{i}"]["router_bce_count"])
    for i in (1, 3)
  )
  assert bce_sum > 0
  np.testing.assert_allclose(float(metrics["router_aux_loss"]), bce_sum, rtol=1e-5)
  c0 = _config()
  loss0, _ = loss_fn(
    params,
    nnx.split(VideoLLM(c0.model, rngs=nnx.Rngs(0)), nnx.Param)[0],
    batch,
    jax.random.key(0),
    stream_loss_weight=1.0,
  )
  np.testing.assert_allclose(float(loss) - float(loss0), 0.5 * bce_sum, rtol=1e-4)
