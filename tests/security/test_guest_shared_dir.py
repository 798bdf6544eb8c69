"""A compromised guest attacks the host through the shared directory, in a real VM, over 9p (a
templated VM) and virtio-fs (a cold-booted one): it tries to plant mount targets, to leave a setuid
binary and a device node in a volume and in its root. Each attempt fails; nothing is left."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import pykata.sandbox.sandbox as sandbox_module
from pykata.config import load_config
from pykata.hypervisor import fileguard
from pykata.images.store import ImageStore
from pykata.resources import mounts
from pykata.sandbox.ocispec import GUEST_SHARED_DIR, Volume, build_spec
from pykata.sandbox.sandbox import Sandbox
from tests.security.mountns import is_mount_point

pytestmark = [pytest.mark.vm]

ATTACKER = "attacker"
# What the guest runs (as root, with the default capabilities, CAP_MKNOD and CAP_FSETID among them).
ATTACK = f"""
echo x > /vol/capped
/vol/setxattr /vol/capped 2>&1 || echo "no setxattr: $?"
for t in "ln -s /etc/cron.d /guestshared/{ATTACKER}/volumes/1" "ln -s /usr/local/bin /guestshared/next" \
         "mkdir /guestshared/next" "mv /guestshared/{ATTACKER}/volumes /guestshared/{ATTACKER}/v" \
         "rm -rf /guestshared/{ATTACKER}/volumes/0"; do
  if $t 2>/dev/null; then echo "PLANTED: $t"; else echo "refused: $t"; fi
done
for d in /vol /guestshared/{ATTACKER}/rootfs/tmp; do
  cp /bin/busybox $d/id 2>/dev/null; chmod 4755 $d/id 2>/dev/null && echo "SUID: $d/id"
  mknod $d/null c 1 3 2>/dev/null && chmod 666 $d/null && echo "DEVICE: $d/null"
  install -m 4755 /bin/busybox $d/id2 2>/dev/null && echo "SUID: $d/id2"
done
touch /guestshared/{ATTACKER}/rootfs/tmp/x 2>/dev/null && echo "ROOT WRITABLE" || echo "root read-only"
echo done
"""
# The guest's root gives a host file a file capability (what a setuid bit would give: the host user
# who runs it gains cap_net_bind_service) and a trusted.* xattr (host-root-only metadata), through
# the volume. It prints "XATTR: <name>" for each the shared file system let through, and
# "XATTR listed: <name>" for each the file then has (the volume's contents are gone after the rm -rf below).
SETXATTR_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    static const char cap[] = "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                              "\x00\x00\x00\x00";
    const char *names[] = {"security.capability", "trusted.pykata"};
    for (int i = 0; i < 2; i++) {
        if (setxattr(argv[1], names[i], cap, sizeof cap - 1, 0) == 0) printf("XATTR: %s\n", names[i]);
        else printf("refused xattr: %s\n", names[i]);
    }
    char list[256];  /* what the host's file carries, read back through the file server */
    ssize_t n = listxattr(argv[1], list, sizeof list);
    for (ssize_t at = 0; at < n; at += (ssize_t)strlen(list + at) + 1) printf("XATTR listed: %s\n", list + at);
    return argc == 2 ? 0 : 2;
}
"""


def _caps(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0], 16 if k.startswith("Cap") else 10)
            for k, v in (line.split(":", 1) for line in status) if k in ("CapBnd", "CapEff", "Seccomp")}


