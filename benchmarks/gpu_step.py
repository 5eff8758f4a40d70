"""GPU checks in one run: cuDNN attention against XLA, MFU of a 1B-class step, MoD / dense time.

Three measurements, printed as they finish; the LAST stdout line is one JSON object:

1. ``attention``: every attention path (``cudnn``, ``blockwise``, and ``xla`` in bf16) against the
   XLA path on the same bf16 inputs upcast to float32, in values and gradients (of
   ``sum(out · cotangent)`` over non-padding queries), on packed rows with padding and GQA at the
   benchmark config's head shape; max absolute errors and the forward + backward time of each.
   bf16 rounding of the output alone is ~4e-3 at these magnitudes, so cuDNN "equals" XLA when its
   error is of the order of XLA-in-bf16's (``xla_bf16`` row).
2. ``dense`` and ``mod``: the real training step (``mod_jax.train.sharding.jit_train_step``, as the
   train loop runs it) of the config and of its dense counterpart, compiled, warmed up and timed in
   alternating order (dense, MoD, MoD, dense, ...). MFU = model FLOPs / step time / peak, model
   FLOPs being the analytic matmul FLOPs of the step (``mod_jax.analysis.flops.analytic_flops``
   ``products``: forward + backward, attention included, rematerialisation not counted, the
   PaLM convention); peak defaults to the H100/H200 SXM dense bf16 figure, 989 TFLOP/s.
3. ``time_ratio``: MoD / dense median step time, and the paired median of per-round ratios.

  python benchmarks/gpu_step.py [--config configs/bench_gpu_1b.py] [--reps 10] [--warmup 2]
                                [--peak_tflops 989] [--attention_length 4096] [--set train.batch_size=4 ...]

On a CPU it runs too (cuDNN skipped), which is how the script is checked before a GPU is lent.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from mod_vs_dense import Side, load_config, random_batch

from mod_jax.analysis import flops
from mod_jax.config import validate
from mod_jax.model.attention_ops import attend


def set_fields(config, assignments):
  """Applies ``a.b.c=value`` overrides (values parsed as Python literals, else strings)."""
  for item in assignments:
    path, _, raw = item.partition("=")
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
      node = node[name]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node[leaf] = value


def _timed(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def attention_check(config, *, rows: int = 2, length: int = 4096, reps: int = 5) -> dict:
  """cudnn / blockwise / xla-in-bf16 against xla in float32 on packed bf16 rows (module doc)."""
  m = config.model
  n, kh, h = m.n_heads, m.n_kv_heads, m.head_dim
  rng = np.random.default_rng(0)
  q, k, v = (
    jnp.asarray(rng.standard_normal((rows, length, heads, h)), jnp.bfloat16)
    for heads in (n, kh, kh)
  )
  ct = jnp.asarray(rng.standard_normal((rows, length, n, h)), jnp.float32)
  # Row 0: three packed samples then padding; row 1: one sample filling most of the row.
  cuts = [(0.4, 0.75, 0.9), (0.95,)]
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    bounds = [0] + [int(c * length) for c in cuts[r % 2]]
    for i in range(len(bounds) - 1):
      seg[r, bounds[i] : bounds[i + 1]] = i + 1
  seg = jnp.asarray(seg)
  valid = (seg != 0)[:, :, None, None]

  def loss_fn(implementation, dtype):
    def loss(q, k, v):
      out = attend(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        seg,
        seg,
        causal=True,
        implementation=implementation,
        block_size=m.attention_block_size,
      )
      return jnp.sum(out.astype(jnp.float32) * ct * valid), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  with jax.default_matmul_precision("highest"):  # no TF32 in the reference
    (_, ref), ref_grads = loss_fn("xla", jnp.float32)(q, k, v)
  ref = np.asarray(ref)[np.asarray(seg) != 0]
  paths = [("xla_bf16", "xla"), ("blockwise", "blockwise")]
  if jax.default_backend() == "gpu":
    paths.append(("cudnn", "cudnn"))
  out: dict = {"shape": {"rows": rows, "length": length, "heads": n, "kv_heads": kh, "head_dim": h}}
  for name, implementation in paths:
    fn = loss_fn(implementation, jnp.bfloat16)
    try:
      (_, o), grads = fn(q, k, v)
      o = np.asarray(o.astype(jnp.float32))[np.asarray(seg) != 0]
      out[name] = {
        "out_max_abs_err": float(np.max(np.abs(o - ref))),
        **{
          f"d{x}_max_abs_err": float(
            np.max(np.abs(np.asarray(g, np.float32) - np.asarray(r, np.float32)))
          )
          for x, g, r in zip("qkv", grads, ref_grads)
        },
        "fwd_bwd_ms": _timed(fn, q, k, v, reps=reps) * 1e3,
      }
    except Exception as e:  # noqa: BLE001 - reported, the other paths still run
      out[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    print(f"attention {name}: {out[name]}", flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--config", default=os.path.join(root, "configs", "bench_gpu_1b.py"))
  parser.add_argument("--set", nargs="*", default=[], help="config overrides, a.b.c=value")
  parser.add_argument("--reps", type=int, default=10, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak")
  parser.add_argument("--attention_length", type=int, default=4096, help="0: skip the check")
  args = parser.parse_args()

  config = load_config(args.config)
  set_fields(config, args.set)
  validate(config, 1)
  result: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}
  result["jax"] = jax.__version__
  if args.attention_length:
    result["attention"] = attention_check(config, length=args.attention_length)

  batch = jax.device_put(random_batch(config))
  sides = {}
  for name, c in (("dense", flops.dense_counterpart(config)), ("mod", config)):
    start = time.perf_counter()
    side = Side(c, batch, xla_flops=False)
    sides[name] = side
    a = flops.analytic_flops(c)
    result[name] = {
      "compile_s": time.perf_counter() - start,
      "model_tflop_per_step": a["products"] / 1e12,
      "analytic_tflop_per_step": a["total"] / 1e12,
      "peak_gib": side.xla["peak_bytes"] / 2**30,
      "temp_gib": side.xla["temp_bytes"] / 2**30,
    }
    print(f"{name}: compiled {result[name]}", flush=True)
  for _ in range(args.warmup):
    for side in sides.values():
      side.run(batch)
  order = list(sides.values())
  for r in range(args.reps):
    for side in order if r % 2 == 0 else order[::-1]:
      side.times.append(side.run(batch))
  tokens = config.train.batch_size * (
    config.data.max_text + config.data.max_frames * config.model.tokens_per_frame
  )
  for name, side in sides.items():
    step = statistics.median(side.times)
    model_flops = result[name]["model_tflop_per_step"] * 1e12
    result[name].update(
      step_ms=step * 1e3,
      step_times_ms=[round(x * 1e3, 2) for x in side.times],
      tokens_per_s=tokens / step,
      model_tflops_per_s=model_flops / step / 1e12,
      mfu=model_flops / step / (args.peak_tflops * 1e12),
    )
    print(f"{name}: {result[name]['step_ms']:.1f} ms, MFU {result[name]['mfu']:.3f}", flush=True)
  dense, mod = sides["dense"], sides["mod"]
  result.update(
    time_ratio=statistics.median(mod.times) / statistics.median(dense.times),
    time_ratio_paired=statistics.median(a / b for a, b in zip(mod.times, dense.times)),
    model_flops_ratio=result["mod"]["model_tflop_per_step"]
    / result["dense"]["model_tflop_per_step"],
    memory_ratio=result["mod"]["peak_gib"] / result["dense"]["peak_gib"],
    tokens_per_step=tokens,
    peak_tflops=args.peak_tflops,
    config=os.path.relpath(args.config, root),
    overrides=args.set,
    reps=args.reps,
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
