"""The warm pool (pykata.factory.pool) end to end: waiting shims with paused VMs, claimed by a real
containerd's `shim start`, refilled, never shared, and leaving nothing behind when killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from pykata.config import load_config
from pykata.config.load import find_config_path, packaged_default_text
from pykata.factory import pool
from pykata.sandbox import sandboxes_dir
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd, missing_prerequisites, running_with_busybox
from tests.shim.test_faults import _wait_for as _until


def _pool_config(directory: Path) -> Path:
    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    text = text.replace('\nruntime_dir = "/run/pykata"\n', f'\nruntime_dir = "{directory / "run"}"\n')
    text = text.replace("\npool_size = 0\n", "\npool_size = 1\n")
    path = directory / "configuration.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd whose pykata shims use a configuration with factory.pool_size = 1 and a
    runtime directory of their own."""
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the pool tests need {missing}")
    directory = tmp_path_factory.mktemp("pool")
    before = os.environ.get("PYKATA_CONFIG")
    os.environ["PYKATA_CONFIG"] = str(_pool_config(directory))
    config = load_config()
    assert config.factory.pool_size == 1 and str(config.runtime.runtime_path).startswith(str(directory))
    try:
        with running_with_busybox(Containerd(directory / "ctd"), tmp_path_factory.mktemp("cache")) as ctd:
            yield ctd
    finally:
        pool.destroy(config)
        if before is None:
            os.environ.pop("PYKATA_CONFIG", None)
        else:
            os.environ["PYKATA_CONFIG"] = before
    assert not _processes_under(config.runtime.runtime_path / "pool"), "a pooled VM outlived the pool"


def _ready_entry(timeout: float = 90.0, other_than: str = "", fill: bool = True) -> pool.PoolEntry:
    config = load_config()
    if fill:
        pool.fill(config, pool.entry_argv())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [e for e in pool.list_entries(config) if e.ready and e.alive and e.id != other_than]
        if ready:
            return ready[0]
        time.sleep(0.05)
    raise AssertionError(f"no pooled VM ready after {timeout}s: {pool.list_entries(config)}")


