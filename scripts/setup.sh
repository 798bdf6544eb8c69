#!/usr/bin/env bash
# README command 1: set everything up, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/pykata --version