@pytest.mark.parametrize("shared_fs", ["virtio-9p", "virtio-fs"])
async def test_compromised_guest_cannot_reach_the_host_through_the_shared_dir(
        shared_fs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config()
    if shared_fs == "virtio-fs":  # templated VMs use 9p; a cold boot keeps the configured virtio-fs
        config = dataclasses.replace(config, factory=dataclasses.replace(config.factory, enable_template=False))
    image = ImageStore(Path(config.runtime.cache_path)).resolve("busybox")
    vol = Path(tempfile.mkdtemp(prefix="pykata-guestvol-"))
    os.chmod(vol, 0o755)  # so a host user can reach what the guest leaves there
    (vol / "setxattr.c").write_text(SETXATTR_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(vol / "setxattr"), str(vol / "setxattr.c")], check=True)
    cron_before = is_mount_point("/etc/cron.d")

    # The guest owns its agent: here that agent hands the attacking container the whole shared
    # directory (a hostile agent needs no help to mount it).
    real_for_guest = sandbox_module.for_guest

    def exposing(spec: dict[str, Any], cid: str, in_guest: Mapping[int, str] | None = None
                 ) -> tuple[dict[str, Any], list[Volume]]:
        out, shares = real_for_guest(spec, cid, in_guest)
        if cid == ATTACKER:
            out["mounts"].append({"destination": "/guestshared", "type": "bind", "source": GUEST_SHARED_DIR,
                                  "options": ["rbind", "rw"]})
        return out, shares

    monkeypatch.setattr(sandbox_module, "for_guest", exposing)
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        assert stat.S_IMODE(sb.dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((sb.dir / "state.json").stat().st_mode) == 0o600
        vm = sb.vm
        assert vm is not None and vm.shared_fs == shared_fs  # type: ignore[attr-defined]
        # who writes the guest's files: virtiofsd, the 9p proxy helper of a jailed QEMU, or QEMU
        server = vm._sidecars.virtiofsd or vm._sidecars.proxy9p  # type: ignore[attr-defined]
        pid = server.child.pid if server is not None else vm.pid
        caps = _caps(pid)
        assert caps["Seccomp"] == 2, caps
        if shared_fs == "virtio-fs":
            for cap in fileguard.DROPPED_CAPS:
                assert not caps["CapBnd"] & (1 << cap) and not caps["CapEff"] & (1 << cap), caps

        spec = build_spec(["sleep", "600"], env=["PATH=/bin:/sbin:/usr/bin"])
        c = await sb.create_container(ATTACKER, spec, image.rootfs, volumes=[Volume(vol, "/vol")])
        await c.start()
        p = await c.exec(["sh", "-c", ATTACK], env=["PATH=/bin:/sbin:/usr/bin"])
        out = b"".join([chunk async for chunk in p.chunks()]).decode()
        assert await p.wait() == 0
        assert out.rstrip().endswith("done"), out
        assert "PLANTED" not in out and "SUID" not in out and "DEVICE" not in out, out
        assert out.count("refused") == 5 + 2 and "XATTR" not in out, out
            # runtime.rootfs_upper = "guest" (the default): the host shares the root read-only and the
        # container writes to a guest tmpfs; "host": the guest writes the host's overlay
        in_guest = config.runtime.rootfs_upper == "guest"
        assert ("root read-only" if in_guest else "ROOT WRITABLE") in out, out
        assert (sb.dir / "overlay" / ATTACKER).exists() != in_guest

        # on the host: no setuid bit and no device node anywhere the guest wrote
        upper = sb.dir / "overlay" / ATTACKER / "upper" / "tmp"
        for d in (vol, upper):
            for name in ("id", "id2", "null"):
                if (d / name).exists():
                    mode = (d / name).lstat().st_mode
                    assert not mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISCHR(mode), (d / name, oct(mode))
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(vol / "id"), "-u"],
                             capture_output=True, text=True, check=False)
        assert res.stdout.strip() == "65534", res

        # the host still mounts a new container's volume where it should, and nowhere else
        other = await sb.create_container("second", spec, image.rootfs, volumes=[Volume(vol, "/vol", readonly=True)])
        assert is_mount_point(sb.dir / "mounts" / "second" / "volumes" / "0")
        assert is_mount_point("/etc/cron.d") == cron_before
        await other.delete()
        assert not (sb.dir / "mounts" / "second").exists()
    finally:
        await sb.stop()
        for f in vol.iterdir():
            f.unlink()
        vol.rmdir()
    assert mounts.mounts_under(sb.dir) == [] and not sb.dir.exists()
