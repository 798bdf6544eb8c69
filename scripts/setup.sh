#!/usr/bin/env bash
# README command 1: set everything up, then run the main job: a container in a VM, on the embedded
# default image (busybox).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/pykata check || true
.venv/bin/pykata run --rm busybox sh -c 'echo "Hello from a container in a pykata VM: $(uname -r), $(nproc) vCPU"'
