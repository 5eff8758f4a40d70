"""The launchers' dry runs: exact commands / job specs, arguments with spaces and quotes intact,
TPU topology -> number of hosts, and what each process of the job is told."""

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from contextlib import redirect_stdout

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import tpu_topology
import vertex

TRAIN = [
  "--config",
  "configs/videollm_mod_llama3_8b.py",
  "--workdir",
  "gs://bucket/runs/mod 8b",
  "--config.data.system_prompt=narrate what \"happens\" in 'the' video",
]


def _sh(*args) -> list[str]:
  out = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, check=True)
  return out.stdout.splitlines()


def test_topology_to_hosts():
  assert tpu_topology.parse("v5p-128") | {} == {
    "tpu_type": "v5p-128",
    "generation": "v5p",
    "chips": 64,
    "hosts": 16,
    "topology": "4x4x4",
    "machine_type": "ct5p-hightpu-4t",
    "accelerator_type": "TPU_V5P",
  }
  assert (tpu_topology.parse("v5p-8")["hosts"], tpu_topology.parse("v5p-8")["chips"]) == (1, 4)
  assert tpu_topology.parse("v5litepod-8")["hosts"] == 1
  assert tpu_topology.parse("v5litepod-8")["machine_type"] == "ct5lp-hightpu-8t"
  assert tpu_topology.parse("v5litepod-16")["hosts"] == 4
  assert tpu_topology.parse("v6e-256")["hosts"] == 64
  with pytest.raises(ValueError, match=r"no standard v5p slice of that size; use one of \[8, 16"):
    tpu_topology.parse("v5p-100")
  with pytest.raises(ValueError, match="e.g. v5p-128"):
    tpu_topology.parse("tpu7-8")


def test_tpu_vm_dry_run_runs_every_worker_with_args_intact():
  lines = _sh(
    "launch/tpu_vm.sh", "--name", "mod8b", "--zone", "us-east5-a", "--tpu-type", "v5p-128",
    "--dry-run", "--", *TRAIN,
  )  # fmt: skip
  assert lines[0].startswith("# v5p-128: hosts=16 chips=64")
  create = shlex.split(lines[1])
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert create[create.index("--accelerator-type") + 1] == "v5p-128"
  runs = [shlex.split(ln) for ln in lines if "--distributed" in ln]
  assert [r[r.index("--zone") + 2] for r in runs] == [f"--worker={w}" for w in range(16)]
  for r in runs:
    remote = shlex.split(r[r.index("--command") + 1])  # what the worker's shell runs
    assert remote[remote.index("&&") + 1 :] == ["mod-jax", "train", "--distributed", *TRAIN]
  installs = [ln for ln in lines if "pip\\ install" in ln]
  assert len(installs) == 16


def test_tpu_vm_queued_resource_dry_run():
  lines = _sh(
    "launch/tpu_vm.sh", "--name", "q", "--zone", "z", "--tpu-type", "v5litepod-16", "--queued",
    "--spot", "--source", "gs://b/mod_jax.tar.gz", "--dry-run", "--", *TRAIN,
  )  # fmt: skip
  create = shlex.split(lines[-1])
  assert create[3:5] == ["queued-resources", "create"] and "--spot" in create
  script = [ln[len("#   ") :] for ln in lines if ln.startswith("#   ")]
  assert script[2] == "gcloud storage cp gs://b/mod_jax.tar.gz ~/mod_jax.tar.gz"
  run = shlex.split(script[-1])
  assert run[run.index("&&") + 1 :] == ["mod-jax", "train", "--distributed", *TRAIN]
  with pytest.raises(subprocess.CalledProcessError):
    _sh("launch/tpu_vm.sh", "--name", "q", "--zone", "z", "--tpu-type", "v5p-8", "--queued")


