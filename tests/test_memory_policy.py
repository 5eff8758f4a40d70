"""Scanned layers, rematerialisation, gradient accumulation, chunked LM head, features input and
the attention kernels inside the model change nothing: each is checked against the plain
computation (unrolled layers, no remat, one full batch, full logits, the online tower, xla)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from mod_jax import config
from mod_jax.model import llm, mod
from mod_jax.model.video_llm import VideoLLM
from mod_jax.train.state import TrainState
from mod_jax.train.step import loss_fn, micro_batches, train_step
from tests.helpers import synthetic_batch


def _setup(variant="", **model):
  c = tiny.get_config(variant)
  c.model.update(model)
  model = VideoLLM(c.model, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(c, 4).items()}
  return c, model, batch


def _grads(model, batch, **kw):
  graphdef, params = nnx.split(model, nnx.Param)
  return jax.jit(
    jax.grad(
      lambda p: loss_fn(p, graphdef, batch, jax.random.key(0), stream_loss_weight=1.0, **kw)[0]
    )
  )(params)


def _assert_trees_close(a, b, atol, rtol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("insertion", ["interleaved", "all_deep", [0, 1, 3]])
def test_scanned_layers_equal_unrolled(insertion):
  _, model, batch = _setup(mod=dict(insertion=insertion))
  scanned = model(batch)
  g_scan = _grads(model, batch)
  model.llm.scan_layers = False
  unrolled = model(batch)
  g_loop = _grads(model, batch)
  for a, b in zip(scanned[:2], unrolled[:2]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  _assert_trees_close(g_scan, g_loop, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  "remat", ["full", "save_dots", "save_qkv_proj", "save_dot_except_mlpwi", "save_proj_except_mlpwo"]
)
def test_remat_changes_nothing(remat):
  _, model, batch = _setup()
  # Recomputation reorders fp32 sums: gradients of size ~1 agree to ~1 ulp-scale error.
  _assert_trees_close(_grads(model, batch, remat=remat), _grads(model, batch), 1e-6, 1e-5)


def test_config_lists_every_remat_policy():
  assert set(config.REMAT_POLICIES) == set(llm.REMAT_POLICIES)


@pytest.mark.slow
@pytest.mark.parametrize(
  "variant,remat", [("", "save_proj"), ("dense", "save_proj"), ("", "save_proj_except_mlpwo")]
)
def test_save_proj_remat_changes_nothing_with_lora(variant, remat):
  """``save_proj`` (every projection output saved) on the MoD and the dense tiny model with LoRA
  adapters (dropout on, so the recomputed masks must match): loss and gradients equal remat=none."""
  lora = dict(rank=4, alpha=8.0, dropout=0.1, targets=("q", "k", "v", "o", "gate", "up", "down"))
  _, model, batch = _setup(variant, lora=lora)
  graphdef, params = nnx.split(model, nnx.Param)

  def value_and_grad(remat):
    f = lambda p: loss_fn(
      p, graphdef, batch, jax.random.key(0), stream_loss_weight=1.0, remat=remat
    )
    return jax.jit(jax.value_and_grad(lambda p: f(p)[0]))(params)

  (loss, grads), (loss_ref, grads_ref) = value_and_grad(remat), value_and_grad("none")
  np.testing.assert_allclose(float(loss), float(loss_ref), atol=1e-6, rtol=0)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads_ref))
  _assert_trees_close(grads, grads_ref, 1e-6, 1e-5)


@pytest.mark.parametrize("remat", ["save_proj", "save_proj_except_mlpwo"])
def test_save_proj_saves_only_the_computed_tokens(capsys, remat):
  """What ``save_proj`` keeps for the backward pass of the scanned (dense, MoD) cycle: the
  cycle's input (the residual stream, [reps, b, L, d]) and the eight named projection outputs of
  each layer at the length that layer computes: L in the dense layer, the compact C = T + F·k in
  the MoD layer. Nothing else scales with the sequence, so the saved bytes shrink with MoD.
  ``save_proj_except_mlpwo`` keeps the same less the down projection's [L, d] and [C, d]."""
  c, model, batch = _setup()
  graphdef, params = nnx.split(model, nnx.Param)
  f = lambda p: loss_fn(p, graphdef, batch, jax.random.key(0), stream_loss_weight=1.0, remat=remat)[
    0
  ]
  jax.ad_checkpoint.print_saved_residuals(f, params)
  t, fr = c.data.max_text, c.data.max_frames
  n = c.model.tokens_per_frame
  k = mod.keep_count(c.model.mod.keep_ratio, n)
  length, compact = t + fr * n, t + fr * k
  reps, b = c.model.n_layers // 2, batch["text_tokens"].shape[0]
  scan = [
    tuple(int(x) for x in line.split("[")[1].split("]")[0].split(","))
    for line in capsys.readouterr().out.splitlines()
    if "output of scan" in line and "Decoder._repeat" in line  # the layers' scan
  ]
  scan = [shape for shape in scan if len(shape) > 3]  # per-cycle residuals (not the final x)
  by_length = {}
  for shape in scan:
    assert shape[:2] == (reps, b), shape
    by_length.setdefault(shape[2], []).append(shape[3:])
  assert sorted(by_length) == [compact, length]
  m = c.model
  hd = (m.n_heads, m.head_dim)
  kv = (m.n_kv_heads, m.head_dim)
  named = [hd, kv, kv, hd, (m.d_model,), (m.d_ff,), (m.d_ff,)]  # q k v context out mlpwi_0/1
  named += [(m.d_model,)] if remat == "save_proj" else []  # mlpwo
  assert sorted(by_length[compact]) == sorted(named)
  assert sorted(by_length[length]) == sorted(named + [(m.d_model,)])  # + the cycle's input


