#!/usr/bin/env bash
# Installs mod_jax with its test extra into ./.venv and runs the whole test suite.
#   bash tests/run.sh [pytest args]
source "$(dirname "$0")/../launch/venv.sh"
# torch==2.13.0 resolves to the CPU wheel available locally; see README (never a bare "torch").
pip install -q -e ".[test]"
exec python -m pytest -q -p no:warnings "$@"
