"""Faults under real containerd: the VM killed under a running task, the shim killed, and duplicate
and racing kill/delete requests. Whatever happens, the task ends STOPPED or gone, the calls return,
and no shim, QEMU, virtiofsd, mount or sandbox directory is left."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pykata.config import load_config
from pykata.images import ImageStore
from pykata.sandbox import sandboxes_dir
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]


def _sandbox_dir(cid: str) -> Path:
    return sandboxes_dir(load_config()) / cid


def _vm_processes(cid: str) -> list[psutil.Process]:
    """QEMU and virtiofsd of the sandbox (their command lines name its directory or VM name)."""
    marks = (str(_sandbox_dir(cid)) + "/", f"pykata-{cid},")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("qemu-system" in cmd or "virtiofsd" in cmd) and any(m in cmd for m in marks):
            found.append(p)
    return found


def _mounts(cid: str) -> list[str]:
    d = str(_sandbox_dir(cid))
    return [ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {d}" in ln]


def _wait_for(cond: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _cgroups(cid: str) -> list[Path]:
    """The sandbox's host cgroups (pykata.resources.cgroups: pykata_overhead/<id> in each hierarchy)."""
    root = Path("/sys/fs/cgroup")
    return [d for d in [root / "pykata_overhead" / cid, *root.glob(f"*/pykata_overhead/{cid}")] if d.exists()]


def _assert_nothing_left(ctd: Containerd, cid: str, shim_pid: int | None) -> None:
    assert _wait_for(lambda: not _vm_processes(cid)), [p.cmdline() for p in _vm_processes(cid)]
    assert _wait_for(lambda: shim_pid is None or not psutil.pid_exists(shim_pid)
                     or psutil.Process(shim_pid).status() == psutil.STATUS_ZOMBIE), "the shim is still running"
    # containerd's `delete` of a dead shim may still be unmounting when its task is already gone
    assert _wait_for(lambda: not _mounts(cid)), _mounts(cid)
    assert _wait_for(lambda: not _sandbox_dir(cid).exists())
    assert _wait_for(lambda: not _cgroups(cid)), _cgroups(cid)
    assert cid not in ctd.tasks()


def _start(ctd: Containerd, prefix: str) -> tuple[str, int]:
    cid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, IMAGE, cid, "sleep", "1000")
    shim_pid = int((ctd.bundle(cid) / "shim.pid").read_text())
    assert ctd.tasks()[cid] == "RUNNING"
    return cid, shim_pid