def _processes_under(directory: Path) -> list[psutil.Process]:
    """Processes (the pooled QEMU, its lifeline wrappers, 9p helper) whose command line names `directory`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if str(directory) in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def _idle_threads(pid: int) -> list[int]:
    """Threads of `pid` and of every process below it that run under SCHED_IDLE."""
    found = []
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, OSError):
                found += [t.id for t in p.threads() if os.sched_getscheduler(t.id) == os.SCHED_IDLE]
    return found


def test_a_pod_takes_a_pooled_vm_and_the_pool_refills_with_a_new_one(pooled: Containerd) -> None:
    first = _ready_entry()
    # made at idle priority (factory.pool_fill_idle), ready at normal: the pod's VM must not run idle
    assert _idle_threads(first.pid) == [], "a ready pooled VM still runs at idle priority"
    p = pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pooled-1", "sh", "-c",
                   "echo hi; cat /proc/sys/kernel/random/boot_id")
    out = p.stdout.decode().split()
    assert out[0] == "hi"
    log = pooled.log.read_text()
    assert f"claimed from the warm pool ({first.id})" in log and "taking the VM from the warm pool" in log
    assert first.id not in {e.id for e in pool.list_entries(load_config())}, "a claimed VM stayed in the pool"
    # its pod counted as starting (refills waited) only until its container started
    assert not pool.starting_marker(first).exists(), "the claimed pod still counts as starting"
    # the pod shut down: the claimed VM went with it, nothing of it left, and its reaper (started at
    # hand-out) was released and ended
    assert not first.sandbox_dir.exists()
    assert _until(lambda: not _reapers("pooled-1"), 30), "the adopted VM's reaper outlived its pod"
    # refilled in the background with a new VM, never the used one; the next pod gets its own boot id
    second = _ready_entry(other_than=first.id, fill=False)  # the pod's shim started it
    assert _idle_threads(second.pid) == [], "a ready pooled VM still runs at idle priority"
    assert second.id != first.id and second.pid != first.pid
    p = pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pooled-2", "cat",
                   "/proc/sys/kernel/random/boot_id")
    assert p.stdout.decode().split()[0] != out[1], "two pods from the pool share a boot id"
    assert f"claimed from the warm pool ({second.id})" in pooled.log.read_text()
    # the first refill launched the shims' fork server; from then on a pod's shim has it fork the
    # waiting shims (no imports of their own), each in a mount namespace of its own (its mounts never
    # in the host's table), made at idle priority and ready at normal priority like the others
    third = _ready_entry(other_than=second.id, fill=False)
    server = pooled.fork_server_pid()
    assert server is not None and psutil.Process(third.pid).ppid() == server
    # launched by a pod's refill, it lives on outside that pod's cgroup (which could not be removed)
    assert not any(pod in Path(f"/proc/{server}/cgroup").read_text() for pod in ("pooled-1", "pooled-2"))
    assert os.readlink(f"/proc/{third.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert _idle_threads(third.pid) == []


def test_a_pooled_vm_is_made_at_idle_priority(pooled: Containerd) -> None:
    config = load_config()
    pool.destroy(config)
    assert pool.fill(config, pool.entry_argv()) == 1
    seen_idle = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        making = [e for e in pool.list_entries(config) if e.alive]
        if making and making[0].ready:
            break
        seen_idle = seen_idle or any(_idle_threads(e.pid) for e in making)
        time.sleep(0.02)
    entry = _ready_entry(fill=False, timeout=1)
    assert seen_idle, "the pooled VM was not made at idle priority"
    assert _idle_threads(entry.pid) == [], "a ready pooled VM still runs at idle priority"
    # its warm-up container took CreateContainer's own path (the image in a slot) and is gone: not in
    # the sandbox's record, no host mounts left for it
    warm_up = "pykata-pool-warm-up"
    consoles = [p for p in entry.sandbox_dir.rglob("*console*") if p.is_file()]
    assert any(f"created container {warm_up}".encode() in p.read_bytes() for p in consoles), consoles
    assert json.loads((entry.sandbox_dir / "state.json").read_text()).get("containers") in ({}, [], None)
    assert not any(warm_up in str(p) for p in entry.sandbox_dir.rglob("*"))


def test_a_start_that_finds_no_vm_ready_has_the_fork_server_fork_the_refill(pooled: Containerd) -> None:
    config = load_config()
    pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pooled-warm", "true")  # the server runs
    pool.destroy(config)
    pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pooled-none", "true")
    assert "refused the claim" not in pooled.log.read_text().split("pooled-none")[-1]
    entry = _ready_entry(fill=False)
    server = pooled.fork_server_pid()
    assert server is not None and psutil.Process(entry.pid).ppid() == server
    assert os.readlink(f"/proc/{entry.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


def test_a_waiting_vm_refuses_bad_claims_and_stays_in_the_pool(pooled: Containerd) -> None:
    entry = _ready_entry()
    for body in (b"not json", json.dumps({"fingerprint": "another-config"}).encode()):
        a, b = socket.socketpair()
        with a, b, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(entry.control))
            socket.send_fds(s, [body], [a.fileno()])
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(s.recv(4096))
        assert reply["ok"] is False and reply["error"]
    assert entry.alive and entry.ready


def test_a_killed_waiting_shim_leaves_no_vm_and_no_mount(pooled: Containerd) -> None:
    entry = _ready_entry()
    vm = [p for p in _processes_under(entry.sandbox_dir) if "qemu-system" in " ".join(p.cmdline())]
    assert vm, "the waiting VM's QEMU is not running"
    os.kill(entry.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _processes_under(entry.sandbox_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_under(entry.sandbox_dir), "the pooled VM outlived its holder"
    with open("/proc/self/mountinfo") as f:
        assert str(entry.root) not in f.read(), "a pooled VM's mount is in the host's mount table"
    assert entry.id in pool.prune(load_config())
    assert not entry.sandbox_dir.exists() and not entry.meta.exists()


def test_a_pod_of_another_size_takes_a_pooled_vm_resized_at_hand_out(pooled: Containerd) -> None:
    entry = _ready_entry()
    qemu = [q for q in _processes_under(entry.sandbox_dir) if q.name().startswith("qemu-system")]
    assert len(qemu) == 1
    limit_mib = 256
    with ThreadPoolExecutor(1) as ex:
        run = ex.submit(pooled.ctr, "run", "--rm", "--runtime", PYKATA_RUNTIME, "--memory-limit", str(limit_mib << 20),
                        "--cpus", "2", IMAGE, "pooled-sized", "sh", "-c", "grep MemTotal /proc/meminfo; nproc; sleep 3")
        # the pooled VM's QEMU joins the pod's cgroup (moved beside the hand-out) while the pod runs
        joined = False
        while not joined and not run.done():
            with contextlib.suppress(OSError):
                joined = "pooled-sized" in Path(f"/proc/{qemu[0].pid}/cgroup").read_text()
            time.sleep(0.05)
        p = run.result()
    assert joined, "the pooled VM's QEMU never joined the pod's cgroup"
    mem_kib, nproc = p.stdout.decode().split()[1], p.stdout.decode().split()[-1]
    assert f"claimed from the warm pool ({entry.id})" in pooled.log.read_text()
    log = pooled.log.read_text().split(f"claimed from the warm pool ({entry.id})", 1)[1]
    assert "taking the VM from the warm pool" in log and "does not fit this pod" not in log
    # the VM follows the pod's size (its limit plus the VM's own overhead, 2 vCPUs), not the pool's default
    from pykata.resources.sizing import VM_MEMORY_OVERHEAD_MIB

    assert abs(int(mem_kib) // 1024 - (limit_mib + VM_MEMORY_OVERHEAD_MIB)) <= 128, mem_kib
    assert nproc == "2"


def test_destroy_right_after_fill_ends_the_ones_still_starting(pooled: Containerd) -> None:
    config = load_config()
    pool.destroy(config)
    assert pool.fill(config, pool.entry_argv()) == config.factory.pool_size
    # registered by fill itself, before the process has even imported its code: destroy finds it
    starting = [e for e in pool.list_entries(config) if e.alive]
    assert len(starting) == config.factory.pool_size and not any(e.ready for e in starting)
    assert sorted(pool.destroy(config)) == sorted(e.id for e in starting)
    time.sleep(2)  # had one escaped, it would have registered again and started its VM by now
    assert [e for e in pool.list_entries(config) if e.alive] == []
    assert not _processes_under(config.runtime.runtime_path / "pool")
    assert all(not psutil.pid_exists(e.pid) or psutil.Process(e.pid).status() == psutil.STATUS_ZOMBIE
               for e in starting)


def test_a_pod_whose_cgroup_is_refused_fails_and_its_pooled_vm_is_gone(pooled: Containerd) -> None:
    # the pod's cgroup is made beside the hand-out (pod._adopt_warm): a refused linux.cgroupsPath still
    # fails the pod, naming the field, and the VM it took is stopped
    entry = _ready_entry()
    p = pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, "--cgroup", "/pykata-test/../../escape", IMAGE,
                   "pooled-badcg", "true", check=False)
    assert p.returncode != 0 and b"linux.cgroupsPath" in p.stderr, p.stderr
    assert f"claimed from the warm pool ({entry.id})" in pooled.log.read_text()
    deadline = time.monotonic() + 10
    while _processes_under(entry.sandbox_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_under(entry.sandbox_dir), "the refused pod's pooled VM is still running"
    assert not os.path.exists("/sys/fs/cgroup/memory/escape") and not os.path.exists("/sys/fs/cgroup/escape")


def _pod_cgroups(cid: str) -> list[Path]:
    """The pod's host cgroups (pykata.resources.cgroups: pykata_overhead/<id> in each hierarchy)."""
    root = Path("/sys/fs/cgroup")
    return [d for d in [root / "pykata_overhead" / cid, *root.glob(f"*/pykata_overhead/{cid}")] if d.exists()]


