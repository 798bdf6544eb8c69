"""The guard a file server for the guest starts under (pykata.hypervisor.fileguard), in a real child
process: what it refuses and what it leaves alone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pykata.hypervisor import fileguard

PROBE = r"""
import errno, os, stat, sys
d = sys.argv[1]
def t(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
open(d + "/f", "w").close()
t("chmod-0755", lambda: os.chmod(d + "/f", 0o755))
t("chmod-4755", lambda: os.chmod(d + "/f", 0o4755))
t("chmod-2755", lambda: os.chmod(d + "/f", 0o2755))
t("create-4755", lambda: os.close(os.open(d + "/g", os.O_CREAT | os.O_WRONLY, 0o4755)))
t("create-0644", lambda: os.close(os.open(d + "/h", os.O_CREAT | os.O_WRONLY, 0o644)))
t("mknod-chr", lambda: os.mknod(d + "/c", 0o666 | stat.S_IFCHR, os.makedev(1, 3)))
t("mknod-blk", lambda: os.mknod(d + "/b", 0o666 | stat.S_IFBLK, os.makedev(7, 0)))
t("mknod-fifo", lambda: os.mknod(d + "/p", 0o666 | stat.S_IFIFO))
t("mkdir-2775", lambda: os.mkdir(d + "/sgid", 0o2775))
t("mkdir-4755", lambda: os.mkdir(d + "/suid", 0o4755))
"""
REFUSED = {"chmod-4755", "chmod-2755", "create-4755", "mknod-chr", "mknod-blk", "mkdir-4755"}


@pytest.mark.parametrize("guard", [fileguard.guard_child, fileguard.filter_child], ids=["full", "filter"])
def test_guard_refuses_setuid_modes_and_device_nodes(tmp_path: Path, guard: Callable[[], None]) -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], preexec_fn=guard, capture_output=True,
                         text=True, check=True)
    outcome = dict(line.split() for line in res.stdout.splitlines())
    assert outcome == {k: ("EPERM" if k in REFUSED else "ok") for k in outcome}, outcome
    assert len(outcome) == 10
    for name in ("f", "h", "sgid"):
        assert not (tmp_path / name).stat().st_mode & 0o4000


def test_full_guard_drops_the_capabilities_from_the_bounding_set() -> None:
    res = subprocess.run(["grep", "CapBnd", "/proc/self/status"], preexec_fn=fileguard.guard_child,
                         capture_output=True, text=True, check=True)
    bounding = int(res.stdout.split()[1], 16)
    for cap in fileguard.DROPPED_CAPS:
        assert not bounding & (1 << cap)
    assert bounding & (1 << 21)  # CAP_SYS_ADMIN (say) stays: only the three are dropped
