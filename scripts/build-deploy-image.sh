#!/usr/bin/env bash
# Builds pykata's node installer image (what deploy/kubernetes/pykata-deploy.yaml runs) as an OCI image
# layout, without a registry or a container engine: build/deploy/image by default. Cached: a rerun with
# nothing changed takes seconds. Load it with e.g.
#   ctr -n k8s.io images import --base-name docker.io/library/pykata-deploy <(tar -C build/deploy/image -c .)
#   skopeo copy oci:build/deploy/image:latest docker://REGISTRY/pykata-deploy:latest
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/deploy/image}
# the payload carries the guest kernel and root filesystem `pykata image build` made (scripts/install.sh)
exec .venv/bin/python -m pykata.deploy.image "$out" --ref "${REF:-latest}"
