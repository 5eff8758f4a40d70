"""The paper's proportions at a CPU-sized width: dense vs MoD step benchmark config.

VideoLLM-MoD's efficiency claims (docs/design.md §1.1: 0.6x training FLOPs, ~30% less memory, ~42% less
time at r = 0.2, interleaved) hold for a 32-layer LLM on long, vision-dominated streams. This
config keeps those proportions: 32 decoder layers; rows of 64 frames x 10 tokens and 128 text
slots (16.7% text: one interval token per frame plus narrations); r = 0.2 interleaved with the
learned LayerExpert; a frozen vision tower (VideoLLM-online freezes SigLIP; here a small one, as
its features would be pre-extracted). The width is narrow (d_model 64) so that a training step
runs on 2 CPU cores in about a second; at this width attention (quadratic in the sequence)
outweighs the per-token projections, unlike an 8B model.

  mod-jax flops --config configs/bench_paper.py
  python benchmarks/mod_vs_dense.py            # uses this config

Arg: "" (MoD) or "dense". No data: the benchmark feeds random batches in the slot layout.
"""

from mod_jax import presets
from mod_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, source="configs/bench_paper.py", dense=False)
  c = base_config()
  m = c.model
  presets.apply(m, llm="narrow-32l", vision="narrow")
  m.vision.trainable = False
  m.mod.insertion = "none" if a.dense else "interleaved"
  m.mod.keep_ratio = 0.2
  d = c.data
  d.max_frames = 64
  d.max_text = 128
  t = c.train
  t.batch_size = 2
  t.steps = 100
  t.warmup_steps = 10
  return c
