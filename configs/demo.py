"""Embedded default: VideoLLM-MoD (r = 0.2, interleaved) on the procedural stream dataset.

Trains from scratch on CPU in minutes; the procedural clips are generated on first use.

  mod-jax train --config configs/demo.py --workdir /tmp/mod_demo
  mod-jax train --config configs/demo.py:dense --workdir /tmp/mod_demo_dense   # full computation
  mod-jax train --config configs/demo.py --config.model.mod.keep_ratio=0.3 --workdir ...

Arg: "" (MoD, learned, r = 0.2, interleaved) or "dense".
"""

from mod_jax.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  if arg == "dense":
    c.model.mod.insertion = "none"
  elif arg:
    raise ValueError(f"configs/demo.py: unknown arg {arg!r}; use '' or 'dense'.")
  return c
