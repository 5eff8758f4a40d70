"""γ-MoD sequence routing (mod.sequence_routed_block): masked tokens are never routed, the static
capacity never overflows silently, the shared router learns (BCE aux on), and the inference
threshold is causal: streaming equals the teacher-forced pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.infer import streaming
from mod_jax.model import mod, rows
from mod_jax.model.video_llm import VideoLLM
from mod_jax.train import step
from tests.helpers import synthetic_batch
from tests.test_infer_streaming import _layout, _stream, run_stream


def _plus_one(seen):
  def block(x, seq):
    seen.append(x.shape)
    return x + 1.0

  return block


def _logits(p):
  """Router logits [1, l, 2] whose P(process) is ``p`` (logit_0 = 0, logit_1 = log(p/(1-p)))."""
  p = np.asarray(p, np.float32)
  return jnp.stack([jnp.zeros_like(p), jnp.log(p / (1 - p))], -1)[None]


def _row(l, seg=None):
  seg = np.ones(l, np.int32) if seg is None else np.asarray(seg, np.int32)
  return rows.TokenInfo(jnp.arange(l, dtype=jnp.int32)[None], jnp.asarray(seg)[None])


def test_masked_tokens_are_never_routed():
  #           masked (instruction / query)   routable (vision, answer)         padding
  p = [0.01, 0.02, 0.03, 0.04, 0.9, 0.2, 0.8, 0.3, 0.1, 0.7, 0.99]
  routable = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], bool)
  seg = [1] * 10 + [0]
  l, d = len(p), 3
  x = jnp.zeros((1, l, d))
  seen = []
  y, aux = mod.sequence_routed_block(
    _plus_one(seen),
    x,
    _row(l, seg),
    capacity=6,
    logits_bl2=_logits(p),
    routable_bl=jnp.asarray(routable)[None],
    weighting="none",
  )
  processed = np.asarray(y[0, :, 0]) == 1.0
  # The 4 masked tokens despite their lowest P, then the top 2 routable (0.9, 0.8); padding never.
  np.testing.assert_array_equal(processed, [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0])
  assert seen == [(1, 6, d)]
  assert int(aux["forced_overflow"][0]) == 0 and int(aux["overflow"][0]) == 0
  assert float(aux["router_ce_count"]) == 10
  # Inference: a per-token threshold; masked tokens still always processed.
  y, aux = mod.sequence_routed_block(
    _plus_one(seen),
    x,
    _row(l, seg),
    capacity=6,
    logits_bl2=_logits(p),
    routable_bl=jnp.asarray(routable)[None],
    weighting="none",
    threshold=0.5,
  )
  np.testing.assert_array_equal(np.asarray(y[0, :, 0]) == 1.0, [1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0])
  assert "router_ce_sum" not in aux


def test_capacity_never_overflows_silently():
  p = [0.5, 0.1, 0.9, 0.3, 0.2, 0.99, 0.98]
  routable = jnp.asarray([[0, 0, 0, 0, 0, 1, 1]], bool)  # 5 masked tokens, capacity 3
  seen = []
  y, aux = mod.sequence_routed_block(
    _plus_one(seen),
    jnp.zeros((1, 7, 2)),
    _row(7),
    capacity=3,
    logits_bl2=_logits(p),
    routable_bl=routable,
    weighting="none",
  )
  processed = np.asarray(y[0, :, 0]) == 1.0
  np.testing.assert_array_equal(processed, [1, 0, 1, 1, 0, 0, 0])  # masked, by P: .9, .5, .3
  assert seen == [(1, 3, 2)]  # the block never sees more than C
  assert int(aux["forced_overflow"][0]) == 2  # the two masked tokens that did not fit
  assert int(aux["overflow"][0]) == 2
  with pytest.raises(ValueError, match="capacity"):
    mod.sequence_routed_block(
      _plus_one([]),
      jnp.zeros((1, 7, 2)),
      _row(7),
      capacity=8,
      logits_bl2=_logits(p),
      routable_bl=routable,
      weighting="none",
    )


def _gamma_config():
  c = tiny.get_config()
  m = c.model.mod
  m.routing = "sequence"
  m.keep_ratio = 0.5
  m.router_weighting = "sigmoid"
  m.router_aux_loss_weight = 0.01
  return c


def test_shared_router_learns_from_loss_and_aux():
  c = _gamma_config()
  model = VideoLLM(c.model, rngs=nnx.Rngs(0))
  assert model.llm.shared_router is not None and not len(model.llm.routers)
  graphdef, params = nnx.split(model, nnx.Param)
  batch = synthetic_batch(c, 2)
  (loss, sums), grads = jax.value_and_grad(
    lambda p: step.loss_fn(p, graphdef, batch, jax.random.key(0), stream_loss_weight=1.0),
    has_aux=True,
  )(params)
  assert float(sums["router_aux_loss"]) > 0
  g = np.asarray(grads["llm"]["shared_router"]["kernel"][...])
  assert np.abs(g).max() > 0
  assert 0 < float(sums["router/layer_1/processed"]) < 1  # C = L/2 of a partly padded row
  assert float(sums["router/layer_1/forced_overflow"]) == 0


def test_inference_threshold_streams_like_the_full_pass():
  """At inference sequence routing is a per-token threshold, so feeding the stream chunk by
  chunk gives the teacher-forced logits (top-C over the row could not be streamed)."""
  c = _gamma_config()
  model = VideoLLM(c.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  events = _stream(c, frames=4)
  batch = _layout(events, c.model.tokens_per_frame)

  def full(p, b):
    m = nnx.merge(graphdef, p)
    m.eval()
    return m(b)

  _, frame_full, aux = jax.device_get(jax.jit(full)(params, batch))
  assert 0 < float(aux["layer_1"]["processed_fraction"]) < 1  # the threshold does route
  session = streaming.Session(graphdef, params, c.model, max_frames=16, max_text=48)
  frames, _ = run_stream(session, events)
  np.testing.assert_allclose(frames, frame_full[0], atol=1e-4, rtol=0)
