"""``mod-jax`` command line: ``mod-jax <command> [flags]``.

Commands (each is a module with an absl ``main(argv)``):
  train   train or resume:  mod-jax train --config configs/demo.py --workdir DIR
  stream  live narration of a video:  mod-jax stream --workdir DIR --video FILE [--fps 2]
  serve   demo page (video, narration lines, queries):  mod-jax serve --workdir DIR [--port 8000]
  eval    streaming metrics (LM-PPL, TimeDiff, Fluency, LM-Correctness):  mod-jax eval --workdir DIR
  flops   analytic and XLA FLOPs, compiled memory, MoD vs dense:  mod-jax flops --config X [--json]
  compile AOT-compile train + streaming steps for a TPU topology; fits in HBM?
          mod-jax compile --config X [--topology v5:4x4x4] [--num_slices S] [--json]
  convert HF safetensors / GGUF import and HF export:  mod-jax convert --from-hf DIR --out DIR
  prepare build a tfds dataset (ego4d_narration_stream | coin_stream) from downloaded data:
          mod-jax prepare --dataset NAME --manual_dir DIR --data_dir OUT [--features DIR]
  encode  pre-extract vision features once per video:  mod-jax encode --config X --videos DIR --out DIR
  arank   γ-MoD ARank per layer + MoD insertion list:  mod-jax arank --config X --workdir DIR

Configs are Python files with ``get_config(arg)`` (big_vision style); any field can be
overridden, e.g. ``--config.train.steps=50``. ``mod-jax <command> --helpfull`` lists its flags.
"""

from __future__ import annotations

import importlib
import sys

from absl import app

# command -> module defining main(argv). Add new commands here.
COMMANDS = {
  "train": "mod_jax.train.main",
  "stream": "mod_jax.infer.stream_main",  # mod-jax stream --workdir CKPT --video FILE
  "serve": "mod_jax.infer.serve_main",  # mod-jax serve --workdir CKPT [--port P] (demo page)
  "eval": "mod_jax.infer.eval_main",  # mod-jax eval --workdir CKPT (streaming metrics)
  "flops": "mod_jax.analysis.main",  # mod-jax flops --config X [--json]
  "compile": "mod_jax.analysis.compile_main",  # mod-jax compile --config X --topology v5:4x4x4
  "convert": "mod_jax.convert.main",  # mod-jax convert --from-hf DIR | --to-hf SRC --out DIR
  "prepare": "mod_jax.data.prepare_main",  # mod-jax prepare --dataset NAME --manual_dir DIR ...
  "encode": "mod_jax.data.encode_main",  # mod-jax encode --config X --videos DIR --out DIR
  "arank": "mod_jax.compress.arank_main",  # mod-jax arank --config X --workdir CKPT [--samples N]
}


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(__doc__)
    sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
  command = sys.argv.pop(1)
  sys.argv[0] = f"mod-jax {command}"
  module = importlib.import_module(COMMANDS[command])
  app.run(module.main)


if __name__ == "__main__":
  main()