def _in_mount_namespace(ns: str) -> list[int]:
    """Processes whose mount namespace is `ns` (a readlink of /proc/<pid>/ns/mnt)."""
    found = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                found.append(pid)
    return found


def _reapers(cid: str) -> list[psutil.Process]:
    """The sandbox reapers (pykata.sandbox.reaper) watching the pod `cid`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "pykata.sandbox.reaper" in cmd and any(a.endswith(f"/sandboxes/{cid}") for a in cmd):
            found.append(p)
    return found


def test_a_killed_shim_that_took_a_pooled_vm_leaves_nothing_without_delete(pooled: Containerd) -> None:
    """A pod's shim that adopted a pooled VM, SIGKILLed while containerd is frozen (so no `delete` of the
    dead shim runs): its VM, its mount namespace (the pod's mounts), the pool directory, the
    sandboxes/<id> link and the pod's cgroups all go, as for a cold-booted VM's shim
    (tests/shim/test_faults.py::test_shim_killed_while_no_delete_runs_leaves_nothing)."""
    entry = _ready_entry()
    cid = "pooled-killed"
    pooled.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, IMAGE, cid, "sleep", "1000")
    try:
        shim_pid = int((pooled.bundle(cid) / "shim.pid").read_text())
        assert shim_pid == entry.pid, "the pod did not take the pooled VM"
        assert f"claimed from the warm pool ({entry.id})" in pooled.log.read_text()
        link = sandboxes_dir(load_config()) / cid
        assert link.resolve() == entry.sandbox_dir
        assert [q for q in _processes_under(entry.sandbox_dir) if q.name().startswith("qemu-system")]
        assert _pod_cgroups(cid), "the pod has no cgroup to leave behind"
        reapers = _reapers(cid)
        assert len(reapers) == 1, "the adopted VM has no reaper"
        # outside the pod's cgroup: it must not be charged to it nor keep it busy
        assert cid not in Path(f"/proc/{reapers[0].pid}/cgroup").read_text()
        # the pod's mounts (its container's root) live in the waiting shim's own mount namespace
        mnt_ns = os.readlink(f"/proc/{shim_pid}/ns/mnt")
        assert mnt_ns != os.readlink("/proc/self/ns/mnt")
        assert str(entry.sandbox_dir) in Path(f"/proc/{shim_pid}/mountinfo").read_text()
        assert pooled.proc is not None
        pooled.proc.send_signal(signal.SIGSTOP)
        try:
            os.kill(shim_pid, signal.SIGKILL)
            assert _until(lambda: not _processes_under(entry.sandbox_dir), 30), "the pooled VM outlived its shim"
            assert _until(lambda: not _in_mount_namespace(mnt_ns), 30), "the pod's mounts outlived its shim"
            assert _until(lambda: not entry.sandbox_dir.exists() and not link.is_symlink(), 30), \
                "the adopted VM's directory outlived its shim"
            assert _until(lambda: not _pod_cgroups(cid), 30), _pod_cgroups(cid)
            assert _until(lambda: not _reapers(cid), 30), "the reaper did not end after its work"
        finally:
            pooled.proc.send_signal(signal.SIGCONT)
        assert _until(lambda: cid not in pooled.tasks(), 60)
    finally:
        pooled.remove(cid)
    with open("/proc/self/mountinfo") as f:
        assert str(entry.root) not in f.read()


def _cli_fill(*args: str) -> str:
    p = subprocess.run([str(Path(sys.executable).parent / "pykata"), "factory", "pool", "fill", "--wait", "180", *args],
                       capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_cli_fills_the_pool_through_a_running_fork_server_and_never_launches_one(pooled: Containerd) -> None:
    """`pykata factory pool fill --address <containerd>` has that containerd's shims' fork server fork the
    waiting shims (as a pod's refill does: they share its imported code); with no server running for the
    address, or `--address ""`, it starts fresh ones, and launches no server (one launched from the
    command would live in its session and cgroup)."""
    config = load_config()
    if pooled.fork_server_pid() is None:
        # a pod's `start` launches it; with no VM ready it boots cold (no refill after its start: the
        # one `start` began is registered when `ctr run` returns, and destroy ends it)
        pool.destroy(config)
        pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pooled-server", "true")
    assert _until(lambda: pooled.fork_server_pid() is not None, 60), "no fork server was launched"
    server = pooled.fork_server_pid()
    assert server is not None
    pool.destroy(config)
    out = _cli_fill("--address", str(pooled.socket))
    assert f"started 1 (1 forked by the shims' fork server of {pooled.socket})" in out and "1 of 1 ready" in out, out
    [entry] = [e for e in pool.list_entries(config) if e.alive]
    assert entry.ready and psutil.Process(entry.pid).ppid() == server
    assert os.readlink(f"/proc/{entry.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert _idle_threads(entry.pid) == []
    # a forked one serves a pod as any other
    p = pooled.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pooled-cli", "echo", "forked")
    assert p.stdout.decode().split() == ["forked"]
    assert f"claimed from the warm pool ({entry.id})" in pooled.log.read_text()
    # its shim has exited, and so registered its refill (on its way out at the latest): destroy ends it
    assert _until(lambda: not entry.alive, 30)
    for address, why in (("", 'no --address'), ("/nonexistent/containerd.sock",
                                                 "no shims' fork server runs for containerd at /nonexistent")):
        pool.destroy(config)
        out = _cli_fill("--address", address)
        assert f"started 1 (fresh processes: {why}" in out and "1 of 1 ready" in out, out
        [entry] = [e for e in pool.list_entries(config) if e.alive]
        assert psutil.Process(entry.pid).ppid() != server
    nowhere = "/nonexistent/containerd.sock"
    assert not [p for p in psutil.process_iter(["cmdline"]) if nowhere in (p.info["cmdline"] or [])]
    pool.destroy(config)
