"""Tiny config for unit tests: a few layers, small frames, short sequences.

  mod-jax train --config configs/tiny.py --workdir /tmp/mod_tiny --config.train.steps=5

Arg: "" (MoD, r = 0.2, interleaved) or "dense".
"""

from mod_jax.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  m = c.model
  m.vocab_size = 128
  m.d_model = 64
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.head_dim = 16
  m.d_ff = 128
  v = m.vision
  v.image_size = 24
  v.patch_size = 4
  v.width = 32
  v.depth = 1
  v.n_heads = 2
  v.mlp_dim = 64
  if arg == "dense":
    m.mod.insertion = "none"
  elif arg:
    raise ValueError(f"configs/tiny.py: unknown arg {arg!r}; use '' or 'dense'.")
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
