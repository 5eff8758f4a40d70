"""Command-line flags shared by the ``mod-jax`` commands (absl + ml_collections config files).

``--config configs/demo.py[:arg]`` loads ``get_config(arg)``; ``--config.train.steps=50`` and
similar override any field (big_vision style).
"""

from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/demo.py or configs/demo.py:dense.", lock_config=True
)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")


def config_from(argv, command: str, example: str):
  """The ``--config`` of a command that takes no positional arguments.

  Raises:
    app.UsageError: positional arguments, or no ``--config`` (the message names ``example``).
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if CONFIG.value is None:
    raise app.UsageError(f"mod-jax {command} needs --config, e.g. --config {example}.")
  return CONFIG.value
