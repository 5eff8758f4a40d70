"""Embedded default: VideoLLM-MoD (r = 0.2, interleaved) on the procedural stream dataset.

Trains from scratch on CPU in minutes; the procedural clips are generated on first use.

  mod-jax train --config configs/demo.py --workdir /tmp/mod_demo
  mod-jax train --config configs/demo.py:dense --workdir /tmp/mod_demo_dense   # full computation
  mod-jax train --config configs/demo.py --config.model.mod.keep_ratio=0.3 --workdir ...

Arg: "" (MoD, learned, r = 0.2, interleaved) or "dense".
"""

from mod_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, source="configs/demo.py", dense=False)
  c = base_config()
  if a.dense:
    c.model.mod.insertion = "none"
  # Enough distinct clips that 600 steps x 8 rows (~4 epochs) measure generalisation, not recall.
  c.data.procedural.num_train_videos = 1000
  c.data.procedural.num_eval_videos = 64
  c.train.eval_batches = 0  # the whole held-out split
  return c
