"""Compile time against depth: the train step (MoD and dense) and the streaming step, 8 vs 32 layers.

The decoder's layers are scanned (``mod_jax/model/llm.py``: stacked parameters, one ``lax.scan``
per run of the repeating layer cycle), so compiling 32 layers should cost little more than 8
(target: 32 layers in <= 1.3x the time of 8). For each depth this compiles, on the local devices
and exactly as ``mod-jax compile`` does (:func:`mod_jax.analysis.compile.run`), the configured
train step, its dense counterpart and the streaming per-frame step of ``--config`` with
``model.n_layers`` set, side by side in one process, and prints a table; the LAST stdout line is
one JSON object: per depth ``{n}_compile_s`` / ``{n}_dense_compile_s`` / ``{n}_stream_compile_s``
(trace + lower + compile, seconds) and the same ``_lower_s``, and the 32/8 ratios
``ratio_compile_s``, ``ratio_dense_compile_s``, ``ratio_stream_compile_s``. With ``--repeats R``
the depths are compiled in alternation R times and each figure is the minimum (the host is
shared: the minimum is the least disturbed compile); ``load_avg_1m`` is the load at the start.

  nice -n 10 python benchmarks/compile_depth.py [--config configs/bench_paper.py] [--depths 8,32]
      [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

from mod_jax.analysis import compile as aot

STEPS = (("MoD train", ""), ("dense train", "dense_"), ("stream step", "stream_"))


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/bench_paper.py")
  ap.add_argument("--depths", default="8,32", help="comma-separated n_layers; ratios: last/first")
  ap.add_argument("--repeats", type=int, default=1, help="alternating rounds; minimum reported")
  a = ap.parse_args()
  depths = [int(x) for x in a.depths.split(",")]
  out: dict = {"config": a.config, "depths": depths, "repeats": a.repeats}
  out["load_avg_1m"] = round(os.getloadavg()[0], 2)
  t_all = time.perf_counter()
  for _ in range(a.repeats):
    for n in depths:
      config = load_config(a.config)
      config.model.n_layers = n
      jax.clear_caches()  # a repeat must compile, not hit the streaming step's module-level jit
      summary = aot.run(config)
      for _, p in STEPS:
        for key in (f"{p}compile_s", f"{p}lower_s"):
          value = round(summary[key], 2)
          out[f"{n}_{key}"] = min(out.get(f"{n}_{key}", value), value)
  lo, hi = depths[0], depths[-1]
  print(f"{'step':12s}" + "".join(f"{f'{n} layers s':>14s}" for n in depths) + f"{'ratio':>9s}")
  for label, p in STEPS:
    ratio = out[f"{hi}_{p}compile_s"] / out[f"{lo}_{p}compile_s"]
    out[f"ratio_{p}compile_s"] = round(ratio, 3)
    cells = "".join(f"{out[f'{n}_{p}compile_s']:14.2f}" for n in depths)
    print(f"{label:12s}{cells}{ratio:9.2f}")
  out["wall_s"] = round(time.perf_counter() - t_all, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
