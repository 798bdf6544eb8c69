#!/usr/bin/env bash
# Builds (once) a Debian bookworm root filesystem with python3 and CPython's own regression tests, for the
# real-software differential test (tests/cli/test_real_software.py) and bench/real_software.py, and prints
# its path. Cached under /var/cache/pykata/debian/<key>/rootfs, keyed by suite, variant, package list and
# mirror; a second run with nothing changed prints the path at once. Needs root and Debian's mirror.
#   usage: bash scripts/debian-rootfs.sh [EXTRA,PACKAGES | apps]   (progress on stderr, the rootfs path on stdout)
# EXTRA,PACKAGES (comma-separated Debian package names) are installed too, in a rootfs cached under its own
# key. `apps` names the set of the real programs (bench/real_software_ctr.py --suite apps and
# tests/cli/test_real_software.py's servers and tree test): sqlite3, PostgreSQL, git, redis, nginx,
# memcached, curl, rsync, cpio, ...; debootstrap installs them without starting their services (it
# replaces start-stop-daemon while it installs).
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
APPS=sqlite3,postgresql-15,postgresql-contrib,git,attr,procps,redis-server,redis-tools,nginx-light,curl,memcached,rsync,netcat-openbsd,cpio,xz-utils
EXTRA=${1:-}
[ "$EXTRA" = apps ] && EXTRA=$APPS
PACKAGES=python3,libpython3.11-testsuite${EXTRA:+,$EXTRA}
case $PACKAGES in *[!a-z0-9.+,-]*) echo "debian-rootfs: bad package list: $PACKAGES" >&2; exit 2;; esac
MIRROR=${PYKATA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${PYKATA_CACHE:-/var/cache/pykata}/debian

log() { printf '\033[1m[debian-rootfs]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

key=$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" "$MIRROR" | sha256sum | cut -c1-16)
dest=$CACHE/$key
if [ -e "$dest/complete" ]; then
    echo "$dest/rootfs"
    exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
mkdir -p "$CACHE"
# One build at a time per key: a second caller waits for the first, then finds the cache.
exec 9>"$CACHE/$key.lock"
flock 9
if [ -e "$dest/complete" ]; then
    echo "$dest/rootfs"
    exit 0
fi
curl -fsS --max-time 20 -o /dev/null "$MIRROR/dists/$SUITE/Release" \
    || die "the Debian mirror $MIRROR is unreachable (fetching dists/$SUITE/Release failed); set PYKATA_DEBIAN_MIRROR to a reachable mirror"

work=$(mktemp -d "$CACHE/$key.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building Debian $SUITE ($VARIANT + $PACKAGES) from $MIRROR into $dest (once; a few minutes)"
debootstrap --variant="$VARIANT" --include="$PACKAGES" "$SUITE" "$work/rootfs" "$MIRROR" >&2 \
    || die "debootstrap failed (see its output above; $work/rootfs/debootstrap/debootstrap.log)"
# Space only: the downloaded packages and apt's lists are not needed to run the tests.
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
# An image's /dev is empty (as in Debian's own container images): runtimes give containers their /dev,
# and pykata refuses device nodes in an image.
find "$work/rootfs/dev" -mindepth 1 -delete
[ -d "$work/rootfs/usr/lib/python3.11/test" ] || die "the rootfs has no /usr/lib/python3.11/test"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
touch "$dest/complete"
log "ready: $dest/rootfs ($(du -sh "$dest/rootfs" | cut -f1))"
echo "$dest/rootfs"