def test_vm_killed_under_a_running_task(containerd: Containerd) -> None:
    cid, shim_pid = _start(containerd, "vmkill")
    events = subprocess.Popen(["ctr", "-a", str(containerd.socket), "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=containerd.env())
    try:
        time.sleep(0.3)
        record = json.loads((_sandbox_dir(cid) / "state.json").read_text())
        qemu = psutil.Process(record["vmm_pid"])
        assert "qemu-system" in " ".join(qemu.cmdline())
        qemu.send_signal(signal.SIGKILL)
        assert _wait_for(lambda: containerd.tasks().get(cid) == "STOPPED"), containerd.tasks()
        wait = containerd.ctr("task", "ls")  # still listed, STOPPED, until removed
        assert cid in wait.stdout.decode()
        assert containerd.ctr("task", "rm", cid, check=False).returncode == 0
    finally:
        time.sleep(0.5)
        events.terminate()
        out = events.communicate(timeout=10)[0].decode()
        containerd.remove(cid)
    exits = [json.loads(ln.split(" ", 6)[6]) for ln in out.splitlines() if " /tasks/exit " in ln and cid in ln]
    assert [(e["id"], e["exit_status"]) for e in exits] == [(cid, 137)]
    assert any(" /tasks/delete " in ln and cid in ln for ln in out.splitlines())
    _assert_nothing_left(containerd, cid, shim_pid)


def test_shim_killed_leaves_nothing(containerd: Containerd) -> None:
    cid, shim_pid = _start(containerd, "shimkill")
    assert _vm_processes(cid)
    assert _cgroups(cid)  # the dead shim cannot remove them: its `delete` does, from their record
    os.kill(shim_pid, signal.SIGKILL)
    # containerd sees the connection drop and runs `containerd-shim-pykata-v2 delete`
    assert _wait_for(lambda: not _vm_processes(cid)), "the VM outlived its shim"
    assert _wait_for(lambda: cid not in containerd.tasks())
    containerd.remove(cid)
    assert cid not in containerd.ctr("container", "ls", "-q").stdout.decode().split()
    _assert_nothing_left(containerd, cid, shim_pid)


def test_shim_killed_while_no_delete_runs_leaves_nothing(containerd: Containerd) -> None:
    """A dead shim's `delete` may never finish: containerd kills it after 5 s, and at load ~15 churn saw
    all three of a pod's killed so (076f692), QEMU, virtiofsd, mounts and cgroups staying. Here containerd
    is frozen before the shim is SIGKILLed, so no `delete` runs at all: the VM dies with its shim (a
    PID-namespace lifeline, as a pooled VM's) and the shim's reaper (pykata.sandbox.reaper) removes the
    mounts, the directory and the cgroups. Before, all of them stayed."""
    cid, shim_pid = _start(containerd, "nodelete")
    assert containerd.proc is not None
    assert _vm_processes(cid) and _mounts(cid) and _cgroups(cid)
    containerd.proc.send_signal(signal.SIGSTOP)
    try:
        os.kill(shim_pid, signal.SIGKILL)
        assert _wait_for(lambda: not _vm_processes(cid), 30), "the VM outlived its shim"
        assert _wait_for(lambda: not _mounts(cid), 30), _mounts(cid)
        assert _wait_for(lambda: not _sandbox_dir(cid).exists(), 30)
        assert _wait_for(lambda: not _cgroups(cid), 30), _cgroups(cid)
    finally:
        containerd.proc.send_signal(signal.SIGCONT)
    assert _wait_for(lambda: cid not in containerd.tasks(), 60)
    containerd.remove(cid)
    _assert_nothing_left(containerd, cid, shim_pid)


def test_duplicate_and_racing_kill_and_delete(containerd: Containerd) -> None:
    cid, shim_pid = _start(containerd, "race")
    calls = [("task", "kill", "-s", "KILL", cid)] * 4 + [("task", "kill", "-a", "-s", "KILL", cid)] * 2 + \
            [("task", "rm", "-f", cid)] * 3
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        started = time.monotonic()
        results = list(pool.map(lambda a: containerd.ctr(*a, check=False, timeout=90), calls))
    assert time.monotonic() - started < 90
    rm_codes = [r.returncode for r, a in zip(results, calls, strict=True) if a[1] == "rm"]
    assert 0 in rm_codes, [r.stderr for r in results]
    for r, a in zip(results, calls, strict=True):
        # the losers are told "not found"; or, when the winning delete made containerd close its
        # client to the shim while their request was on it, containerd's own "ttrpc: closed"
        if r.returncode != 0:
            assert any(m in r.stderr for m in (b"not found", b"no running task", b"ttrpc: closed")), (a, r.stderr)
    again = containerd.ctr("task", "rm", "-f", cid, check=False)
    assert again.returncode != 0 and b"not found" in again.stderr
    containerd.remove(cid)
    _assert_nothing_left(containerd, cid, shim_pid)


def test_same_id_again_right_away(containerd: Containerd) -> None:
    """`ctr run --rm` returns only once the shim and its VM are gone, so the same id can follow at once."""
    cid = f"again-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        p = containerd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, cid, "echo", str(i), check=False)
        assert (p.returncode, p.stdout) == (0, f"{i}\n".encode()), p.stderr
        assert not _vm_processes(cid) and not _sandbox_dir(cid).exists()
    _assert_nothing_left(containerd, cid, None)


def test_containerd_restart_keeps_the_task(containerd: Containerd) -> None:
    cid, shim_pid = _start(containerd, "restart")
    try:
        containerd.restart()  # containerd reconnects to the shim through the bundle's address file
        assert containerd.tasks()[cid] == "RUNNING"
        ex = containerd.ctr("task", "exec", "--exec-id", "after", cid, "echo", "still here")
        assert ex.stdout == b"still here\n"
        containerd.ctr("task", "kill", "-s", "KILL", cid)
        assert _wait_for(lambda: containerd.tasks().get(cid) == "STOPPED")
        containerd.ctr("task", "rm", cid)
    finally:
        containerd.remove(cid)
    _assert_nothing_left(containerd, cid, shim_pid)


def test_teardown_after_containerd_died_leaves_nothing(tmp_path: Path) -> None:
    """The fixture's last resort: containerd killed with tasks running (runc's and ours) and nobody
    left to delete them; its teardown must still remove every shim, VM, mount and socket."""
    from pykata.images.builtin import export_oci_archive

    ctd = Containerd(tmp_path / "ctd")
    try:
        ctd.start()
        archive = export_oci_archive(ImageStore(tmp_path / "cache").resolve("busybox"), tmp_path / "b.tar", IMAGE)
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        cid, shim_pid = _start(ctd, "orphan")
        ctd.ctr("run", "-d", "--runtime", RUNC_RUNTIME, IMAGE, "orphan-runc", "sleep", "1000")
        sock = Path((ctd.bundle(cid) / "address").read_text().removeprefix("unix://"))
        assert ctd.proc is not None
        ctd.proc.kill()
        ctd.proc.wait(10)
    finally:
        ctd.stop()
    assert not ctd.shims()
    assert not _vm_processes(cid) and not _mounts(cid) and not _sandbox_dir(cid).exists()
    assert not sock.exists() and not psutil.pid_exists(shim_pid)
    assert not [ln for ln in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in ln]