def test_xpk_dry_run_tpu_and_gpu():
  lines = _sh(
    "launch/xpk.sh", "--cluster", "c", "--workload", "w", "--docker-image", "gcr.io/p/i:tpu",
    "--tpu-type", "v5p-128", "--num-slices", "2", "--max-restarts", "5", "--dry-run", "--", *TRAIN,
  )  # fmt: skip
  assert "-> 32 pods" in lines[0]
  cmd = shlex.split(lines[-1])
  assert cmd[:3] == ["xpk", "workload", "create"]
  opt = lambda name: cmd[cmd.index(name) + 1]
  assert (opt("--tpu-type"), opt("--num-slices"), opt("--max-restarts")) == ("v5p-128", "2", "5")
  assert shlex.split(opt("--command")) == ["mod-jax", "train", "--distributed", *TRAIN]
  lines = _sh(
    "launch/xpk.sh", "--cluster", "c", "--workload", "w", "--docker-image", "i:gpu",
    "--device-type", "h100-80gb-8", "--num-nodes", "4", "--build", "--dry-run", "--", *TRAIN,
  )  # fmt: skip
  build, push, cmd = (shlex.split(ln) for ln in lines[1:])
  assert "ACCELERATOR=gpu" in build and push == ["docker", "push", "i:gpu"]
  assert cmd[cmd.index("--device-type") + 1 : cmd.index("--device-type") + 4] == [
    "h100-80gb-8",
    "--num-nodes",
    "4",
  ]


def _vertex(*args) -> dict:
  buf = io.StringIO()
  with redirect_stdout(buf):
    vertex.main(["--image", "img", "--workdir", "gs://b/runs/x", "--dry-run", *args, "--", *TRAIN])
  return json.loads(buf.getvalue())


def test_vertex_dry_run_tpu_slice():
  out = _vertex("--tpu-type", "v5p-128")
  (pool,) = out["custom_job"]["worker_pool_specs"]
  assert pool["machine_spec"] == {"machine_type": "ct5p-hightpu-4t", "tpu_topology": "4x4x4"}
  assert pool["replica_count"] == 1
  assert pool["container_spec"]["command"] == [
    "mod-jax", "train", "--distributed", "--workdir", "gs://b/runs/x", *TRAIN,
  ]  # fmt: skip
  assert {e["name"]: e["value"] for e in pool["container_spec"]["env"]}["JAX_PLATFORMS"] == "tpu"
  assert out["replicas"][0]["jax.distributed.initialize"].startswith("auto-detect")


def test_vertex_dry_run_gpu_replicas_get_distinct_process_ids():
  out = _vertex("--machine-type", "a3-highgpu-8g", "--replicas", "4")
  pools = out["custom_job"]["worker_pool_specs"]
  assert [p["replica_count"] for p in pools] == [1, 3]
  assert pools[0]["machine_spec"] == {
    "machine_type": "a3-highgpu-8g",
    "accelerator_type": "NVIDIA_H100_80GB",
    "accelerator_count": 8,
  }
  init = [r["jax.distributed.initialize"] for r in out["replicas"]]
  assert [i["process_id"] for i in init] == [0, 1, 2, 3]
  assert {i["num_processes"] for i in init} == {4}
  assert {i["coordinator_address"] for i in init} == {"workerpool0-0:2222"}
  spec = json.loads(out["replicas"][3]["CLUSTER_SPEC"])
  assert spec["task"] == {"type": "workerpool1", "index": 2}
  with pytest.raises(SystemExit):
    vertex.main(["--image", "i", "--workdir", "/local/dir", "--tpu-type", "v5p-8", "--dry-run"])


def test_dockerfile_build_args_name_real_extras():
  extras = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())["project"][
    "optional-dependencies"
  ]
  text = open(os.path.join(ROOT, "launch", "Dockerfile")).read()
  assert re.search(r'pip install "\.\[\$ACCELERATOR,cloud\]"', text)
  assert re.search(r"^\s+tpu\|gpu\)", text, re.M)
  assert {"tpu", "gpu", "cloud"} <= set(extras)
  assert extras["tpu"] == ["jax[tpu]==0.10.2"] and extras["gpu"] == ["jax[cuda12]==0.10.2"]
