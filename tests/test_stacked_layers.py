"""Stacked decoder layers (``mod_jax/model/llm.py``): the parameters of layer i are row r of
stack s, and everything that addresses layer i finds it there.

Oracles: per-layer modules rebuilt by hand from numpy slices of the stacked arrays (not through
the model's own accessor) and run in a Python loop; the same seed's dense counterpart (a
different stacking); the exported safetensors themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs import tiny
from mod_jax.convert import export, pretrained
from mod_jax.model import llm
from mod_jax.model.attention import rope_tables
from mod_jax.model.video_llm import VideoLLM


def _model(variant="", **model):
  c = tiny.get_config(variant)
  c.model.update(model)
  c.model.n_layers = 4
  return c, VideoLLM(c.model, rngs=nnx.Rngs(0))


def test_stack_layout_of_interleaved_and_arbitrary_lists():
  c, model = _model()  # interleaved: layers 1, 3 route
  dec = model.llm
  assert dec.runs == ((0, 2, 2),)
  assert dec.members == ((0, 2), (1, 3))
  assert dec.slots == ((0, 0), (1, 0), (0, 1), (1, 1))
  assert set(dec.routers.keys()) == {"1"}  # the MoD position's stacked LayerExperts
  q = nnx.state(dec)["stacks"][1]["attn"]["q"]
  assert q.get_value().shape == (2, c.model.d_model, c.model.n_heads, c.model.head_dim)
  assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
  plan = model.llm.plan
  runs, members, _ = llm.stack_layout(plan, 4)
  assert (runs, members) == (dec.runs, dec.members)
  # an arbitrary insertion list: one-layer runs where no cycle repeats
  _, other = _model(mod=dict(insertion=[0, 1, 3]))
  assert sum(len(m) for m in other.llm.members) == 4
  assert sorted(i for m in other.llm.members for i in m) == [0, 1, 2, 3]
  with pytest.raises(IndexError, match="layer 4 is outside 0..3"):
    dec.layer(4)


def test_layer_weights_do_not_depend_on_the_stacking():
  """Layer i draws the same weights in the MoD model (2 stacks) and its dense counterpart (one
  stack of 4), so r = 1 MoD and dense stay comparable for a seed."""
  _, mod_model = _model()
  _, dense = _model("dense")
  assert len(dense.llm.stacks) == 1 and len(mod_model.llm.stacks) == 2
  for i in range(4):
    a, b = nnx.state(mod_model.llm.layer(i)), nnx.state(dense.llm.layer(i))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _by_hand(dec, i):
  """Layer i rebuilt from numpy row slices of the stacked state (independent of
  ``Decoder.layer`` / ``Decoder.slot``: the stack is found by searching ``members``)."""
  s = next(s for s, m in enumerate(dec.members) if i in m)
  r = dec.members[s].index(i)
  graphdef, state = nnx.split(dec.stacks[s])
  return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[r]), state))


@pytest.mark.parametrize("variant", ["", "dense"])
def test_stacked_model_equals_a_loop_over_its_layers(variant):
  """Text logits of the scanned model = final norm + LM head after a Python loop over layers
  built from the stacked arrays by hand (fp32, <= 1e-6)."""
  c, model = _model(variant)
  dec = model.llm
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, c.model.vocab_size)
  got = jax.jit(lambda t: dec.text_logits(t))(tokens)
  layers = [_by_hand(dec, i) for i in range(dec.n_layers)]

  @jax.jit
  def loop(tokens):  # the same kernels as the model: stream order, shared RoPE tables
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rope = rope_tables(pos, dec.inv_freq)
    x = dec.embed_tokens(tokens)
    for layer in layers:
      x = layer(x, pos, jnp.ones((b, t), jnp.int32), rope=rope, ordered=True)
    return dec.logits(dec.final_norm(x))

  np.testing.assert_allclose(np.asarray(got), np.asarray(loop(tokens)), atol=1e-6, rtol=0)
  # the accessor gives the same layer
  for i in range(dec.n_layers):
    got_w, want_w = nnx.state(dec.layer(i)), nnx.state(layers[i])
    for a, b in zip(jax.tree.leaves(got_w), jax.tree.leaves(want_w), strict=True):
      np.testing.assert_array_equal(a, b)


def test_hf_export_of_import_round_trips_exactly(tmp_path):
  """HF tensors → stacked parameters → HF tensors is the identity, name by name and bit by bit,
  and layer i of the imported model holds ``model.layers.{i}.*``."""
  c, source = _model(qkv_bias=True)  # Qwen2 layout: biases too
  first = tmp_path / "a"
  export.export_hf(source, c.model, str(first), vision=False)
  _, target = _model(qkv_bias=True)
  target.llm.stacks[0].attn.q[...] = jnp.zeros_like(target.llm.stacks[0].attn.q[...])
  state = nnx.state(target, nnx.Param)
  n = pretrained.load_llm(state["llm"], c.model, str(first))
  nnx.update(target, state)
  assert n == len(load_file(str(first / "model.safetensors")))
  tensors = load_file(str(first / "model.safetensors"))
  d, h = c.model.d_model, c.model.head_dim
  for i in range(4):  # layer i's q projection is HF's q_proj of layer i (W.T, heads split)
    want = tensors[f"model.layers.{i}.self_attn.q_proj.weight"].T.reshape(d, -1, h)
    np.testing.assert_array_equal(np.asarray(target.llm.layer(i).attn.q[...]), want)
  second = tmp_path / "b"
  export.export_hf(target, c.model, str(second), vision=False)
  again = load_file(str(second / "model.safetensors"))
  assert sorted(again) == sorted(tensors)
  for name, x in tensors.items():
    np.testing.assert_array_equal(again[name], x, err_msg=name)


def test_lora_adapters_are_stacked_and_merge_per_layer():
  """Adapters live inside the stacks ([layers, *in, r]); merging adds layer i's own ΔW to
  layer i (checked against A_i · B_i computed per layer in numpy)."""
  from mod_jax.model import lora

  lc = dict(rank=2, alpha=4.0, dropout=0.0, targets=("q", "down"))
  c, model = _model(lora=lc)
  rng = np.random.default_rng(0)
  for _, _, _, ad in lora.adapters(model):
    ad.b[...] = jnp.asarray(rng.normal(0, 0.1, ad.b.shape), jnp.float32)
  before = {i: model.llm.layer(i) for i in range(4)}
  ad_q = model.llm.stacks[0].attn.q_lora
  assert ad_q.a.shape == (2, c.model.d_model, 2)
  lora.merge_and_unload(model)
  for i in range(4):
    old = before[i]
    a, b = np.asarray(old.attn.q_lora.a[...]), np.asarray(old.attn.q_lora.b[...])
    want = np.asarray(old.attn.q[...]) + np.tensordot(a, b, axes=1) * 2.0
    np.testing.assert_allclose(np.asarray(model.llm.layer(i).attn.q[...]), want, atol=1e-6)
    assert getattr(model.llm.layer(i).attn, "q_lora", None) is None


def test_kv_caches_are_stacked_like_the_layers():
  """One cache per stack, [layers, b, size, ...]; a MoD stack's layers get the MoD size; sizes
  that differ inside a stack are refused."""
  from mod_jax.infer import streaming

  c, model = _model()
  sizes = streaming.cache_sizes(model.llm.plan, 4, 8)  # layers 1, 3 (MoD) cache fewer entries
  caches = jax.eval_shape(lambda: streaming.empty_caches(model, 2, sizes))
  assert len(caches) == 2
  for s, m in enumerate(model.llm.members):
    assert caches[s].k.shape == (2, 2, sizes[m[0]], c.model.n_kv_heads, c.model.head_dim)
    assert caches[s].written.shape == (2, 2)
  assert sizes[0] > sizes[1]
  with pytest.raises(ValueError, match=r"layers \(0, 2\) share a stack but were given cache"):
    streaming.empty_caches(model, 2, [sizes[0], sizes[1], sizes[1], sizes[1]])
