"""``mod-jax train --config configs/X.py --workdir DIR``: train (or resume), then evaluate."""

from __future__ import annotations

import json
import logging

from absl import app, flags

from mod_jax import flags as mj_flags

_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first (multi-host: TPU pods, GKE, "
  "SLURM; coordinator and process ids come from the environment).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if mj_flags.CONFIG.value is None or mj_flags.WORKDIR.value is None:
    raise app.UsageError("mod-jax train needs --config and --workdir.")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  from mod_jax.train.loop import train_and_evaluate

  out = train_and_evaluate(mj_flags.CONFIG.value, mj_flags.WORKDIR.value)
  first, last = out["first_logged"], out["last_logged"]
  print(
    json.dumps(
      {"first_loss": first and first["loss"], "last_loss": last and last["loss"], **out["eval"]},
      indent=2,
    )
  )
