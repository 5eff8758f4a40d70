"""Bytes written per training checkpoint, from abstract shapes (nothing allocated or compiled).

"whole state" is what a checkpoint of the whole TrainState holds (every parameter, frozen ones
included, + optimizer state + step); "trainable" is what ``mod_jax/train/checkpoint.py`` saves
(trainable parameters + optimizer state + step; the frozen base is a reference).

  python benchmarks/checkpoint_bytes.py [--config configs/videollm_mod_llama3_8b.py]

The LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mod_jax.analysis.flops import abstract_train_state
from mod_jax.train.checkpoint import trainable_params
from mod_jax.train.state import trainable_labels


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/videollm_mod_llama3_8b.py")
  args = ap.parse_args()
  path, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  state, _, _ = abstract_train_state(config)
  labels = trainable_labels(state.params, config.model)
  params, opt, step = nbytes(state.params), nbytes(state.opt_state), nbytes(state.step)
  trainable = nbytes(trainable_params(state.params, labels))
  out = {
    "config": args.config,
    "params_bytes": params,
    "trainable_params_bytes": trainable,
    "opt_state_bytes": opt,
    "whole_state_bytes": params + opt + step,
    "trainable_checkpoint_bytes": trainable + opt + step,
  }
  out["ratio"] = out["trainable_checkpoint_bytes"] / out["whole_state_bytes"]
  for k in ("params_bytes", "trainable_params_bytes", "opt_state_bytes"):
    print(f"{k:>28}: {out[k] / 2**30:8.2f} GiB")
  print(
    f"{'per save, whole state':>28}: {out['whole_state_bytes'] / 2**30:8.2f} GiB\n"
    f"{'per save, trainable only':>28}: {out['trainable_checkpoint_bytes'] / 2**30:8.2f} GiB"
  )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
