"""A dense text-only Llama training step, mod_jax vs transformers/PyTorch, on the same weights.

One process builds the decoder of ``configs/tiny.py:dense`` resized to the benchmark shape
(default 4 layers, d_model 256, 4 heads / 2 KV heads of 64, SwiGLU 768, vocabulary 4096, float32)
with ``mod_jax.api.init_model``, copies its initial weights into a transformers
``LlamaForCausalLM`` through the checkpoint converter's table (``mod_jax.convert.hf.llm_specs``,
the mapping ``mod-jax convert`` exports with), and runs the same step on both sides: forward over
a batch of random tokens (default 4 × 768), mean token cross-entropy over every position, backward,
AdamW update (same learning rate, betas, eps and decoupled weight decay; float32 throughout).

* mod_jax: ``Decoder.text_logits`` (the model's real layers: scanned stack, the attention
  dispatcher, RoPE tables shared by all layers) + ``optax.softmax_cross_entropy_with_integer_labels``
  + ``optax.adamw``, one ``jax.jit`` with the parameters and optimizer state donated.
  Variants (each its own compiled step on its own copy of the same weights): ``blockwise``
  (the CPU default, ``model.attention="auto"``), ``xla`` (the reference attention, full scores)
  and ``noscan`` (blockwise, ``model.scan_layers=False``).
* transformers: ``LlamaForCausalLM(LlamaConfig)`` (``attn_implementation`` sdpa by default),
  ``model.train()``, ``loss.backward()``, ``torch.optim.AdamW.step()``, with
  ``torch.set_num_threads`` equal to the host's cores (what XLA:CPU uses) and
  ``OMP_WAIT_POLICY=PASSIVE`` unless set (spinning OpenMP threads collapse on a loaded host).

First the step-0 losses (same weights, same batch) are printed and must agree; every side then
runs ``--warmup`` untimed steps in lockstep (compiles; their losses are compared as well, which
checks that the two optimizers agree). Then ``--rounds`` rounds time one step of every side, in
alternating order (torch, variants..., then reversed), and each variant's time is divided by the
torch step of the same round: the median of these per-round ratios is reported (robust to the
load of a shared machine, which hits both sides of a round alike), with the median step times.

  python benchmarks/vs_transformers.py [--rounds 15] [--batch 4] [--seq 768] [--layers 4]
      [--d_model 256] [--heads 4] [--kv_heads 2] [--head_dim 64] [--d_ff 768] [--vocab 4096]
      [--variants blockwise,xla,noscan] [--block_size 128] [--profile]

``--profile`` adds paired rounds of the parts of the default variant against their PyTorch
counterparts: forward loss only, forward + backward (no update), the optimizer update alone, and
one attention call (forward + backward at the benchmark shape) per attention path vs
``torch.nn.functional.scaled_dot_product_attention``; reported under ``"profile"``.

The LAST stdout line is one JSON object: ``jax_step_s`` / ``torch_step_s`` (median step seconds of
the default variant and of torch), ``ratio`` (median per-round ratio jax / torch), ``variants``
(the same per variant), ``loss0_jax`` / ``loss0_torch`` / ``loss0_abs_diff``, ``shape``,
``threads`` and the machine load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# PyTorch's OpenMP threads spin at barriers by default; on a shared (loaded) host a descheduled
# spinner stalls the other thread and a 2-thread torch step gets ~3.5x slower than with 1 thread.
# Passive waiting makes torch degrade like XLA's thread pool does (set it to ACTIVE to compare).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from mod_jax import api
from mod_jax.config import base_config, validate
from mod_jax.convert import hf
from mod_jax.model import attention_ops
from mod_jax.model.factory import build_model

VARIANTS = {  # name -> model config overrides
  "blockwise": {"attention": "auto", "scan_layers": True},  # the CPU default
  "xla": {"attention": "xla", "scan_layers": True},
  "noscan": {"attention": "auto", "scan_layers": False},
}
LOSS_ATOL = 1e-4  # step-0 loss agreement (float32, ~ln(vocab) ≈ 8.3)


def bench_config(args, **overrides):
  """``base_config()`` as ``configs/tiny.py:dense`` does it, at the benchmark's sizes."""
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.n_layers = args.vocab, args.d_model, args.layers
  m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff = args.heads, args.kv_heads, args.head_dim, args.d_ff
  m.mod.insertion = "none"
  m.dtype = m.param_dtype = "float32"
  if args.block_size:
    m.attention_block_size = args.block_size
  for k, v in overrides.items():
    setattr(m, k, v)
  v = m.vision  # not used by a text-only step; kept small so init is cheap
  v.image_size, v.patch_size, v.width, v.depth, v.n_heads, v.mlp_dim = 24, 4, 32, 1, 2, 64
  validate(c)
  return c


