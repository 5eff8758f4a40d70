"""VideoLLM-MoD, the paper's setup: Llama-3-8B-Instruct + SigLIP-L/16 @384, LoRA, MoD r = 0.2.

VideoLLM-MoD (arXiv 2408.16730) on VideoLLM-online's LIVE recipe (showlab/videollm-online,
``models/arguments_live.py`` and ``scripts/ego4d/narration/live1+.sh``):

* LLM: Meta-Llama-3-8B-Instruct (4096 wide, 32 layers, 32 / 8 heads, vocab 128256, rope_theta
  5e5, untied), frozen, with LoRA r = 128, alpha = 256, dropout 0.05 on q, k, v, o, gate, up,
  down and lm_head; the connector is trained fully;
* vision: google/siglip-large-patch16-384 (1024 wide, 24 layers, 16 heads), frozen; 10 tokens
  per frame (pooled token + 24x24 patch grid average-pooled to 3x3); frames at 2 fps, at most
  1200 frames (10 minutes) per sample;
* MoD: LayerExpert routers in every other layer (interleaved), keep ratio r = 0.2 (2 of 10 vision
  tokens per frame), straight-through router weighting;
* optimisation: AdamW lr 2e-4, cosine, 5% warmup, 2 epochs, bf16; global batch 64 (1 per device
  x 8 accumulation x 8 GPUs in the reference). ``train.steps`` = 2 epochs / 64 rows: set it for
  your data (the Ego4D narration stream split gives a few thousand rows).

Both checkpoints are local Hugging Face directories (safetensors; nothing is downloaded):

  mod-jax train --config configs/videollm_mod_llama3_8b.py:llm=/ckpt/Meta-Llama-3-8B-Instruct,vision=/ckpt/siglip-large-patch16-384 \\
      --config.data.source=folder --config.data.dir=/data/ego4d_narration_stream \\
      --config.train.steps=3000 --workdir gs://bucket/videollm_mod_8b

The LLM and SigLIP weights are loaded into the sharded train state at step 0
(``model.init_from`` / ``model.vision.init_from``, checked against the architecture below before
anything is built); the tokenizer is the LLM directory's ``tokenizer.json``. Without the arg the
config still builds (random weights), e.g. for ``mod-jax flops`` or an AOT compile.

Memory plan (the paper's row is 1200 frames x 10 tokens + 4096 text slots = 16,096 tokens): the
step trains from pre-extracted SigLIP features (``data.input = "features"``, as VideoLLM-online
does; ``online`` in the arg runs the frozen tower in the step instead, in bf16, 64 frames at a
time), attention runs on a kernel (``model.attention = "auto"``: splash on TPU, cuDNN on GPU),
the 32 layers are one scanned (dense, MoD) cycle rematerialised with ``save_proj_except_mlpwo``
(every projection output but the down projection's is kept, at the MoD layer's compact length;
the rest is recomputed: 36.2 / 50.5 GiB per v5p chip for MoD / dense, memory ratio 0.718;
``save_proj`` also keeps the down projection, which only the MoD cycle needs, and skips its
recomputation, about 7% of MoD's step FLOPs: 39.2 / 50.5 GiB, 0.776; ``full`` 14.4 / 16.2 GiB,
measured before the adapters were split over fsdp), the frozen base
weights are bf16 while the LoRA adapters, connector and routers stay float32, and the LM head
computes logits 512 slots at a time. The global batch is the reference's 64 rows: one row per
chip on 64 chips (``mod-jax compile --config configs/videollm_mod_llama3_8b.py --topology
v5:4x4x4``); on 8 devices add ``--config.train.grad_accum_steps=8`` (1 row per device x 8
micro-batches, the reference recipe).

Context axis (docs/design.md §6): ``--config.mesh.shape='(1,64,1,4)'`` (data, fsdp, tensor,
context) splits every row over 4 chips by whole frames (300 frames + 1024 text slots each; MoD's
per-frame top-k stays on one chip, attention all-gathers K/V along ``context``), e.g. for a
v5e-256 (16 GiB per chip):

  mod-jax compile --config configs/videollm_mod_llama3_8b.py --topology v5e:16x16 \\
      --config.mesh.shape='(1,64,1,4)' --config.train.remat=full

(measured with ``full``: 9.10 GiB per chip for MoD, 8.76 GiB dense, both fit; README has the
table; the default policy has not been compiled for v5e).
``data.max_frames`` and ``data.max_text`` must be multiples of the context size, and the rows
must be context-chunked (``mod_jax/model/rows.py``), which the data pipeline does for the
mesh's context size (``mod_jax/data/packing.py``: a sample continues from one chunk into the
next), so ``mod-jax train`` takes the same ``--config.mesh.shape``.

Arg: comma-separated ``llm=DIR``, ``vision=DIR`` and optionally ``dense`` (full computation) and
``online`` (frames in, the tower runs in the step).
"""

