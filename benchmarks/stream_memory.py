"""Memory of the streaming per-frame step alone, per chip: are the KV caches updated in place?

  nice -n 10 python benchmarks/stream_memory.py --config configs/videollm_mod_llama3_8b.py \\
      --topology v5:4x4x4          # ~1 min on the 2-core host (libtpu, the ``tpu`` extra)
  python benchmarks/stream_memory.py --config configs/tiny.py   # the local devices

Compiles only ``mod_jax.analysis.compile.compile_stream`` (the engine's ``streaming._step``: one
interval token + one frame, caches for ``data.max_frames`` frames and ``data.max_text`` text
entries, donated and replicated), exactly as ``mod-jax compile`` does for its ``stream_*``
fields, without the train steps (which take 10-30 minutes at 8B). Set
``XLA_FLAGS=--xla_dump_to=DIR`` for XLA's buffer report (``*jit__step*memory-usage-report.txt``,
``*buffer-assignment.txt``). The LAST stdout line is one JSON object: ``argument_bytes``,
``output_bytes``, ``alias_bytes``, ``temp_bytes``, ``peak_bytes`` (per chip: arguments + outputs
− aliased + temporaries), ``cache_bytes`` (every field of every stack's KV cache: what the step
donates, so ``alias_bytes`` should equal it), ``largest_layer_kv_bytes`` (K and V of the
largest layer's cache: the size of the copy a non-in-place write makes), ``cache_sizes`` (slots
per layer, distinct values), ``compile_s``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mod_jax.analysis import compile as aot
from mod_jax.config import validate
from mod_jax.infer import streaming
from mod_jax.model.factory import build_model
from mod_jax.model.mod import RoutingPlan
from mod_jax.train import sharding


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/tiny.py", help="config file (get_config()).")
  p.add_argument("--arg", default=None, help="the config's arg string.")
  p.add_argument("--topology", default=None, help="a TPU topology (e.g. v5:4x4x4); default local.")
  a = p.parse_args(argv)
  spec = importlib.util.spec_from_file_location("bench_config", a.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(a.arg)
  if a.topology:
    config.model.attention_platform = "tpu"  # as aot.run does for a topology
    devices = aot.topology_devices(a.topology)[1]
  else:
    devices = jax.devices()
  validate(config, len(devices))
  mesh = sharding.make_mesh(config, devices)
  t0 = time.perf_counter()
  rep = aot.compile_stream(config, mesh)
  compile_s = time.perf_counter() - t0

  m, d = config.model, config.data
  sizes = streaming.cache_sizes(RoutingPlan.from_config(m), d.max_frames, d.max_text)
  model = nnx.eval_shape(lambda: build_model(m, rngs=config.seed))
  abstract = jax.eval_shape(lambda: streaming.empty_caches(model, 1, sizes))
  kv = 2 * max(sizes) * m.n_kv_heads * m.head_dim * jnp.dtype(m.dtype).itemsize
  out = {k: rep[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")}
  out.update(
    peak_bytes=rep["peak_bytes"],
    cache_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)),
    largest_layer_kv_bytes=kv,
    cache_sizes=sorted(set(sizes)),
    compile_s=round(compile_s, 1),
    config=os.path.relpath(a.config),
    topology=a.topology or f"local:{jax.default_backend()}",
  )
  for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes"):
    print(f"{k:16s} {out[k] / 1e6:10.1f} MB")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
