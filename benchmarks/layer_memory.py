"""Temporaries of one decoder layer's forward + backward at 8B width: xla vs blockwise attention.

Compiles (nothing runs) the gradient of one Llama-3-8B-width ``DecoderLayer`` (d 4096, 32 / 8
heads, MLP 14336, bf16 compute, float32 weights) over one stream-ordered row of L tokens with a
causal + segment mask, once with the materialising ``xla`` attention and once with ``blockwise``,
and prints XLA's temporary bytes for each. Last stdout line: one JSON object.

  python benchmarks/layer_memory.py [--length 16096] [--block_size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from flax import nnx

from configs import videollm_mod_llama3_8b
from mod_jax.model.llm import DecoderLayer


def temp_bytes(model_cfg, length: int, implementation: str, block_size: int) -> dict:
  cfg = model_cfg.copy_and_resolve_references()
  cfg.attention, cfg.attention_block_size = implementation, block_size
  cfg.param_dtype = "float32"
  abstract = nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  x = jax.ShapeDtypeStruct((1, length, cfg.d_model), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def loss(p, x, pos, seg):
    layer = nnx.merge(graphdef, p)
    y = layer(x, pos, seg, rope=None, ordered=True)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  t0 = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids).compile()
  mem = compiled.memory_analysis()
  return {"temp_bytes": int(mem.temp_size_in_bytes), "compile_s": time.perf_counter() - t0}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--length", type=int, default=16096, help="tokens per row (paper: 16,096)")
  ap.add_argument("--block_size", type=int, default=512)
  a = ap.parse_args()
  cfg = videollm_mod_llama3_8b.get_config().model
  out = {"length": a.length, "d_model": cfg.d_model, "block_size": a.block_size}
  for impl in ("xla", "blockwise"):
    r = temp_bytes(cfg, a.length, impl, a.block_size)
    out[f"{impl}_temp_bytes"], out[f"{impl}_compile_s"] = r["temp_bytes"], round(r["compile_s"], 1)
    print(
      f"{impl:10s} temporaries {r['temp_bytes'] / 2**30:8.2f} GiB   compile {r['compile_s']:.1f} s"
    )
  out["temp_ratio"] = out["blockwise_temp_bytes"] / out["xla_temp_bytes"]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
