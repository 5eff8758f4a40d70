"""The context mesh axis (docs/design.md §6) against unsharded oracles.

Attention with the sequence split over ``context`` (all-gather KV) equals the XLA path on one
device, in values and gradients; the whole train step (loss, metrics and updated parameters)
with context = 2 or 4 equals the single-device step on the same rows, for MoD and dense. The
rows are context-chunked (``tests.helpers.chunked_batch``: a sample spans every chunk boundary,
another starts in the last chunk, padding in the middle of the row); the single-device model
does not fold anything, so it is an independent oracle of the chunked computation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from configs import tiny
from mod_jax.config import DEFAULT_LOGICAL_AXIS_RULES, ConfigError, full_mesh_shape, validate
from mod_jax.model.attention_ops import attend
from mod_jax.train import sharding
from tests.helpers import chunked_batch, run_train_steps

AXES = ("data", "fsdp", "tensor", "context")


def _mesh(shape):
  n = int(np.prod(shape))
  devices = np.asarray(jax.devices()[:n]).reshape(shape)
  return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _segments(b, t, seed):
  """Packed rows in stream order with padding inside and at the end (segment 0)."""
  rng = np.random.default_rng(seed)
  out = np.zeros((b, t), np.int32)
  for row in range(b):
    i, seg = 0, 0
    while i < t:
      n = int(rng.integers(3, t // 2))
      seg += 1
      out[row, i : i + n] = seg if rng.random() > 0.2 else 0
      i += n
  return out


def _attention_case(b, t, n, kh, h, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  return q, k, v, jnp.asarray(_segments(b, t, seed)), ct


def _value_and_grad(implementation, block_size, rules):
  def loss(q, k, v, seg, ct):
    out = attend(
      q,
      k,
      v,
      seg,
      seg,
      causal=True,
      implementation=implementation,
      block_size=block_size,
      rules=rules,
    )
    return jnp.sum(out * ct * (seg != 0)[:, :, None, None]), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _check_attention(implementation, shape, case, block_size):
  q, k, v, seg, ct = case
  (_, ref), ref_grads = _value_and_grad("xla", 512, None)(q, k, v, seg, ct)
  with jax.set_mesh(_mesh(shape)):
    fn = _value_and_grad(implementation, block_size, DEFAULT_LOGICAL_AXIS_RULES)
    text = fn.lower(q, k, v, seg, ct).compile().as_text()
    (_, out), grads = fn(q, k, v, seg, ct)
  assert "all-gather" in text  # K/V really are gathered along the context axis
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5, rtol=0)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 4), (2, 1, 1, 2)])
def test_context_attention_matches_unsharded_xla(implementation, shape):
  """GQA, packed segments with padding; blocks of 8 so the blockwise path skips blocks."""
  _check_attention(implementation, shape, _attention_case(2, 64, 4, 2, 8), block_size=8)


@pytest.mark.parametrize("t", [256, 200])
def test_context_splash_matches_unsharded_xla(t):
  """Splash (Pallas interpret mode) with its mask info split over 2 query shards; t = 200
  pads each device's 100 queries (and keys, before the gather) to one 128 block."""
  _check_attention("splash", (1, 1, 1, 2), _attention_case(1, t, 2, 1, 8, seed=1), 128)


def test_context_attention_errors():
  q, k, v, seg, _ = _attention_case(1, 30, 2, 2, 8)
  with jax.set_mesh(_mesh((1, 1, 1, 4))):
    with pytest.raises(ValueError, match="divisible by the context size 4"):
      attend(q, k, v, seg, seg, causal=True, implementation="xla", rules=DEFAULT_LOGICAL_AXIS_RULES)
    q4, k4, v4, seg4, _ = _attention_case(1, 32, 2, 2, 8)
    with pytest.raises(ValueError, match="causal=False"):
      attend(q4, k4, v4, causal=False, implementation="xla", rules=DEFAULT_LOGICAL_AXIS_RULES)
    with pytest.raises(ValueError, match="'cudnn' cannot run with the sequence split"):
      attend(
        q4, k4, v4, seg4, seg4, causal=True, implementation="cudnn", backend="gpu",
        rules=DEFAULT_LOGICAL_AXIS_RULES,
      )  # fmt: skip


