"""FastV and DyCoke on a tiny trained-shape model: zero rates are the dense model exactly,
the pruned layers see the static compact length."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.compress import apply
from mod_jax.model.video_llm import VideoLLM
from tests.test_infer_streaming import _layout, _stream

ATOL = 1e-4


@functools.cache
def _dense(scan_layers=True):
  cfg = tiny.get_config("dense")
  cfg.model.scan_layers = scan_layers
  model = VideoLLM(cfg.model, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  return cfg, graphdef, params


@functools.partial(jax.jit, static_argnums=2)
def _full(params, batch, graphdef):
  return nnx.merge(graphdef, params)(batch)


def _batch(cfg, frames=6, seed=0):
  return _layout(_stream(cfg, seed=seed, frames=frames), cfg.model.tokens_per_frame)


@pytest.mark.parametrize("spec", ["fastv:K=2,R=0", "dycoke:K=0,P=0,L=2"])
def test_zero_rates_give_exactly_the_dense_logits(spec):
  """Bit for bit against the dense model run layer by layer (compressed models run unscanned;
  the scanned stack is a different XLA program and differs by ~1e-6)."""
  cfg, graphdef, params = _dense(scan_layers=False)
  batch = _batch(cfg)
  dense = jax.device_get(_full(params, batch, graphdef)[:2])
  gd = apply.attach(graphdef, params, apply.parse(spec), cfg.model)
  text, frame, aux = jax.device_get(_full(params, batch, gd))
  np.testing.assert_array_equal(text, dense[0])
  np.testing.assert_array_equal(frame, dense[1])
  assert not aux  # nothing pruned, no routed layer


def test_fastv_prunes_after_layer_k_and_changes_the_output():
  cfg, graphdef, params = _dense()
  batch = _batch(cfg)
  seen = []
  model = nnx.merge(
    apply.attach(graphdef, params, apply.parse("fastv:K=2,R=0.5"), cfg.model), params
  )
  for i, layer in enumerate(model.llm.layers):  # record the sequence length each layer sees
    call = type(layer).__call__

    def spy(self, x, *a, _i=i, _call=call, **kw):
      seen.append((_i, x.shape[1]))
      return _call(self, x, *a, **kw)

    layer.__class__ = type(f"Spy{i}", (type(layer),), {"__call__": spy})
  text, frame, _ = jax.jit(lambda b: model(b))(batch)  # shapes are recorded while tracing
  t, f, n = batch["text_tokens"].shape[1], batch["frames"].shape[1], cfg.model.tokens_per_frame
  assert seen == [(0, t + f * n), (1, t + f * n), (2, t + f * 5), (3, t + f * 5)]
  dense = _full(params, batch, graphdef)
  assert np.abs(np.asarray(frame) - np.asarray(dense[1])).max() > 1e-3


def test_parse_and_check_errors():
  assert str(apply.parse("fastv:K=3,R=0.25")) == "fastv:K=3,R=0.25"
  assert apply.parse("dycoke") == apply.Compression("dycoke", 0.7, p=0.7, l=3)
  assert apply.parse("none") is None
  for bad, match in [
    ("fastvv:K=2", "unknown method"),
    ("fastv:K=1.5", "integer"),
    ("fastv:R=2", "R="),
    ("dycoke:K=0.5,Q=1", "bad setting"),
    ("dycoke:P=x", "not a number"),
  ]:
    with pytest.raises(ValueError, match=match):
      apply.parse(bad)
  mod_cfg = tiny.get_config("").model  # interleaved MoD: layers 1, 3 routed
  with pytest.raises(ValueError, match="already route"):
    apply.check(apply.parse("fastv:K=2,R=0.5"), mod_cfg)
  with pytest.raises(ValueError, match="dense layers"):
    apply.check(apply.parse("dycoke:K=0.7,P=0.7,L=2"), mod_cfg)
  apply.check(apply.parse("dycoke:K=0.7,P=0,L=2"), mod_cfg)  # TTM alone runs on MoD models
  mod_cfg.mod.routing = "sequence"
  with pytest.raises(ValueError, match="sequence-routed"):
    apply.check(apply.parse("dycoke:K=0.7,P=0,L=2"), mod_cfg)


def test_arank_maps_are_the_layers_attention_and_recommendation():
  """``mod-jax arank``'s maps reproduce the layer's own attention output (probs · V through the
  output projection = the attention kernel's result); the recommendation takes the n/2 lowest."""
  from mod_jax.compress import arank_main
  from mod_jax.model import rows
  from mod_jax.model.attention import rope_tables

  cfg, graphdef, params = _dense()
  model = nnx.merge(graphdef, params)
  layer = model.llm.layers[1]
  l, d = 12, cfg.model.d_model
  x = jax.random.normal(jax.random.key(0), (1, l, d))
  pos = np.arange(l, dtype=np.int32)[None]
  seg = np.array([[1] * 8 + [2] * 4], np.int32)  # two packed samples
  seq = rows.TokenInfo(pos, seg, rope_tables(pos, layer.attn.inv_freq))
  probs = arank_main.attention_maps(layer, x, seq)  # [1, heads, l, l]
  _, _, v = layer.attn.qkv(layer.input_norm(x), seq.positions, None, seq.rope)
  heads, kh = probs.shape[1], v.shape[2]
  v_rep = np.repeat(np.asarray(v), heads // kh, axis=2)  # [1, l, heads, hd]
  o = np.einsum("bnqs,bsnh->bqnh", np.asarray(probs), v_rep)
  want = layer.attn(
    layer.input_norm(x), seq.positions, seq.segment_ids, rope=seq.rope, ordered=True
  )
  np.testing.assert_allclose(np.asarray(layer.attn.out(o)), np.asarray(want), atol=1e-5)
  assert np.asarray(probs)[0, :, 8, :8].max() == 0  # no attention across samples
  assert arank_main.recommend([5.0, 1.0, 3.0, 1.0]) == {"lowest": [1, 3], "reference": []}
  assert arank_main.recommend([9.0] * 8)["reference"] == [3, 4, 5, 6]
