"""Multi-host start-up and preemption: ``jax.distributed`` on every platform the project runs on.

* TPU VMs, GKE (TPU or GPU), Slurm, Open MPI: ``jax.distributed.initialize()`` finds the
  coordinator, the process count and this process's id by itself.
* Vertex AI multi-replica CustomJobs: jax does not read Vertex's ``CLUSTER_SPEC``;
  :func:`cluster_spec_args` translates it (``docs/design.md §7``).
* Anywhere (and in the tests: two local CPU processes): explicit ``coordinator_address``,
  ``num_processes`` and ``process_id``.

Preemption (:class:`Preemption`): a SIGTERM (TPU maintenance event, GKE eviction, Vertex
preemption) must make every process stop at the same step and save there. With several
processes, jax's preemption service catches SIGTERM on any host and
``multihost_utils.reached_preemption_sync_point(step)`` becomes True on all of them at the same
step; a single process has no coordination service, so a SIGTERM handler sets a flag.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("mod_jax")

# Vertex's CLUSTER_SPEC names pools "workerpool0" (the primary replica, 1 machine),
# "workerpool1" (the other replicas), then optional pools 2-3 (reduction/evaluation servers).
_TRAINING_POOLS = ("workerpool0", "workerpool1")


def cluster_spec_args(cluster_spec: str, port: int | None = None) -> dict | None:
  """``jax.distributed.initialize`` arguments from Vertex AI's ``CLUSTER_SPEC`` JSON.

  Processes are numbered pool by pool (``workerpool0`` first, then ``workerpool1``) in the
  order of each pool's address list; the coordinator is the primary replica
  (``workerpool0[0]``). Example::

    {"cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
                 "workerpool1": ["cmle-training-workerpool1-ab-0:2222",
                                 "cmle-training-workerpool1-ab-1:2222"]},
     "environment": "cloud", "task": {"type": "workerpool1", "index": 1}}

    -> {"coordinator_address": "cmle-training-workerpool0-ab-0:2222",
        "num_processes": 3, "process_id": 2}

  Args:
    cluster_spec: the ``CLUSTER_SPEC`` environment variable's value.
    port: coordinator port replacing the one in the spec (None: keep the spec's port).

  Returns:
    ``{"coordinator_address", "num_processes", "process_id"}``, or None for a single-replica job
    (nothing to coordinate).

  Raises:
    ValueError: not JSON, no ``workerpool0``, or a task outside the training pools (named).
  """
  try:
    spec = json.loads(cluster_spec)
    cluster, task = spec["cluster"], spec["task"]
    kind, index = task["type"], int(task["index"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"CLUSTER_SPEC={cluster_spec!r} is not Vertex AI's cluster spec ({e!r}); expected "
      f'{{"cluster": {{"workerpool0": [...], ...}}, "task": {{"type": ..., "index": ...}}}}.'
    ) from None
  if not cluster.get("workerpool0"):
    raise ValueError(f"CLUSTER_SPEC has no workerpool0 (the primary replica): {cluster_spec!r}.")
  if kind not in _TRAINING_POOLS or index >= len(cluster.get(kind, ())):
    raise ValueError(
      f"CLUSTER_SPEC task {kind}[{index}] is not a training replica; mod-jax train runs in "
      f"{_TRAINING_POOLS} (pools 2-3 are parameter/evaluation servers, unused by JAX)."
    )
  sizes = [len(cluster.get(p, ())) for p in _TRAINING_POOLS]
  if sum(sizes) == 1:
    return None
  coordinator = cluster["workerpool0"][0]
  if port is not None:
    coordinator = f"{coordinator.rsplit(':', 1)[0]}:{port}"
  offset = 0 if kind == "workerpool0" else sizes[0]
  return {
    "coordinator_address": coordinator,
    "num_processes": sum(sizes),
    "process_id": offset + index,
  }


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  env=None,
) -> dict:
  """Starts ``jax.distributed`` and returns the arguments it was given.

  Explicit arguments win; otherwise a Vertex AI ``CLUSTER_SPEC`` in ``env`` (default
  ``os.environ``) is translated (:func:`cluster_spec_args`; a single-replica spec, e.g. one
  multi-host TPU slice, leaves it to jax's TPU detection, or runs single-process where there is
  nothing to detect); otherwise jax auto-detects (TPU VM metadata, GKE, Slurm, Open MPI). Must
  run before anything touches a jax device.
  """
  env = os.environ if env is None else env
  given = dict(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  args: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
  if not args and env.get("CLUSTER_SPEC"):
    translated = cluster_spec_args(env["CLUSTER_SPEC"])
    if translated is None:  # one Vertex replica: one host, or one multi-host TPU slice
      try:
        jax.distributed.initialize()  # a TPU slice's hosts find each other from TPU metadata
      except (ValueError, RuntimeError) as e:
        log.debug("one replica, nothing to coordinate: single process (%s)", e)
      return {}
    args = translated
  jax.distributed.initialize(**args)
  return args


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process reaches ``name`` (the coordination service's barrier, not a
  device collective; a no-op in a single process). ``name`` must be unique per run."""
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


class Preemption:
  """Tells every process, at the same step, that the job is being preempted.

  Call :meth:`reached` once per step, with the step number, on every process.
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._multi = jax.distributed.is_initialized() and jax.process_count() > 1
    if not self._multi:  # jax's preemption service handles SIGTERM across processes
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    """True on every process at the same ``step`` once any process got SIGTERM."""
    if self._multi:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._signalled

  def close(self) -> None:
    """Restores the previous SIGTERM handler (single process)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
