#!/usr/bin/env bash
# The quality gate: format check, lint, type check, spelling. Run by tests/run.sh before the tests
# (and by pre-commit, .pre-commit-config.yaml). Fix formatting with `ruff format .`.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff format --check --quiet .
ruff check --quiet .
mypy
codespell mod_jax tests configs benchmarks launch docs README.md
