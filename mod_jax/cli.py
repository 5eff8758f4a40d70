"""``mod-jax`` command line: ``mod-jax <command> --config configs/X.py[:arg] [--config.a.b=v] ...``.

Commands:
  train   train (or resume) a model:  mod-jax train --config configs/demo.py --workdir DIR

Configs are Python files with ``get_config(arg)`` (big_vision style); any field can be
overridden on the command line, e.g. ``--config.train.steps=50``.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")


def _train(argv):
  del argv
  from mod_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("mod-jax train needs --config and --workdir.")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  out = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  first, last = out["first_logged"], out["last_logged"]
  print(json.dumps({"first_loss": first and first["loss"], "last_loss": last and last["loss"],
                    "data": out["data"], **out["eval"]}, indent=2))


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(__doc__)
    sys.exit(2 if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help") else 0)
  command = sys.argv.pop(1)
  app.run({"train": _train}[command])


if __name__ == "__main__":
  main()
