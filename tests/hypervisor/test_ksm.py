"""Offering a whole process to the host's KSM (pykata.hypervisor.ksm): QEMU with hypervisor.qemu.mem_merge,
the shims' fork server with runtime.shim_mem_merge. Real processes, real prctl; nothing on the host
changes (ksmd's own switch, /sys/kernel/mm/ksm/run, is the admin's and is only read)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pykata.hypervisor import ksm
from pykata.hypervisor.process import ChildProcess
from pykata.hypervisor.qemu.clonememory import keep_template_intact
from pykata.shim import forkserver

pytestmark = pytest.mark.skipif(not Path("/proc/self/ksm_stat").exists(), reason="kernel without KSM")


def _seccomp_mode(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    raise AssertionError("no Seccomp line")


async def test_a_child_offers_its_memory_exactly_when_asked(tmp_path: Path) -> None:
    """ChildProcess.spawn(merge_memory=): QEMU with hypervisor.qemu.mem_merge; the mark is kept across
    fork and exec (Linux 6.7), so a child of a marked shim (runtime.shim_mem_merge) must drop it."""
    seen = {}
    for parent_marked in (False, True):
        for merge in (False, True):
            for clone in (False, True):
                seen[parent_marked, merge, clone] = await _spawned_mark(tmp_path, parent_marked, merge, clone)
    # a clone keeps its template-protecting seccomp filter (mode 2) either way
    assert seen == {(p, m, c): (m, 2 if c else 0) for p in (False, True) for m in (False, True) for c in (False, True)}


async def _spawned_mark(tmp: Path, parent_marked: bool, merge: bool, clone: bool) -> tuple[bool, int]:
    """Spawn `sleep` as the QEMU driver spawns QEMU, from a throwaway process marked or not."""
    if not parent_marked:
        return await _spawn_and_look(tmp, merge, clone)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            ksm.merge_this_process()
            mark, mode = asyncio.run(_spawn_and_look(tmp, merge, clone))
            os.write(w, f"{int(mark)}{mode}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        out = os.read(r, 16)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert len(out) == 2, out
    return out[:1] == b"1", int(out[1:])


async def _spawn_and_look(tmp: Path, merge: bool, clone: bool) -> tuple[bool, int]:
    child = await ChildProcess.spawn(["sleep", "30"], name="k", log_path=tmp / "k.log",
                                     preexec=keep_template_intact if clone else None, merge_memory=merge)
    try:
        await _until_executed(child.pid)
        return ksm.merges(child.pid), _seccomp_mode(child.pid)
    finally:
        await child.kill()


async def _until_executed(pid: int) -> None:
    for _ in range(200):
        if Path(f"/proc/{pid}/exe").resolve().name == "sleep":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{pid} never executed sleep")


def test_the_fork_servers_offer_reaches_the_shims_it_forks() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server (a throwaway child of this test) marks itself, then forks a "shim"
        try:
            forkserver._offer_to_ksm()
            shim = os.fork()
            if shim == 0:
                os.write(w, b"1" if ksm.merges(os.getpid()) else b"0")
                os._exit(0)
            os.waitpid(shim, 0)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert not ksm.merges(os.getpid())  # this process was never marked
