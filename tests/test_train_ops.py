"""Operating a run: Vertex's CLUSTER_SPEC, SIGTERM -> checkpoint -> exit 0 -> resume, trainable-only
checkpoints, the loop's habits (periodic eval, non-finite loss, logged metrics, profile) and
what the terminal shows."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from mod_jax.convert import pretrained
from mod_jax.train import checkpoint, distributed
from mod_jax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC = {
  "cluster": {
    "workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
    "workerpool1": ["cmle-training-workerpool1-ab-0:2222", "cmle-training-workerpool1-ab-1:2222"],
  },
  "environment": "cloud",
  "task": {"type": "workerpool1", "index": 1},
}


def test_cluster_spec_translation():
  args = distributed.cluster_spec_args(json.dumps(SPEC))
  assert args == {
    "coordinator_address": "cmle-training-workerpool0-ab-0:2222",
    "num_processes": 3,
    "process_id": 2,
  }
  primary = dict(SPEC, task={"type": "workerpool0", "index": 0})
  assert distributed.cluster_spec_args(json.dumps(primary), port=8476) == {
    "coordinator_address": "cmle-training-workerpool0-ab-0:8476",
    "num_processes": 3,
    "process_id": 0,
  }
  single = {"cluster": {"workerpool0": ["h:2222"]}, "task": {"type": "workerpool0", "index": 0}}
  assert distributed.cluster_spec_args(json.dumps(single)) is None
  with pytest.raises(ValueError, match="not Vertex AI's cluster spec"):
    distributed.cluster_spec_args("{not json")
  server = dict(SPEC, task={"type": "workerpool2", "index": 0})
  with pytest.raises(ValueError, match=r"workerpool2\[0\] is not a training replica"):
    distributed.cluster_spec_args(json.dumps(server))


def test_initialize_translates_cluster_spec_and_explicit_args_win(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.initialize(env={"CLUSTER_SPEC": json.dumps(SPEC)})
  distributed.initialize("localhost:1234", 2, 1, env={"CLUSTER_SPEC": json.dumps(SPEC)})
  distributed.initialize(env={})  # TPU VM / GKE: jax auto-detects
  assert calls == [
    {
      "coordinator_address": "cmle-training-workerpool0-ab-0:2222",
      "num_processes": 3,
      "process_id": 2,
    },
    {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1},
    {},
  ]

  def nothing_to_detect(**kw):
    raise ValueError("coordinator_address should be defined")

  monkeypatch.setattr(jax.distributed, "initialize", nothing_to_detect)
  one = {"cluster": {"workerpool0": ["h:2222"]}, "task": {"type": "workerpool0", "index": 0}}
  assert distributed.initialize(env={"CLUSTER_SPEC": json.dumps(one)}) == {}  # single process


def _cli(workdir, *extra, devices=8):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=ROOT,
  )
  cmd = [
    sys.executable,
    "-m",
    "mod_jax.cli",
    "train",
    "--config",
    os.path.join(ROOT, "configs", "tiny.py"),
    "--workdir",
    str(workdir),
    *extra,
  ]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


SIGTERM_FLAGS = (
  "--config.mesh.shape=(2,2,2)",
  "--config.train.steps=40",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=100",
  "--config.train.eval_batches=1",
)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resume_equals_uninterrupted(tmp_path):
  wd = tmp_path / "run"
  proc = _cli(wd, *SIGTERM_FLAGS)
  while not ((wd / "metrics.jsonl").exists() and (wd / "metrics.jsonl").read_text().strip()):
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  exit_s = time.time() - t0
  assert proc.returncode == 0 and exit_s < 30, (exit_s, out, err)
  saved = checkpoint.steps(str(wd))
  assert len(saved) == 1 and 1 <= saved[0] < 40, saved
  assert f"preempted (SIGTERM) at step {saved[0]}" in out
  # The terminal: events, no library logs (those are in train.log).
  for text in (out, err):
    assert "CheckpointManager" not in text and "absl" not in text, text
  assert "CheckpointManager" in (wd / "train.log").read_text()

  proc = _cli(wd, *SIGTERM_FLAGS)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, (out, err)
  assert f"resumed from the checkpoint at step {saved[0]}" in out
  lines = [ln for ln in out.splitlines() if ln.strip() and "train:" not in ln]
  assert len(lines) <= 25 and "eval lm_ppl" in out, out  # events + the final table
  print(f"\nSIGTERM -> exit 0 in {exit_s:.1f} s (checkpoint at step {saved[0]})")

  c = tiny.get_config()
  c.mesh.shape = (2, 2, 2)
  c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.eval_batches = 40, 1, 100, 1
  full = train_and_evaluate(c, str(tmp_path / "full"), progress=False)
  _, _, params, step = pretrained.restore_params(str(wd))
  assert step == 40
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
    jax.device_get(full["state"].params),
    jax.device_get(params),
  )
  resumed = json.loads((wd / "eval.json").read_text())["eval"]
  assert resumed["lm_ppl"] == pytest.approx(full["eval"]["lm_ppl"], rel=1e-5)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_loop_habits_and_trainable_only_checkpoint(tmp_path):
  c = tiny.get_config()
  c.mesh.shape = (2, 2, 2)
  c.model.vision.trainable = False  # a frozen part, rebuilt from the base reference
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 4, 1, 2
  c.train.eval_every, c.train.eval_batches = 2, 1
  wd = tmp_path / "run"
  out = train_and_evaluate(c, str(wd), progress=False, profile_steps=1)
  # Periodic evaluation at step 2 (then the final one), logged metrics, the profile.
  assert [e["step"] for e in out["evals"]] == [2]
  last = out["last_logged"]
  for k in (
    "learning_rate",
    "update_norm",
    "grad_norm",
    "step_time",
    "tokens_per_second",
    "model_flops_per_second",
    "goodput",
  ):
    assert np.isfinite(last[k]) and last[k] > 0, k
  assert 0 < last["goodput"] < 1 and out["compile_seconds"] > 0
  # Warmup over 2 steps, then cosine to 5% over the other 2: step index 3 is half-way.
  lr = c.train.learning_rate * (0.95 * 0.5 * (1 + np.cos(np.pi * 1 / 2)) + 0.05)
  assert last["learning_rate"] == pytest.approx(lr, rel=1e-6)
  assert list((wd / "profile").rglob("*.xplane.pb"))
  # The checkpoint holds the trainable parameters only, and restores to the same model.
  root = wd / "checkpoints" / "4" / "state"
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(root)
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  assert "vision" not in meta["trainable"] and "llm" in meta["trainable"]
  params = out["state"].params
  assert _nbytes(meta["trainable"]) < _nbytes(params)
  _, _, restored, step = pretrained.restore_params(str(wd))
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(restored))
  # A checkpoint from another frozen base is refused, naming both.
  other = tiny.get_config()
  other.seed = 7
  with pytest.raises(Exception, match="frozen base"):
    checkpoint.restore_trainable(str(wd), params, checkpoint.base_reference(other))


@pytest.mark.slow
def test_nonfinite_loss_raises_naming_the_step_and_saves_nothing_after(tmp_path):
  c = tiny.get_config()
  c.mesh.shape = (2, 2, 2)
  c.train.learning_rate = 1e30
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 8, 4, 1
  wd = tmp_path / "run"
  with pytest.raises(FloatingPointError, match=r"at step (\d+); nothing was saved") as e:
    train_and_evaluate(c, str(wd), progress=False)
  bad = int(e.value.args[0].split("at step ")[1].split(";")[0])
  saved = checkpoint.steps(str(wd))
  assert all(s < bad for s in saved), (saved, bad)
  if saved:
    _, _, params, _ = pretrained.restore_params(str(wd))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_workdir_config_is_read_through_epath_from_gs(tmp_path):
  """gs:// is faked with etils' own mock (every epath backend routed to a local folder); Orbax's
  array writes (tensorstore's GCS driver) and TensorBoard's (google-cloud-storage) are not
  epath and are not covered by this fake."""
  from etils.epath import testing as epath_testing

  (tmp_path / "bucket" / "run").mkdir(parents=True)
  c = tiny.get_config()
  c.train.steps = 123
  (tmp_path / "bucket" / "run" / "config.json").write_text(c.to_json_best_effort())
  seen = []

  def local(fn, path, *args, **kwargs):
    seen.append(str(path))
    return fn(str(path).replace("gs://", f"{tmp_path}/"), *args, **kwargs)

  fake = dict(open=local, exists=local, isdir=local, stat=local, glob=local, listdir=local)
  with epath_testing.mock_epath(**fake):
    assert pretrained.native_config("gs://bucket/run").train.steps == 123
    with pytest.raises(FileNotFoundError, match="gs://bucket/none/config.json does not exist"):
      pretrained.native_config("gs://bucket/none")
    assert checkpoint.steps("gs://bucket/run") == []
  assert "gs://bucket/run/config.json" in seen


@pytest.mark.slow
def test_init_from_a_training_workdir_restores_base_and_trained_parts(tmp_path):
  """A workdir as ``model.init_from``: frozen parts come from the run's base (its seed), trained
  parts from its trainable-only checkpoint, whatever the new run's own seed."""
  from mod_jax.train import sharding
  from mod_jax.train.state import trainable_labels

  c = tiny.get_config()
  c.mesh.shape = (1, 1, 1)
  c.model.vision.trainable = False
  mesh = sharding.make_mesh(c, devices=jax.devices()[:1])
  state, _, _, _ = sharding.create_train_state(c, mesh)
  labels = trainable_labels(state.params, c.model)
  trained = jax.tree.map(lambda x, lab: x + 1.0 if lab == "train" else x, state.params, labels)
  state = state.replace(params=trained)
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(c.to_json_best_effort())
  mngr = checkpoint.manager(str(wd), c.train)
  checkpoint.save(mngr, 5, state, labels, None, checkpoint.base_reference(c))
  mngr.wait_until_finished()
  assert "vision" not in checkpoint.trainable_params(state.params, labels)

  new = tiny.get_config()
  new.mesh.shape = (1, 1, 1)
  new.seed = 5  # another random init: every parameter must come from the workdir
  new.model.init_from = str(wd)
  params, _, _, _ = sharding.create_train_state(new, mesh)
  lines = pretrained.init_from_pretrained(new, params.params)
  assert any("(mod_jax)" in line for line in lines)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(params.params), jax.device_get(trained)
  )
