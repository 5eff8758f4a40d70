"""``mod-jax train --config configs/X.py --workdir DIR``: train (or resume), then evaluate.

Multi-host: ``--distributed`` on every host (TPU VM, GKE, Slurm: auto-detected; Vertex AI:
``CLUSTER_SPEC``), or explicit ``--coordinator_address/--num_processes/--process_id``. A SIGTERM
saves a checkpoint at a step all processes agree on and exits 0; the same command resumes.

The terminal shows the progress bar, one line per event (checkpoint, evaluation, preemption) and
a final table; library logs (Orbax, JAX, absl) go to ``{workdir}/train.log`` (process 0; other
processes ``train.{i}.log``), or also to the terminal when ``--verbosity`` is given.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from absl import app, flags
from absl import logging as absl_logging

from mod_jax import flags as mj_flags

_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first (multi-host: TPU VMs, GKE, Slurm auto-detected; "
  "Vertex AI's CLUSTER_SPEC translated).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (implies --distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_PROFILE_STEPS = flags.DEFINE_integer(
  "profile_steps",
  0,
  "Trace this many steps (after the first) with jax.profiler into WORKDIR/profile.",
)
_CACHE_DIR = flags.DEFINE_string(
  "compilation_cache_dir",
  None,
  "Persistent XLA compilation cache (default $JAX_COMPILATION_CACHE_DIR if set, else "
  "WORKDIR/compilation_cache; '' disables): a resumed or restarted job skips compiling.",
)


class _TqdmHandler(logging.Handler):
  """Event lines printed above the progress bar."""

  def emit(self, record):
    import tqdm

    tqdm.tqdm.write(self.format(record), file=sys.stdout)


def setup_logging(workdir: str, process_index: int, verbose: bool) -> str:
  """Routes library logs to a file in ``workdir`` and ``mod_jax`` events to the terminal.

  Returns:
    The log file's path (a local temporary file when ``workdir`` is not a local path).
  """
  name = "train.log" if process_index == 0 else f"train.{process_index}.log"
  if "://" in workdir:
    path = os.path.join(tempfile.mkdtemp(prefix="mod_jax_"), name)
  else:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
  file_handler = logging.FileHandler(path)
  file_handler.setFormatter(
    logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s")
  )
  root = logging.getLogger()
  terminal = [h for h in root.handlers if verbose]  # absl's stderr handler, kept if asked
  root.handlers = [file_handler, *terminal]
  root.setLevel(logging.INFO)
  if not verbose:
    absl_logging.set_verbosity(absl_logging.INFO)  # to the file
  logging.captureWarnings(True)
  events = logging.getLogger("mod_jax")
  events.setLevel(logging.DEBUG)
  if process_index == 0:
    handler = _TqdmHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    events.handlers = [handler]
  return path


def _table(out: dict) -> str:
  first, last, ev = out["first_logged"], out["last_logged"], out["eval"]
  rows = [("steps", f"{out['steps']}"), ("compile (s)", f"{out['compile_seconds']:.1f}")]
  if first and last:
    rows.append(("train loss", f"{first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f}"))
    rows.append(("tokens/s", f"{last['tokens_per_second']:.0f}"))
  counts = ("text_tokens", "frame_decisions")
  rows += [(f"eval {k}", f"{int(v)}" if k in counts else f"{v:.4f}") for k, v in ev.items()]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if mj_flags.CONFIG.value is None or mj_flags.WORKDIR.value is None:
    raise app.UsageError("mod-jax train needs --config and --workdir.")
  workdir = mj_flags.WORKDIR.value
  import jax

  from mod_jax.train import distributed

  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value or any(v is not None for v in explicit):
    distributed.initialize(*explicit)
  log_path = setup_logging(workdir, jax.process_index(), flags.FLAGS["verbosity"].present > 0)
  cache = _CACHE_DIR.value
  if cache is None:
    cache = (
      os.environ.get("JAX_COMPILATION_CACHE_DIR") or workdir.rstrip("/") + "/compilation_cache"
    )
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  from mod_jax.train.loop import train_and_evaluate

  log = logging.getLogger("mod_jax")
  out = train_and_evaluate(mj_flags.CONFIG.value, workdir, profile_steps=_PROFILE_STEPS.value)
  if "stopped_at" in out:
    log.info(
      "%s at step %d; checkpoint saved. Run the same command again to resume. Logs: %s",
      "preempted (SIGTERM)" if out.get("preempted") else "stopped",
      out["stopped_at"],
      log_path,
    )
    if out.get("preempted"):
      # The checkpoint is committed on every process: leave now, inside the grace period
      # (GKE: 30 s), rather than spend seconds tearing down grain threads and the runtime.
      distributed.barrier("mod_jax/preempted")
      logging.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(0)
    return 0
  if jax.process_index() == 0:
    print(f"\nmod-jax train: {workdir}\n{_table(out)}\n  logs: {log_path}")
  return 0