def _assert_params_equal(p1, p8):
  """Every parameter equal (fp32, 1e-5), but the tower's key biases (a softmax cancels a key
  bias: its true gradient is 0, see test_train.py)."""
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree_util.tree_flatten_with_path(p8)[0]
  ):
    name = jax.tree_util.keystr(path)
    if "['vision']" not in name or "['k']['bias']" not in name:
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
  "variant,shape,attention",
  [("", (2, 1, 1, 4), "blockwise"), ("dense", (2, 1, 1, 4), "xla"), ("", (1, 2, 2, 2), "xla")],
)
def test_context_train_step_matches_single_device(variant, shape, attention):
  """Loss, metrics and every updated parameter equal the 1-device step (fp32, 1e-5)."""
  configs = []
  for mesh_shape in ((1, 1, 1, 1), shape):
    c = tiny.get_config(variant)
    c.mesh.shape = mesh_shape
    c.model.attention = attention
    c.model.attention_block_size = 16
    configs.append(c)
  validate(configs[1], 8)
  batch = chunked_batch(configs[0], 4, chunks=shape[3], seed=3)
  _, p1, m1, _, _ = run_train_steps(configs[0], jax.devices()[:1], [batch])
  _, p8, m8, _, global_batch = run_train_steps(configs[1], jax.devices(), [batch])
  # Each device holds its chunk: text slots and frames split over the context axis.
  spec = global_batch["text_tokens"].sharding.spec
  assert spec[1] == "context", spec
  for name in ("loss", "lm_loss", "stream_loss", "stream_accuracy", "grad_norm"):
    np.testing.assert_allclose(m1[name], m8[name], rtol=1e-5, atol=1e-6, err_msg=name)
  if not variant:
    assert any(k.startswith("router/") for k in m8)
  _assert_params_equal(p1, p8)


@pytest.mark.slow
def test_training_from_the_pipeline_with_a_context_axis_matches_one_device(tmp_path):
  """`train_and_evaluate` with mesh (2, 2, 1, 2) — data × fsdp × context over the 8 CPU devices —
  trains on context-chunked rows from the data pipeline (mod_jax/data/packing.py). Its 3 steps
  give the same losses and updated parameters (fp32, 1e-5) as the 1-device step without a
  context axis on the same rows (the pipeline's R = 2 batches, read there as ordinary rows), and
  its held-out evaluation runs on chunked eval rows."""
  from mod_jax.data import pipeline
  from mod_jax.train.loop import train_and_evaluate

  c = tiny.get_config()
  c.mesh.shape = (2, 2, 1, 2)
  c.data.dir = str(tmp_path / "data")
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 3, 1, 100
  out = train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2, 3]
  assert np.isfinite(out["eval"]["eval_loss"]) and out["eval"]["text_tokens"] > 0

  c1 = c.copy_and_resolve_references()
  c1.mesh.shape = (1, 1, 1, 1)
  mesh = sharding.make_mesh(c1, devices=jax.devices()[:1])
  state, graphdef, tx, shardings = sharding.create_train_state(c1, mesh)
  step = sharding.jit_train_step(c1, graphdef, tx, state.params, shardings)
  tok = pipeline.load_tokenizer(c)
  rows = iter(pipeline.make_dataset(c, "train", tok))  # c's mesh: rows of 2 context chunks
  with jax.set_mesh(mesh):
    for m in logged:
      batch = next(rows)
      if m["step"] == 1:  # the rows really are chunked: a sample continues into chunk 1
        seg = batch["text_segment_ids"].reshape(len(batch["text_segment_ids"]), 2, -1)
        assert any(np.intersect1d(s[0][s[0] > 0], s[1]).size for s in seg)
      state, metrics = step(state, sharding.host_to_global(batch, mesh, sharding.rules_of(c1)))
      for name in ("loss", "lm_loss", "stream_loss", "grad_norm"):
        np.testing.assert_allclose(m[name], float(metrics[name]), rtol=1e-5, atol=1e-6)
  p1, p8 = jax.device_get(state.params), jax.device_get(out["state"].params)
  _assert_params_equal(p1, p8)


def test_context_config_errors():
  c = tiny.get_config()
  c.mesh.shape = (1, 1, 1, 8)
  with pytest.raises(ConfigError, match="data.max_frames=8 is not divisible|max_text"):
    c.data.max_text = 60
    validate(c, 8)
  c = tiny.get_config()
  c.mesh.shape = (2, 1, 1, 4)
  c.data.max_frames = 6
  with pytest.raises(ConfigError, match="data.max_frames=6 is not divisible by the context"):
    validate(c, 8)
  c = tiny.get_config()
  c.mesh.shape = (2, 1, 1, 4)
  c.model.attention = "cudnn"
  with pytest.raises(ConfigError, match="'cudnn' cannot run with a context axis of size 4"):
    validate(c, 8)
  c = tiny.get_config()
  c.mesh.shape = (2, 1, 1, 4)
  c.mesh.logical_axis_rules = tuple(
    (k, None if k == "length" else v) for k, v in DEFAULT_LOGICAL_AXIS_RULES
  )
  with pytest.raises(ConfigError, match="map 'length' to None"):
    validate(c, 8)
  c = tiny.get_config()
  c.mesh.shape = (4, 1, 1, 2)
  c.model.mod.routing = "sequence"
  with pytest.raises(ConfigError, match="γ-MoD"):
    validate(c, 8)
  # Earlier three-entry shapes mean (data, fsdp, tensor) with context 1.
  assert full_mesh_shape((2, 2, 2), AXES) == (2, 2, 2, 1)
  with pytest.raises(ConfigError, match="more entries than mesh.axes"):
    full_mesh_shape((1, 1, 1, 1, 1), AXES)
