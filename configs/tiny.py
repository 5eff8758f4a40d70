"""Tiny config for unit tests: a few layers, small frames, short sequences.

  mod-jax train --config configs/tiny.py --workdir /tmp/mod_tiny --config.train.steps=5

Arg: "" (MoD, r = 0.2, interleaved) or "dense".
"""

from mod_jax import presets
from mod_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, source="configs/tiny.py", dense=False)
  c = base_config()
  m = c.model
  presets.apply(m, llm="tiny", vision="tiny")
  if a.dense:
    m.mod.insertion = "none"
  d = c.data
  d.max_frames = 8
  d.max_text = 64
  d.num_packing_bins = 4
  p = d.procedural
  p.num_train_videos = 8
  p.num_eval_videos = 4
  p.seconds = 6.0
  p.resolution = 32
  t = c.train
  t.steps = 8
  t.batch_size = 4
  t.warmup_steps = 2
  t.log_every = 2
  t.checkpoint_every = 4
  t.eval_batches = 2
  return c
