"""Compiled memory of attention forward + backward: XLA reference vs blockwise, side by side.

Both paths of :func:`mod_jax.model.attention_ops.attend` are compiled ahead of time for the local
backend (``jax.jit(...).lower(...).compile()`` on ``jax.ShapeDtypeStruct`` inputs: nothing is
allocated or executed) at Llama-3-8B attention width (n = 32 query heads, k = 8 KV heads, h = 128,
bfloat16) for one packed row of L tokens with the causal + segment mask. The step is the
attention's VJP: outputs and dq, dk, dv for a given output cotangent. XLA's
``memory_analysis().temp_size_in_bytes`` (scratch beyond arguments and outputs) is compared.

  python benchmarks/attention_memory.py [--length 16096] [--block_size 512]

The LAST stdout line is one JSON object: ``L``, ``xla_temp_bytes``, ``blockwise_temp_bytes``,
``temp_ratio`` (xla / blockwise), ``xla_compile_s``, ``blockwise_compile_s`` (seconds) and the
shape details.

``--topology v5p:2x2x1`` compiles for one chip of that TPU topology instead (libtpu, no TPU needed)
and adds splash attention (``splash_temp_bytes``, ``splash_compile_s``); if another process holds
libtpu's lockfile, set ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``. On CPU, XLA converts bf16 matmul operands
to float32 and hoists the conversions out of the blockwise loops (q, k and v as float32: about
400 MB at L = 16096), so the TPU figures are the ones to plan a TPU run with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mod_jax.model.attention_ops import attend

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B


def compile_step(
  implementation: str, length: int, block_size: int, backend: str | None = None, sharding=None
):
  """Compiles out, (dq, dk, dv) = VJP of attention; returns (temp bytes, compile seconds).

  ``backend``/``sharding``: the target platform and the (single-device) placement of every input,
  for compiling ahead of time for other hardware; None: the local default device.
  """

  def step(q, k, v, segment_ids, cotangent):
    f = lambda q, k, v: attend(
      q,
      k,
      v,
      segment_ids,
      segment_ids,
      causal=True,
      implementation=implementation,
      block_size=block_size,
      backend=backend,
    )
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cotangent)

  bf16 = jnp.bfloat16
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  args = (
    sds((1, length, HEADS, HEAD_DIM), bf16),
    sds((1, length, KV_HEADS, HEAD_DIM), bf16),
    sds((1, length, KV_HEADS, HEAD_DIM), bf16),
    sds((1, length), jnp.int32),
    sds((1, length, HEADS, HEAD_DIM), bf16),
  )
  start = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  seconds = time.perf_counter() - start
  return int(compiled.memory_analysis().temp_size_in_bytes), seconds


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=16096, help="tokens in the row (L)")
  parser.add_argument("--block_size", type=int, default=512, help="blockwise block (tokens)")
  parser.add_argument(
    "--topology", default=None, help="compile for one chip of this TPU topology, e.g. v5p:2x2x1"
  )
  args = parser.parse_args(argv)
  results = {"L": args.length}
  implementations, backend, sharding = ("xla", "blockwise"), None, None
  if args.topology:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    sharding = NamedSharding(Mesh(np.asarray(devices[:1]), ("chip",)), PartitionSpec())
    implementations, backend = ("xla", "blockwise", "splash"), "tpu"
  for implementation in implementations:
    temp, seconds = compile_step(implementation, args.length, args.block_size, backend, sharding)
    results[f"{implementation}_temp_bytes"] = temp
    results[f"{implementation}_compile_s"] = round(seconds, 2)
    print(
      f"{implementation:>9}: temp {temp / 2**30:8.3f} GiB, compiled in {seconds:.1f} s", flush=True
    )
  results["temp_ratio"] = results["xla_temp_bytes"] / max(results["blockwise_temp_bytes"], 1)
  device = sharding.mesh.devices.flat[0] if sharding else jax.devices()[0]
  results.update(
    backend=backend or jax.default_backend(),
    topology=args.topology,
    device_kind=device.device_kind,
    block_size=args.block_size,
    heads=HEADS,
    kv_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    dtype="bfloat16",
    mask="causal+segment",
  )
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
