"""Embedded default: VideoLLM-MoD (r = 0.2, interleaved) on the procedural stream dataset.

Trains from scratch on CPU in minutes; the procedural clips are generated on first use.

  mod-jax train --config configs/demo.py --workdir /tmp/mod_demo
  mod-jax train --config configs/demo.py:dense --workdir /tmp/mod_demo_dense   # full computation
  mod-jax train --config configs/demo.py --config.model.mod.keep_ratio=0.3 --workdir ...
  mod-jax train --config configs/demo.py:gamma --workdir /tmp/mod_demo_gamma     # γ-MoD

Arg: "" (MoD, learned, r = 0.2, interleaved), "dense", or "gamma" (γ-MoD: shared router,
masked routing, top-C over the row on the interleaved layers — or the layers of
``mod-jax arank`` with ``--config.model.mod.insertion=[...]`` — with C = 0.43·L, the per-layer
compact length of MoD r = 0.2 (96 text + 24 × 2 of 336 slots: matched FLOPs), router CE 0.01
per layer, threshold 0.5 at inference).
"""

from mod_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, source="configs/demo.py", dense=False, gamma=False)
  c = base_config()
  if a.dense:
    c.model.mod.insertion = "none"
  elif a.gamma:
    mod = c.model.mod
    mod.routing = "sequence"
    mod.keep_ratio = (c.data.max_text + 2 * c.data.max_frames) / (
      c.data.max_text + c.data.max_frames * c.model.tokens_per_frame
    )
    mod.router_weighting = "sigmoid"  # the reference weights the update by P(process)
    mod.router_aux_loss_weight = 0.01
  # Enough distinct clips that 600 steps x 8 rows (~4 epochs) measure generalisation, not recall.
  c.data.procedural.num_train_videos = 1000
  c.data.procedural.num_eval_videos = 64
  c.train.eval_batches = 0  # the whole held-out split
  return c
