#!/usr/bin/env bash
# README command 2: install what the tests need, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check src tests bench scripts
.venv/bin/mypy --strict src
# The suite never reads a terminal: its stdin is /dev/null, so a child that inherits it (ctr forwards
# its stdin) sees EOF instead of waiting on whatever pipe CI left open.
exec .venv/bin/python -m pytest "$@" </dev/null