def _median_ratio(a, b):
  return statistics.median(x / y for x, y in zip(a, b))


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ============================================================================================ jax
class JaxSide:
  """One mod_jax variant: the decoder's graph, its own copy of the weights, a jitted AdamW step."""

  def __init__(self, name, args, params, tx):
    self.name = name
    cfg = bench_config(args, **VARIANTS[name])
    self.attention = attention_ops.resolve_implementation(cfg.model.attention)
    abstract = nnx.eval_shape(lambda: build_model(cfg.model, rngs=0))
    self.graphdef, _, self.rest = nnx.split(abstract.llm, nnx.Param, ...)
    self.params = jax.tree.map(jnp.copy, params)
    self.opt_state = tx.init(self.params)
    self.tx = tx
    self.loss = jax.jit(self.loss_fn)
    self.step = jax.jit(self._step, donate_argnums=(0, 1))
    self.times: list[float] = []
    self.losses: list[float] = []

  def loss_fn(self, params, tokens_bt, targets_bt):
    """Mean token cross-entropy of the text-only causal LM, float32 []."""
    decoder = nnx.merge(self.graphdef, params, self.rest)
    logits_btv = decoder.text_logits(tokens_bt)
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt).mean()

  def _step(self, params, opt_state, tokens_bt, targets_bt):
    loss, grads = jax.value_and_grad(self.loss_fn)(params, tokens_bt, targets_bt)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def run(self, tokens, targets) -> float:
    start = time.perf_counter()
    self.params, self.opt_state, loss = self.step(self.params, self.opt_state, tokens, targets)
    jax.block_until_ready((self.params, self.opt_state, loss))
    elapsed = time.perf_counter() - start
    self.losses.append(float(loss))
    return elapsed


# ========================================================================================== torch
class TorchSide:
  """``LlamaForCausalLM`` from the same config and weights, ``torch.optim.AdamW``."""

  def __init__(self, args, model_cfg, decoder, opt):
    hf_cfg = hf.llm_hf_config(model_cfg)
    hf_cfg.update(use_cache=False, attn_implementation=args.torch_attention)
    config = transformers.LlamaConfig(**hf_cfg)
    self.model = transformers.LlamaForCausalLM(config).float()
    state = nnx.state(decoder, nnx.Param)

    def get(path):
      node = state
      for k in path:
        node = node[k]
      return node[...]

    weights = {
      name: torch.from_numpy(np.array(x, np.float32))
      for name, x in hf.hf_tensors(get, hf.llm_specs(model_cfg))
    }
    self.model.load_state_dict(weights, strict=True)
    self.attention = self.model.config._attn_implementation
    self.model.train()
    self.opt = torch.optim.AdamW(
      self.model.parameters(),
      lr=opt["lr"],
      betas=opt["betas"],
      eps=opt["eps"],
      weight_decay=opt["weight_decay"],
    )
    self.vocab = model_cfg.vocab_size
    self.times: list[float] = []
    self.losses: list[float] = []

  def loss(self, tokens, targets):
    logits = self.model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))

  def _step(self, tokens, targets):
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(tokens, targets)
    loss.backward()
    self.opt.step()
    return loss

  def run(self, tokens, targets) -> float:
    start = time.perf_counter()
    loss = self._step(tokens, targets)
    elapsed = time.perf_counter() - start
    self.losses.append(float(loss.detach()))
    return elapsed


