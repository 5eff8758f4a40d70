"""Two processes x 2 CPU devices (jax.distributed on localhost, gloo collectives) against one
process x 4 devices: the same parameters, the same data order, a checkpoint saved at a step both
processes agree on after a SIGTERM to one of them, a resume, and the held-out evaluation split
across the processes and summed once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from mod_jax.convert import pretrained
from mod_jax.data import pipeline
from mod_jax.train import sharding
from mod_jax.train.loop import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
OVERRIDES = {
  "train.steps": STEPS,
  "train.log_every": 1,
  "train.checkpoint_every": 100,
  "train.eval_batches": 0,
}


def _config():
  c = tiny.get_config()
  for k, v in OVERRIDES.items():
    node = c
    *heads, last = k.split(".")
    for h in heads:
      node = node[h]
    node[last] = v
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(workdir, tmp_path, tag: str, n: int = 2, devices: int = 2, extra=()):
  """``mod-jax train`` as ``n`` local processes of ``devices`` CPU devices each."""
  port = _free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=ROOT,
  )
  procs = []
  for i in range(n):
    log = open(tmp_path / f"{tag}.{i}.out", "w")
    cmd = [
      sys.executable,
      "-m",
      "mod_jax.cli",
      "train",
      "--config",
      os.path.join(ROOT, "configs", "tiny.py"),
      "--workdir",
      str(workdir),
      f"--coordinator_address=localhost:{port}",
      f"--num_processes={n}",
      f"--process_id={i}",
      *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
      *extra,
    ]
    procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
  return procs


def wait_all(procs, tmp_path, tag, timeout=600):
  deadline = time.time() + timeout
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      raise
    log.close()
  outs = [(tmp_path / f"{tag}.{i}.out").read_text() for i in range(len(procs))]
  tails = "\n".join(f"--- {tag}.{i}:\n{o[-3000:]}" for i, o in enumerate(outs))
  assert codes == [0] * len(procs), tails
  return "\n".join(outs)


def _oracle(config, steps):
  """One process, 4 devices, fed the global batches the two processes make together: process
  p's local batch is rows [2p, 2p + 2) (its devices come second in the mesh's data axis)."""
  devices = jax.devices()[:4]
  mesh = sharding.make_mesh(config, devices=devices)
  rules = sharding.rules_of(config)
  state, graphdef, tx, shardings = sharding.create_train_state(config, mesh)
  fn = sharding.jit_train_step(config, graphdef, tx, state.params, shardings)
  tok = pipeline.load_tokenizer(config)
  shards = [
    iter(pipeline.make_dataset(config, "train", tok, process_index=p, process_count=2))
    for p in range(2)
  ]
  with jax.set_mesh(mesh):
    for _ in range(steps):
      local = [next(it) for it in shards]
      batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
      state, _ = fn(state, sharding.host_to_global(batch, mesh, rules))
  return state, graphdef, mesh, tok


@pytest.mark.slow
def test_two_processes_equal_one_with_preemption_and_resume(tmp_path):
  config = _config()
  pipeline.prepare_data(config)  # generated once, before the processes race for it
  wd = tmp_path / "run"
  t0 = time.time()
  # Run 1: SIGTERM to process 1 once process 0 has logged a step; both save the same step.
  procs = start_processes(wd, tmp_path, "first")
  metrics = wd / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().strip()):
    assert all(p.poll() is None for p, _ in procs), wait_all(procs, tmp_path, "first")
    time.sleep(0.2)
  t_kill = time.time()
  procs[1][0].send_signal(signal.SIGTERM)
  out = wait_all(procs, tmp_path, "first")
  t_exit = time.time() - t_kill
  assert t_exit < 30, out
  saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 1 <= saved[0] < STEPS, (saved, out)
  assert f"preempted (SIGTERM) at step {saved[0]}" in out
  data = sorted(p.name for p in (wd / "checkpoints" / str(saved[0]) / "data").iterdir())
  assert [d for d in data if d.startswith("process_")] == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  # Run 2: the same command resumes from that step and finishes (final eval included).
  procs = start_processes(wd, tmp_path, "second")
  out = wait_all(procs, tmp_path, "second")
  assert f"resumed from the checkpoint at step {saved[0]}" in out
  elapsed = time.time() - t0
  summary = json.loads((wd / "eval.json").read_text())

  # Oracle: one process x 4 devices, uninterrupted, on the two shards' batches side by side.
  state, graphdef, mesh, tok = _oracle(config, STEPS)
  _, _, params, step = pretrained.restore_params(str(wd))
  assert step == STEPS
  want = jax.device_get(state.params)
  got = jax.device_get(params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    name = jax.tree_util.keystr(path)
    if "['vision']" in name and "['k']['bias']" in name:
      # A key bias adds q.b_k to every logit of a query: softmax cancels it, its true gradient
      # is 0 and AdamW turns float noise (~1e-9) into +-lr updates (tests/test_train.py).
      continue
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0, err_msg=name)
  # Evaluation: the split is read once in total (counts of a single-process pass over all of
  # it), and the metrics equal the single process's.
  single = evaluate(config, state.params, graphdef, mesh, tok)
  ev = summary["eval"]
  assert (
    ev["text_tokens"] == single["text_tokens"]
    and ev["frame_decisions"] == (single["frame_decisions"])
  )
  for k in ("eval_loss", "lm_loss", "stream_accuracy"):
    assert ev[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6), k
  print(f"\n2-process runs (preempted + resumed): {elapsed:.0f} s; SIGTERM -> exit {t_exit:.1f} s")
