"""Train step against independent oracles: the unsharded step, and an uninterrupted run."""

import jax
import numpy as np
import pytest

from configs import tiny
from mod_jax.config import ConfigError, validate, validate_for_training
from mod_jax.model.factory import check_model_config
from mod_jax.train.loop import train_and_evaluate
from tests.helpers import run_train_steps, synthetic_batch


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "dense"])
def test_sharded_step_matches_single_device(variant):
  assert jax.device_count() == 8
  c1 = tiny.get_config(variant)
  c1.mesh.shape = (1, 1, 1)
  c8 = tiny.get_config(variant)
  c8.mesh.shape = (2, 2, 2)
  batches = [synthetic_batch(c1, 4, seed=s) for s in range(2)]
  init1, p1, m1, _, _ = run_train_steps(c1, jax.devices()[:1], batches)
  init8, p8, m8, s8, _ = run_train_steps(c8, jax.devices(), batches)
  # The sharded state really is sharded over the 8 devices.
  q = s8.params["llm"]["stacks"][0]["attn"]["q"][...]  # [layers, d, n, h]: layers unsharded
  assert len(q.sharding.device_set) == 8
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init1, init8)
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree_util.tree_flatten_with_path(p8)[0]
  ):
    name = jax.tree_util.keystr(path)
    if "['vision']" in name and "['k']['bias']" in name:
      # A key bias adds q·b_k to every logit of a query: softmax cancels it, so its true
      # gradient is 0 and AdamW turns float noise (~1e-9) into +-lr updates. Not comparable.
      continue
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  moved = max(
    float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(init1), jax.tree.leaves(p1))
  )
  assert moved > 1e-4  # the step really changed the parameters


def _resume_config(data_dir):
  c = tiny.get_config()
  c.mesh.shape = (2, 2, 2)
  c.data.dir = str(data_dir)
  c.train.steps = 8
  c.train.checkpoint_every = 4
  c.train.eval_batches = 1
  return c


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
  c = _resume_config(tmp_path / "data")
  full = train_and_evaluate(c, str(tmp_path / "full"), progress=False)
  first = train_and_evaluate(c, str(tmp_path / "resumed"), progress=False, stop_after=4)
  assert first["stopped_at"] == 4 and int(first["state"].step) == 4
  second = train_and_evaluate(c, str(tmp_path / "resumed"), progress=False)
  assert second["resumed_from"] == 4
  pa, pb = jax.device_get(full["state"].params), jax.device_get(second["state"].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), pa, pb)
  oa = jax.device_get(full["state"].opt_state)
  ob = jax.device_get(second["state"].opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), oa, ob)
  assert (tmp_path / "resumed" / "checkpoints" / "8").exists()
  assert full["eval"]["lm_ppl"] == pytest.approx(second["eval"]["lm_ppl"], rel=1e-5)


def test_validation_errors_name_the_value():
  c = tiny.get_config()
  c.mesh.shape = (3, 1, 1)
  with pytest.raises(ConfigError, match=r"mesh.shape=\(3, 1, 1\) needs 3 devices but 8"):
    validate(c, 8)
  c = tiny.get_config()
  c.model.mod.keep_ratio = 0.0
  with pytest.raises(ConfigError, match="keep_ratio=0.0"):
    check_model_config(c.model)
  c = tiny.get_config()
  c.model.tokens_per_frame = 9
  with pytest.raises(ConfigError, match="tokens_per_frame=9"):
    validate(c)
  c = tiny.get_config()
  c.train.batch_size = 6
  c.mesh.shape = (4, 1, 2)
  with pytest.raises(ConfigError, match="batch_size=6 / grad_accum_steps=1 = 6 rows per micro"):
    validate(c, 8)
  c = tiny.get_config()
  c.train.grad_accum_steps = 3
  with pytest.raises(ConfigError, match="grad_accum_steps=3 must be >= 1 and divide"):
    validate(c)
  for field, value in (("train.remat", "some"), ("model.attention", "flash")):
    c = tiny.get_config()
    c.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=f"{field}='{value}'"):
      validate(c)
  c = tiny.get_config()
  c.model.param_dtype = "bfloat16"
  validate(c)  # fine for inference ...
  with pytest.raises(ConfigError, match="trainable weights are kept in float32"):
    validate_for_training(c)  # ... refused for training: the LLM weights would be trained