# ======================================================================================== profile
def profile(args, jax_side: JaxSide, torch_side: TorchSide, tokens, targets, tt, tg, rounds):
  """Paired rounds of the parts of a step (forward; forward + backward; optimizer update; one
  attention call forward + backward per attention path). Returns {part: {jax_s, torch_s, ratio}}.
  """
  params = jax_side.params
  fwd = jax.jit(jax_side.loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(jax_side.loss_fn))
  grads = fwd_bwd(params, tokens, targets)[1]
  tx = jax_side.tx
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  upd_state = {"p": jax.tree.map(jnp.copy, params), "s": opt_state}

  def jax_update():
    upd_state["p"], upd_state["s"] = update(upd_state["p"], upd_state["s"], grads)
    jax.block_until_ready(upd_state["p"])

  model = torch_side.model

  def torch_fwd():
    with torch.no_grad():
      torch_side.loss(tt, tg)

  def torch_fwd_bwd():
    model.zero_grad(set_to_none=True)
    torch_side.loss(tt, tg).backward()

  torch_fwd_bwd()  # leaves gradients for the update-only timing

  def torch_update():
    torch_side.opt.step()

  b, t, n, kh, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
  k = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32))
  v = jnp.asarray(rng.standard_normal((b, t, kh, h), np.float32))
  seg = jnp.ones((b, t), jnp.int32)

  def attn_step(impl):
    def f(q, k, v):
      o = attention_ops.attend(
        q, k, v, seg, seg, causal=True, implementation=impl, block_size=args.block_size or 128
      )
      return jnp.sum(o * o)

    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(g(q, k, v))

  # transformers' sdpa path: [b, n, t, h] with k/v repeated to n heads (repeat_kv), causal.
  tq = torch.randn(b, n, t, h, requires_grad=True)
  tk = torch.randn(b, kh, t, h, requires_grad=True)
  tv = torch.randn(b, kh, t, h, requires_grad=True)

  def torch_attn():
    kr = tk.repeat_interleave(n // kh, dim=1)
    vr = tv.repeat_interleave(n // kh, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(tq, kr, vr, is_causal=True)
    (o * o).sum().backward()
    tq.grad = tk.grad = tv.grad = None

  def jax_call(fn):
    return lambda: jax.block_until_ready(fn(params, tokens, targets))

  parts = {
    "forward": (jax_call(fwd), torch_fwd),
    "forward_backward": (jax_call(fwd_bwd), torch_fwd_bwd),
    "adamw_update": (jax_update, torch_update),
    "attention_fwd_bwd_blockwise": (attn_step("blockwise"), torch_attn),
    "attention_fwd_bwd_xla": (attn_step("xla"), torch_attn),
  }
  out = {}
  for name, (jf, tf) in parts.items():
    jf(), tf()  # compile / warm up
    jt, tt_ = [], []
    for r in range(rounds):
      pair = [(jt, jf), (tt_, tf)]
      for times, fn in pair if r % 2 == 0 else pair[::-1]:
        times.append(_timed(fn))
    out[name] = {
      "jax_s": statistics.median(jt),
      "torch_s": statistics.median(tt_),
      "ratio": _median_ratio(jt, tt_),
    }
    print(
      f"profile {name:28s} jax {out[name]['jax_s'] * 1e3:8.1f} ms  torch "
      f"{out[name]['torch_s'] * 1e3:8.1f} ms  ratio {out[name]['ratio']:.2f}",
      flush=True,
    )
  return out


# =========================================================================================== main
def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=15, help="timed rounds (one step per side)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compile)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=768, help="tokens per row")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--d_ff", type=int, default=768)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument(
    "--block_size", type=int, default=0, help="model.attention_block_size (0: the config's default)"
  )
  parser.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help=f"comma-separated mod_jax variants; the first is the headline ({', '.join(VARIANTS)})",
  )
  parser.add_argument("--torch_attention", default="sdpa", help="transformers attn_implementation")
  parser.add_argument(
    "--threads",
    type=int,
    default=len(os.sched_getaffinity(0)),
    help="torch.set_num_threads (default: the cores XLA:CPU uses)",
  )
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--weight_decay", type=float, default=0.01)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--profile", action="store_true", help="time the parts of a step too")
  args = parser.parse_args()
  names = [s for s in args.variants.split(",") if s]
  unknown = [s for s in names if s not in VARIANTS]
  if not names or unknown:
    parser.error(f"--variants {args.variants!r}: unknown {unknown}; choose from {list(VARIANTS)}")
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  load_start = os.getloadavg()

  # ---------------------------------------------------------------- same weights, same batch
  cfg = bench_config(args, **VARIANTS[names[0]])
  decoder = api.init_model(cfg.model, seed=args.seed).llm
  opt = {"lr": args.lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": args.weight_decay}
  tx = optax.adamw(
    opt["lr"],
    b1=opt["betas"][0],
    b2=opt["betas"][1],
    eps=opt["eps"],
    weight_decay=opt["weight_decay"],
  )
  params = nnx.state(decoder, nnx.Param)
  torch_side = TorchSide(args, cfg.model, decoder, opt)
  rng = np.random.default_rng(args.seed)
  seq_np = rng.integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int64)
  tokens_np, targets_np = seq_np[:, :-1], seq_np[:, 1:]
  tokens, targets = jnp.asarray(tokens_np, jnp.int32), jnp.asarray(targets_np, jnp.int32)
  tt, tg = torch.from_numpy(tokens_np.copy()), torch.from_numpy(targets_np.copy())
  t0 = time.perf_counter()
  sides = [JaxSide(name, args, params, tx) for name in names]
  del decoder, params

  # ---------------------------------------------------------------- step-0 loss agreement
  with torch.no_grad():
    loss0_torch = float(torch_side.loss(tt, tg))
  loss0 = {s.name: float(s.loss(s.params, tokens, targets)) for s in sides}
  compile_s = time.perf_counter() - t0
  for name, value in loss0.items():
    print(
      f"step-0 loss: mod_jax[{name}] {value:.7f}  transformers {loss0_torch:.7f}  "
      f"|diff| {abs(value - loss0_torch):.2e}",
      flush=True,
    )
  worst = max(abs(v - loss0_torch) for v in loss0.values())
  if worst > LOSS_ATOL:
    raise SystemExit(
      f"step-0 losses differ by {worst:.3e} > {LOSS_ATOL}: the two models are not "
      f"the same function; fix the weight mapping before timing."
    )

  # ---------------------------------------------------------------- warm-up (compile), lockstep
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    torch_side.run(tt, tg)
    for s in sides:
      s.run(tokens, targets)
  compile_s += time.perf_counter() - t0
  for s in sides:
    diffs = [abs(a - b) for a, b in zip(s.losses, torch_side.losses)]
    print(
      f"warm-up losses {s.name}: {[round(x, 5) for x in s.losses]} vs torch "
      f"{[round(x, 5) for x in torch_side.losses]} (max |diff| {max(diffs, default=0):.2e})"
    )

  # ---------------------------------------------------------------- paired, alternating rounds
  everyone = [torch_side] + sides
  for r in range(args.rounds):
    for side in everyone if r % 2 == 0 else everyone[::-1]:
      side.times.append(side.run(tt, tg) if side is torch_side else side.run(tokens, targets))
  torch_s = statistics.median(torch_side.times)
  variants = {}
  for s in sides:
    variants[s.name] = {
      "jax_step_s": statistics.median(s.times),
      "torch_step_s": torch_s,
      "ratio": _median_ratio(s.times, torch_side.times),
      "ratio_min": min(s.times) / min(torch_side.times),
      "attention": s.attention,
      "scan_layers": VARIANTS[s.name]["scan_layers"],
      "loss0": loss0[s.name],
      "times_s": [round(x, 4) for x in s.times],
      "max_loss_diff_vs_torch": max(abs(a - b) for a, b in zip(s.losses, torch_side.losses)),
    }
    print(
      f"mod_jax[{s.name:9s}] step {variants[s.name]['jax_step_s'] * 1e3:8.1f} ms   torch "
      f"{torch_s * 1e3:8.1f} ms   median per-round ratio {variants[s.name]['ratio']:.3f}"
    )
  n_params = sum(p.numel() for p in torch_side.model.parameters())
  head = variants[names[0]]
  result = {
    "jax_step_s": head["jax_step_s"],
    "torch_step_s": torch_s,
    "ratio": head["ratio"],
    "headline_variant": names[0],
    "variants": variants,
    "loss0_jax": loss0[names[0]],
    "loss0_torch": loss0_torch,
    "loss0_abs_diff": abs(loss0[names[0]] - loss0_torch),
    "shape": {
      "batch": args.batch,
      "seq": args.seq,
      "layers": args.layers,
      "d_model": args.d_model,
      "heads": args.heads,
      "kv_heads": args.kv_heads,
      "head_dim": args.head_dim,
      "d_ff": args.d_ff,
      "vocab": args.vocab,
      "block_size": cfg.model.attention_block_size,
      "params": n_params,
      "dtype": "float32",
    },
    "torch_attention": torch_side.attention,
    "torch_times_s": [round(x, 4) for x in torch_side.times],
    "threads": args.threads,
    "torch_threads": torch.get_num_threads(),
    "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
    "rounds": args.rounds,
    "warmup": args.warmup,
    "compile_s": compile_s,
    "versions": {
      "jax": jax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
    },
    "cpu_count": os.cpu_count(),
    "loadavg_start": load_start,
    "loadavg_end": os.getloadavg(),
  }
  if args.profile:
    result["profile"] = profile(args, sides[0], torch_side, tokens, targets, tt, tg, args.rounds)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