import os

from mod_jax import presets
from mod_jax.config import base_config, parse_arg

SYSTEM_PROMPT = (
  "A multimodal AI assistant is helping users with some activities. Below is their "
  "conversation, interleaved with the list of video frames received by the "
  "assistant."
)  # videollm-online models/arguments_live.py


def get_config(arg: str | None = None):
  a = parse_arg(
    arg, source="configs/videollm_mod_llama3_8b.py", llm="", vision="", dense=False, online=False
  )
  c = base_config()
  m = c.model
  presets.apply(m, llm="llama3-8b", vision="siglip-l16-384")
  m.dtype = "bfloat16"
  m.param_dtype = "bfloat16"  # frozen base (LoRA); adapters, connector, routers stay float32
  m.attention = "auto"  # splash (TPU) / cudnn (GPU) / blockwise (CPU)
  m.scan_layers = True
  m.tokens_per_frame = 10
  m.init_from = a.llm

  v = m.vision
  v.pool_size = 3
  v.trainable = False
  v.init_from = a.vision
  v.dtype = "bfloat16"
  v.param_dtype = "bfloat16"
  v.frame_chunk = 64

  lo = m.lora
  lo.rank = 128
  lo.alpha = 256.0
  lo.dropout = 0.05
  lo.targets = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
  lo.param_dtype = "float32"

  m.mod.insertion = "none" if a.dense else "interleaved"
  m.mod.keep_ratio = 0.2
  m.mod.selection = "learned"

  d = c.data
  d.input = "frames" if a.online else "features"
  d.fps = 2.0
  d.max_frames = 1200  # 10 minutes at 2 fps (videollm-online max_num_frames)
  d.max_text = 4096  # one interval token per frame + narrations and prompts
  d.system_prompt = SYSTEM_PROMPT
  d.tokenizer = os.path.join(a.llm, "tokenizer.json") if a.llm else ""
  tok = d.tokens
  tok.bos = "<|begin_of_text|>"
  tok.eos = "<|eot_id|>"
  tok.pad = "<|reserved_special_token_0|>"
  tok.vision = "<|reserved_special_token_1|>"

  t = c.train
  t.batch_size = 64
  t.learning_rate = 2e-4
  t.steps = 3000
  t.warmup_steps = 150  # 5%
  t.end_learning_rate_ratio = 0.0
  t.weight_decay = 0.0
  t.grad_clip_norm = 1.0
  t.log_every = 10
  t.checkpoint_every = 500
  t.eval_batches = 64
  t.remat = "save_proj_except_mlpwo"  # "save_proj": ~7% fewer FLOPs, 3 GiB more for MoD
  t.grad_accum_steps = 1  # 64 rows = one per chip on 64 chips; 8 on 8 devices
  t.ce_chunk = 512

  c.mesh.shape = (1, -1, 1, 1)  # (data, fsdp, tensor, context): FSDP over all devices
  return c
