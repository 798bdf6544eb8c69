#!/usr/bin/env bash
# Installs what pykata needs on a Debian 12 machine (run as root). Idempotent and cached:
# a second run with nothing changed takes seconds.
#   apt packages -> .venv (pykata editable, pinned deps) -> guest kernel and image (cached)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

APT_PACKAGES=(
    python3 python3-venv python3-dev build-essential git ca-certificates
    qemu-system-x86 qemu-utils containerd runc crun busybox-static cpio zstd
    golang-github-containerd-containerd-dev iproute2 kmod procps psmisc
    golang-github-containerd-cgroups-dev protobuf-compiler libprotobuf-dev
    linux-source-6.12 flex bison bc libelf-dev libssl-dev
    e2fsprogs
    containernetworking-plugins
    debootstrap curl
    # the user-mode network of egress sandboxes with hypervisor.qemu.user_network = "passt" (pinned:
    # its measured limits are in configuration.toml)
    passt=0.0~git20230309.7c7625d-1
)

log() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
    name=${p%%=*}
    if ! dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    elif [[ $p == *=* ]] && [ "$(dpkg-query -W -f='${Version}' "$name")" != "${p#*=}" ]; then
        missing+=("$p")  # a pinned version
    fi
done
if ((${#missing[@]})); then
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Some machines have TUN in the kernel but no device node.
if [ ! -e /dev/net/tun ]; then
    mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
fi

# Debian's python3.11, not whatever python3 a shell's PATH finds first.
PY=/usr/bin/python3.11
stamp=.venv/.pykata-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "venv: creating .venv and installing pykata (editable) with pinned dependencies"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[test,deploy]"
    echo "$want" > "$stamp"
fi
# The CRI client of tests/cri: its metadata asks for protobuf~=6.31, which conflicts with our pinned
# protobuf 7 although its generated stubs work with it, so pip installs it without its dependencies
# (grpcio and protobuf are pinned in pyproject.toml).
.venv/bin/pip install -q --no-deps container-runtime-interface-api==2.0.1

# Guest kernel and image (built once, cached by a hash of their inputs), and the VM template that
# sandboxes start from (made once per kernel/image/QEMU; see [factory] in the configuration).
.venv/bin/pykata image build
.venv/bin/pykata factory init
# A Debian bookworm rootfs with python3 and CPython's regression tests (built once, cached by its package
# list), for tests/cli/test_real_software.py and bench/real_software.py; the same with the real programs
# (redis, nginx, memcached, rsync, PostgreSQL, ...) for its servers and tree test and bench's apps suite.
bash scripts/debian-rootfs.sh >/dev/null
bash scripts/debian-rootfs.sh apps >/dev/null
log "ready: $ROOT/.venv/bin/pykata"
