"""LoRA: B = 0 is the base model; training moves only adapters/connector/routers; merge is exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.tiny as tiny_config
from mod_jax import api
from mod_jax.config import ConfigError, validate
from mod_jax.model import lora
from mod_jax.model.factory import check_model_config
from mod_jax.model.video_llm import VideoLLM
from mod_jax.train import sharding
from mod_jax.train.state import trainable_labels
from mod_jax.train.step import train_step
from tests.helpers import synthetic_batch


def _cfg(rank=4, dropout=0.0):
  c = tiny_config.get_config()
  m = c.model
  m.n_layers, m.vision.depth = 2, 1
  m.lora.rank, m.lora.alpha, m.lora.dropout = rank, 8.0, dropout
  c.data.max_frames, c.data.max_text = 3, 16
  c.train.batch_size, c.train.warmup_steps, c.train.learning_rate = 2, 1, 1e-2
  c.mesh.shape = (1, 1, 1)
  return c


def _batch(c, seed=0):
  return {k: jnp.asarray(v) for k, v in synthetic_batch(c, c.train.batch_size, seed).items()}


@functools.partial(nnx.jit, static_argnames=("with_rng",))
def _forward(model, batch, with_rng=False):
  text, frame, _ = model(batch, rng=jax.random.key(7) if with_rng else None)
  return text, frame


def _plain_like(model_cfg, params):
  """The LoRA-free model (rank 0) with ``params``: graph from eval_shape, nothing initialised."""
  cfg = _cfg(rank=0).model
  cfg.update({k: model_cfg[k] for k in ("n_layers", "d_model", "vocab_size")})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: VideoLLM(cfg, rngs=nnx.Rngs(params=0))))
  return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def lora_model():
  c = _cfg(rank=4, dropout=0.5)
  return c, api.init_model(c.model)


def test_zero_b_is_the_base_model(lora_model):
  """Adapters start at B = 0: the model equals the same base weights without adapters."""
  c, tuned = lora_model
  flat = dict(nnx.state(tuned, nnx.Param).flat_state())
  adapters = [p for p in flat if any(str(k).endswith("_lora") for k in p)]
  assert len(adapters) == 2 * (7 * 2 + 1)  # a, b of q k v o gate up down per layer + lm_head
  assert all(not np.any(flat[p].get_value()) for p in adapters if p[-1] == "b")
  base_params = nnx.State.from_flat_path({p: v for p, v in flat.items() if p not in adapters})
  base = _plain_like(c.model, base_params)
  batch = _batch(c)
  for a, b in zip(_forward(base, batch), _forward(tuned, batch)):  # two programs: fp32 rounding
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_training_moves_only_trainable_params_and_merge_is_exact():
  c = _cfg(rank=4, dropout=0.1)
  validate(c)
  mesh = sharding.make_mesh(c, devices=jax.devices()[:1])
  state, graphdef, tx, shardings = sharding.create_train_state(c, mesh)
  labels = dict(jax.tree_util.tree_flatten_with_path(trainable_labels(state.params, c.model))[0])
  before = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  step = jax.jit(
    functools.partial(
      train_step, graphdef=graphdef, tx=tx, stream_loss_weight=1.0, base_rng=jax.random.key(0)
    )
  )
  with jax.set_mesh(mesh):
    for i in range(3):
      state, metrics = step(state, _batch(c, seed=i))
  assert np.isfinite(float(metrics["loss"]))
  after = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0])
  trained = set()
  for path, x in before:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if labels[path] == "frozen":
      np.testing.assert_array_equal(x, after[path], err_msg=f"frozen {name} changed")
    elif not np.array_equal(x, after[path]):
      trained.add(
        name.split("/")[0]
        + ("/lora" if "_lora" in name else "/routers" if "routers" in name else "")
      )
  assert {"llm/lora", "llm/routers", "connector", "vision"} <= trained
  frozen = [p for p, lab in labels.items() if lab == "frozen"]
  assert any("embed" in str(p) for p in frozen) and any("'q'" in str(p) for p in frozen)

  # Merged equals unmerged (no dropout without an rng), and loads into a LoRA-free model.
  model = nnx.merge(graphdef, state.params)
  model.eval()
  batch = _batch(c, seed=9)
  want = _forward(model, batch, with_rng=True)  # eval mode: the rng does not drop anything
  lora.merge_and_unload(model)
  plain = _plain_like(c.model, nnx.state(model, nnx.Param))
  for a, b in zip(want, _forward(plain, batch)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
  assert not lora.adapters(model)


def test_dropout_only_when_training(lora_model):
  c, model = lora_model
  model = nnx.clone(model)
  for _, _, _, ad in lora.adapters(model):
    ad.b.value = jnp.ones_like(ad.b.get_value()) * 0.1
  batch = _batch(c)
  det = np.asarray(_forward(model, batch)[0])
  noisy = np.asarray(_forward(model, batch, with_rng=True)[0])
  assert np.abs(det - noisy).max() > 1e-3
  model.eval()
  np.testing.assert_array_equal(det, np.asarray(_forward(model, batch, with_rng=True)[0]))


def test_lora_config_errors_are_named():
  c = _cfg(rank=4)
  c.model.lora.targets = ("q", "qkv")
  with pytest.raises(ConfigError, match=r"'qkv'"):
    check_model_config(c.model)
  c = _cfg(rank=4)
  c.model.tie_embeddings = True
  with pytest.raises(ConfigError, match=r"lm_head.*tie_embeddings"):
    check_model_config(c.model)


def test_adapters_and_their_moments_are_split_over_fsdp():
  """FSDP covers the adapters: each one (and its Adam moments) is split 8 ways on an fsdp-8 mesh,
  including those whose base axis is a tensor axis (mlp, heads, vocab); before the rank axis had
  a rule, those stayed whole on every chip (2.5 of 2.9 GiB of state per v5p chip for the 8B
  config)."""
  c = _cfg(rank=8)
  c.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
  c.mesh.shape = (1, 8, 1)
  c.train.batch_size = 8
  validate(c, 8)
  mesh = sharding.make_mesh(c, devices=jax.devices()[:8])
  abs_state, _, _, shardings, _ = sharding.abstract_train_state(c, mesh)
  flat = lambda tree: {
    jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  spec_of = flat((shardings.params, shardings.opt_state))
  adapters = {
    k: a for k, a in flat((abs_state.params, abs_state.opt_state)).items() if "_lora" in k
  }
  # (7 layer targets x 2 stacks (dense, MoD) + lm_head) x (a, b) x (parameter, two Adam moments)
  assert len(adapters) == (7 * 2 + 1) * 2 * 3
  for key, a in adapters.items():
    shard = spec_of[key].shard_shape(a.shape)
    assert np.prod(shard) * 8 == np.prod(a.shape), (key, a.shape, shard)


def test_a_rank_that_fsdp_cannot_split_is_refused():
  c = _cfg(rank=4)
  c.mesh.shape = (1, 8, 1)
  c.train.batch_size = 8
  with pytest.raises(ConfigError, match=r"lora.rank=4 is not divisible by 8.*'lora_rank'"):
    validate(c, 8)
