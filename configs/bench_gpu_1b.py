"""A 1B-class dense vs MoD training step for one GPU: MFU and the MoD / dense step-time ratio.

Llama-3.2-1B's architecture (16 layers, 2048 wide, 32 / 8 heads, vocab 128256, tied embeddings),
trained fully (no LoRA: float32 master weights, bfloat16 compute) from pre-extracted SigLIP-L
features (``data.input = "features"``, as VideoLLM-online trains), rows of 300 frames x 10 tokens +
1096 text slots = 4096 tokens (26.8% text, the paper's proportion), 8 rows per step, attention on
the backend's kernel (``auto``: cuDNN on GPU), scanned layers. MoD is the paper's r = 0.2,
interleaved, learned LayerExpert routers.

  python benchmarks/gpu_step.py                  # uses this config; run on the GPU

Arg: "" (MoD) or "dense". Random weights and batches: this config measures speed, not quality.
"""

from mod_jax import presets
from mod_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, source="configs/bench_gpu_1b.py", dense=False)
  c = base_config()
  m = c.model
  presets.apply(m, llm="llama3.2-1b", vision="siglip-l16-384")
  m.dtype = "bfloat16"
  m.attention = "auto"
  m.attention_block_size = 512
  m.scan_layers = True
  m.tokens_per_frame = 10
  m.vision.trainable = False
  m.vision.param_dtype = "bfloat16"
  m.vision.dtype = "bfloat16"
  m.mod.insertion = "none" if a.dense else "interleaved"
  m.mod.keep_ratio = 0.2
  d = c.data
  d.input = "features"
  d.max_frames = 300
  d.max_text = 1096
  t = c.train
  t.batch_size = 8
  t.remat = "none"
  t.ce_chunk = 512
  t.steps = 100
  t.warmup_steps = 10
  return c
