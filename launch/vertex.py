"""Train as a Vertex AI CustomJob (``google-cloud-aiplatform``, extra ``cloud``).

  python launch/vertex.py --project P --region us-east5 --image IMG --workdir gs://B/runs/x \\
      (--tpu-type v5p-128 | --machine-type a3-highgpu-8g --gpus 8 --replicas 4) [--dry-run] \\
      -- <mod-jax train flags>

* TPU: one replica per slice; the machine type and ``tpu_topology`` come from the slice name
  (``launch/tpu_topology.py``); the slice's hosts find each other from TPU metadata.
* GPU: ``--replicas`` machines, pool 0 the primary replica and pool 1 the others; every replica
  gets Vertex's ``CLUSTER_SPEC``, which ``mod-jax train --distributed`` translates into
  ``jax.distributed.initialize(coordinator_address, num_processes, process_id)``
  (``mod_jax/train/distributed.py``).

The container runs ``mod-jax train --distributed --workdir WORKDIR <flags>``; a preempted replica
is restarted by Vertex (``scheduling.restart_job_on_worker_restart``) and resumes from the last
checkpoint in the ``gs://`` workdir. ``--dry-run`` prints the job as JSON (the CustomJob spec,
and what each replica's process will be told by jax) without importing the SDK or touching the
network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tpu_topology

GPU_ACCELERATORS = {
  "a3-highgpu-8g": "NVIDIA_H100_80GB",
  "a3-megagpu-8g": "NVIDIA_H100_MEGA_80GB",
  "a3-ultragpu-8g": "NVIDIA_H200_141GB",
  "a2-highgpu-8g": "NVIDIA_TESLA_A100",
  "a2-ultragpu-8g": "NVIDIA_A100_80GB",
}
COORDINATOR_PORT = 2222  # the port Vertex gives in CLUSTER_SPEC


def job_spec(args) -> dict:
  """The CustomJob as the SDK's ``aiplatform.CustomJob`` takes it (snake_case proto fields)."""
  if not args.workdir.startswith("gs://"):
    raise SystemExit(f"vertex.py: --workdir={args.workdir!r} must be gs://... (replicas share it).")
  command = ["mod-jax", "train", "--distributed", "--workdir", args.workdir, *args.train_args]
  env = [
    {"name": "JAX_PLATFORMS", "value": "tpu" if args.tpu_type else "cuda"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
  ]
  container = {"image_uri": args.image, "command": command, "env": env}
  if args.tpu_type:
    t = tpu_topology.parse(args.tpu_type)
    machine = {"machine_type": t["machine_type"], "tpu_topology": t["topology"]}
    pools = [{"machine_spec": machine, "replica_count": 1, "container_spec": container}]
  else:
    if args.machine_type not in GPU_ACCELERATORS:
      raise SystemExit(
        f"vertex.py: --machine-type={args.machine_type!r}; choose one of {sorted(GPU_ACCELERATORS)}."
      )
    machine = {
      "machine_type": args.machine_type,
      "accelerator_type": GPU_ACCELERATORS[args.machine_type],
      "accelerator_count": args.gpus,
    }
    pools = [{"machine_spec": machine, "replica_count": 1, "container_spec": container}]
    if args.replicas > 1:
      pools.append(
        {"machine_spec": machine, "replica_count": args.replicas - 1, "container_spec": container}
      )
  for p in pools:
    p["disk_spec"] = {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": args.disk_gb}
  return {
    "display_name": args.name,
    "worker_pool_specs": pools,
    "base_output_dir": args.workdir,
    "restart_job_on_worker_restart": True,
  }


def replica_view(spec: dict) -> list[dict]:
  """What every replica will see: the ``CLUSTER_SPEC`` Vertex sets (addresses as Vertex names
  them) and the ``jax.distributed.initialize`` arguments ``mod-jax train`` derives from it."""
  from mod_jax.train.distributed import cluster_spec_args

  cluster = {
    f"workerpool{i}": [
      f"workerpool{i}-{r}:{COORDINATOR_PORT}" for r in range(pool["replica_count"])
    ]
    for i, pool in enumerate(spec["worker_pool_specs"])
  }
  out = []
  for pool_name, addresses in cluster.items():
    for index in range(len(addresses)):
      cs = {"cluster": cluster, "environment": "cloud", "task": {"type": pool_name, "index": index}}
      out.append(
        {
          "replica": f"{pool_name}[{index}]",
          "CLUSTER_SPEC": json.dumps(cs),
          "jax.distributed.initialize": cluster_spec_args(json.dumps(cs))
          or "auto-detect (one replica: the TPU slice's hosts, or a single machine)",
        }
      )
  return out


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--project")
  ap.add_argument("--region", default="us-central1")
  ap.add_argument("--image", required=True, help="container built from launch/Dockerfile")
  ap.add_argument("--workdir", required=True, help="gs://BUCKET/runs/NAME")
  ap.add_argument("--name", default="mod-jax-train")
  ap.add_argument("--tpu-type", help="TPU slice, e.g. v5p-128 or v5litepod-16")
  ap.add_argument("--machine-type", help="GPU machine, e.g. a3-highgpu-8g")
  ap.add_argument("--gpus", type=int, default=8, help="GPUs per machine")
  ap.add_argument("--replicas", type=int, default=1, help="GPU machines")
  ap.add_argument("--disk-gb", type=int, default=200)
  ap.add_argument("--service-account")
  ap.add_argument("--dry-run", action="store_true", help="print the job as JSON; no network")
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1 :]
  else:
    train_args = []
  args = ap.parse_args(argv)
  args.train_args = train_args
  if bool(args.tpu_type) == bool(args.machine_type):
    ap.error("give exactly one of --tpu-type (TPU slice) or --machine-type (GPU machines)")
  if args.replicas < 1:
    ap.error(f"--replicas={args.replicas} must be >= 1")
  return args


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  spec = job_spec(args)
  if args.dry_run:
    print(json.dumps({"custom_job": spec, "replicas": replica_view(spec)}, indent=2))
    return
  from google.cloud import aiplatform

  aiplatform.init(project=args.project, location=args.region)
  job = aiplatform.CustomJob(
    display_name=spec["display_name"],
    worker_pool_specs=spec["worker_pool_specs"],
    base_output_dir=spec["base_output_dir"],
  )
  job.submit(
    service_account=args.service_account,
    restart_job_on_worker_restart=spec["restart_job_on_worker_restart"],
  )
  print(f"submitted {job.resource_name}")


if __name__ == "__main__":
  main()
