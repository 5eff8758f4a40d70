"""Command-line flags shared by the ``mod-jax`` commands (absl + ml_collections config files).

``--config configs/demo.py[:arg]`` loads ``get_config(arg)``; ``--config.train.steps=50`` and
similar override any field (big_vision style).
"""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py or configs/demo.py:dense.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