def test_chunked_cross_entropy_equals_full_logits():
  _, model, batch = _setup()
  h_text, _, _ = model.hidden(batch)
  targets = batch["text_targets"]
  ce, pred = model.llm.cross_entropy(h_text, targets, chunk=7)  # 64 slots: 9 chunks, padded
  logits = model.llm.logits(h_text)
  np.testing.assert_allclose(
    np.asarray(ce),
    np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets)),
    atol=1e-5,
    rtol=1e-6,
  )
  np.testing.assert_array_equal(np.asarray(pred), np.asarray(jnp.argmax(logits, -1)))


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch():
  """SGD with lr 1: the parameter change IS the gradient. Two micro-batches of 2 rows give the
  gradient of the 4-row batch (losses normalised by the whole batch's label count)."""
  c, model, batch = _setup(mod=dict(router_aux_loss_weight=0.1))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.sgd(1.0)
  state = TrainState.create(params, tx)
  step = lambda a: jax.jit(
    lambda s, b: train_step(
      s,
      b,
      graphdef=graphdef,
      tx=tx,
      stream_loss_weight=0.5,
      router_aux_weight=0.1,
      base_rng=0,
      grad_accum_steps=a,
    )
  )(state, batch)
  (one, m1), (two, m2) = step(1), step(2)
  _assert_trees_close(one.params, two.params, 1e-6)
  for k in ("loss", "lm_loss", "stream_loss", "stream_accuracy", "router_aux_loss", "grad_norm"):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, err_msg=k)
  # row r goes to micro-batch r mod 2
  mb = micro_batches(batch, 2)
  np.testing.assert_array_equal(
    np.asarray(mb["text_tokens"][1, 0]), np.asarray(batch["text_tokens"][1])
  )
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    micro_batches(batch, 3)


def test_features_input_equals_frames_input():
  """A batch carrying the (frozen) tower's output as ``features`` trains the same model."""
  c, model, batch = _setup()
  model.vision_trainable = False
  feats = model.vision(batch["frames"])
  with_features = {k: v for k, v in batch.items() if k != "frames"}
  with_features["features"] = feats
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda b: loss_fn(params, graphdef, b, jax.random.key(0), stream_loss_weight=1.0)[0]
  np.testing.assert_allclose(float(loss(with_features)), float(loss(batch)), rtol=1e-6)


def test_chunked_tower_equals_whole_and_skips_padding():
  c, model, batch = _setup()
  whole = model.vision(batch["frames"])
  model.vision.frame_chunk = 3
  valid = batch["frame_segment_ids"] != 0
  chunked = model.vision(batch["frames"], valid)
  ok = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(chunked)[ok], np.asarray(whole)[ok], atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_model_attention_kernels_equal_the_position_mask_reference(impl):
  """The decoder in stream order on a kernel equals the same decoder run in the slot layout with
  the position mask (any order; the reference)."""
  _, model, batch = _setup(attention=impl, attention_block_size=16)
  got = model(batch)
  for stack in model.llm.stacks:  # stacked layers: one module per stack holds the setting
    stack.attn.implementation = "xla"
  want_h = _layout_reference(model, batch)
  text_ok = np.asarray(batch["text_segment_ids"]) != 0
  np.testing.assert_allclose(
    np.asarray(got[0])[text_ok], np.asarray(want_h)[text_ok], atol=2e-5, rtol=0
  )


def _layout_reference(model, batch):
  """Text logits of the dense-equivalent model (r irrelevant: tiny is interleaved, so compare a
  dense config) computed in the layout order with ``ordered=False``."""
  from mod_jax.model import rows

  x, seq, layout = model.embed_row(batch)
  # Route with the same kept tokens: run the model's own stream-order row, but the attention by
  # position mask (ordered=False) — an independent mask construction.
  t = layout.num_text
  h, _ = model.llm(x, seq, layout, ordered=False)
  return model.llm.logits(rows.take(h, layout.inverse)[:, :t])
