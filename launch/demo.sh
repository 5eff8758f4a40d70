#!/usr/bin/env bash
# The main job on the embedded default: install mod_jax into ./.venv, then train VideoLLM-MoD
# (r = 0.2, interleaved) on the procedural stream dataset (generated on first use), evaluate on
# held-out clips, and leave an Orbax checkpoint, TensorBoard events and eval.json in the workdir.
#   bash launch/demo.sh [WORKDIR] [extra mod-jax flags, e.g. --config.train.steps=100]
source "$(dirname "$0")/venv.sh"
pip install -q -e .
WORKDIR=${1:-runs/demo}
shift || true
exec mod-jax train --config configs/demo.py --workdir "$WORKDIR" "$@"
