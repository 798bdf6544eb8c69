"""Unit tests of the agent's pure parts: spec rewriting, cgroup v2 parsing, sysfs onlining, reaper."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import resource
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from pykata.agent import bundle, command, guest, nsexec, stats
from pykata.agent.crun import SealedBinary
from pykata.agent.reaper import ExitStatus, Reaper
from pykata.errors import InvalidArgument
from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code


def _spec(root: Path) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "apparmorProfile": "docker-default", "selinuxLabel": "x"},
        "root": {"path": str(root)},
        "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-123"},
                                 {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts"}, {"type": "mount"}],
                  "cgroupsPath": "/kubepods/besteffort/pod123/abc", "mountLabel": "y",
                  "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}},
    }


def test_rewrite_spec_drops_host_only_parts(tmp_path: Path) -> None:
    root = tmp_path / "shared/c1/rootfs"
    root.mkdir(parents=True)
    spec = _spec(root)
    out = bundle.rewrite_spec(spec, roots=[tmp_path / "shared"], cgroups_path="/pykata/c1", terminal=True)
    assert "hooks" not in out
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    assert out["linux"]["cgroupsPath"] == "/pykata/c1"
    assert out["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ERRNO"}
    assert "mountLabel" not in out["linux"]
    assert "apparmorProfile" not in out["process"] and "selinuxLabel" not in out["process"]
    assert out["process"]["terminal"] is True
    assert out["root"]["path"] == str(root)
    assert spec["hooks"], "the input is not modified"


def test_rewrite_spec_refuses_crun_annotations(tmp_path: Path) -> None:
    """crun acts on run.oci.* annotations of config.json: run.oci.seccomp_bpf_data would replace the
    spec's seccomp filter with any raw program, run.oci.seccomp.plugins would have crun (root in the
    guest, outside the container) load shared libraries. A spec carrying one is refused."""
    root = tmp_path / "shared/c1/rootfs"
    root.mkdir(parents=True)
    for key in ("run.oci.seccomp_bpf_data", "run.oci.seccomp.plugins", "run.oci.keep_original_groups"):
        spec = {**_spec(root), "annotations": {"io.kubernetes.cri.image-name": "busybox", key: "AAAA"}}
        with pytest.raises(InvalidArgument, match=rf"annotations\['{key}'\].*run\.oci"):
            bundle.rewrite_spec(spec, roots=[tmp_path / "shared"], cgroups_path="/pykata/c1")
    ok = {**_spec(root), "annotations": {"io.kubernetes.cri.image-name": "busybox"}}
    assert bundle.rewrite_spec(ok, roots=[tmp_path / "shared"], cgroups_path="/pykata/c1")["annotations"] == \
        {"io.kubernetes.cri.image-name": "busybox"}
    with pytest.raises(InvalidArgument, match="annotations"):
        bundle.rewrite_spec({**ok, "annotations": ["x"]}, roots=[tmp_path / "shared"], cgroups_path="/pykata/c1")


def test_rewrite_spec_always_gives_crun_a_persona_to_set(tmp_path: Path) -> None:
    """crun runs without address-space randomization (command.fixed_layout) and its init inherits
    that; the persona crun sets before the workload's exec gives it back. So every spec gets one,
    and a spec's own must be one crun applies (LINUX or LINUX32), never an object without a domain."""
    root = tmp_path / "shared/c1/rootfs"
    root.mkdir(parents=True)
    roots = [tmp_path / "shared"]
    assert bundle.rewrite_spec(_spec(root), roots=roots, cgroups_path="/p/c")["linux"]["personality"] == \
        {"domain": "LINUX"}
    spec = _spec(root)
    spec["linux"]["personality"] = {"domain": "LINUX32"}
    assert bundle.rewrite_spec(spec, roots=roots, cgroups_path="/p/c")["linux"]["personality"] == {"domain": "LINUX32"}
    for bad in ({}, {"domain": "SVR4"}, {"flags": ["ADDR_NO_RANDOMIZE"]}, "LINUX"):
        spec["linux"]["personality"] = bad
        with pytest.raises(InvalidArgument, match=r"linux\.personality"):
            bundle.rewrite_spec(spec, roots=roots, cgroups_path="/p/c")


async def test_fixed_layout_reaches_only_what_is_spawned_inside_it() -> None:
    """command.run(fixed=True) starts its program without address-space randomization; the agent's
    own persona (the calling thread's) is restored, and other spawns keep randomization."""
    reaper = Reaper()
    reaper.start(subreaper=False)
    personality = "/proc/self/personality"
    before = Path("/proc/thread-self/personality").read_text()
    try:
        fixed = await command.run(reaper, ["/bin/cat", personality], timeout=30, fixed=True)
        plain = await command.run(reaper, ["/bin/cat", personality], timeout=30)
        assert int(fixed.stdout, 16) & command.ADDR_NO_RANDOMIZE, fixed
        assert not int(plain.stdout, 16) & command.ADDR_NO_RANDOMIZE, plain
        assert Path("/proc/thread-self/personality").read_text() == before
    finally:
        reaper.close()


def test_rewrite_spec_joins_the_sandbox_pid_namespace_and_adds_mounts(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    extra = [{"destination": "/etc/resolv.conf", "type": "bind", "source": "/x", "options": ["rbind"]},
             {"destination": "/proc", "type": "bind", "source": "/y", "options": ["rbind"]}]
    out = bundle.rewrite_spec(_spec(tmp_path / "r"), roots=[tmp_path], cgroups_path="/p/c",
                              pid_ns_path="/proc/7/ns/pid", extra_mounts=extra)
    assert {"type": "pid", "path": "/proc/7/ns/pid"} in out["linux"]["namespaces"]
    # an extra mount never replaces one the spec has
    assert [m["destination"] for m in out["mounts"]] == ["/proc", "/etc/resolv.conf"]


async def test_oom_watcher_polls_a_file_the_kernel_cannot_notify(tmp_path: Path) -> None:
    """The OOM watcher waits for kernfs notification on a real cgroup2 (the guest's case, covered by
    tests/agent/test_agent_vm.py); a memory.events it cannot watch that way (here a fake: a regular
    file, which epoll refuses) is polled instead, and the kill is still reported, once."""
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "c1").mkdir()
    events = tmp_path / "c1/memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    watcher = stats.OOMWatcher(interval=0.01)
    try:
        watcher.watch("c1", stats.Cgroup.at("c1", root=tmp_path))
        events.write_text("low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n")
        assert await asyncio.wait_for(watcher.next_event(), 5) == "c1"
        await asyncio.sleep(0.05)
        assert watcher._events.empty()  # one kill, one event
        watcher.unwatch("c1")
    finally:
        await watcher.close()


def test_load_spec_rejects_what_is_not_a_spec() -> None:
    for text, field in (("{}", "oci_spec_json.process"), ('{"process": {}, "root": 1}', "oci_spec_json.root"),
                        ("1" * (2 << 20), "oci_spec_json")):
        with pytest.raises(InvalidArgument) as ei:
            bundle.load_spec(text)
        assert ei.value.rpc_code == Code.INVALID_ARGUMENT and str(ei.value).startswith(field)


def test_cgroup_v2_stats_from_a_fake_cgroup_tree(tmp_path: Path) -> None:
    """A fake cgroup2 directory (files as the kernel writes them): the guest's layout, which this
    host (cgroup v1) cannot show for real."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids io\n")
    cg_dir = tmp_path / "pykata/c1"
    cg_dir.mkdir(parents=True)
    files = {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\n"
                    "throttled_usec 20\n",
        "memory.current": "4096000\n", "memory.max": "max\n", "memory.peak": "5000000\n",
        "memory.stat": "anon 1000\nfile 2000\nkernel 300\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "memory.swap.current": "0\n", "memory.swap.max": "max\n",
        "pids.current": "3\n", "pids.max": "100\n",
        "io.stat": "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
    }
    for name, text in files.items():
        (cg_dir / name).write_text(text)
    cg = stats.Cgroup.at("/pykata/c1", tmp_path)
    assert cg.version == 2 and cg.oom_kills() == 1
    s = stats.read_stats(cg)
    assert (s.cpu.usage_total_ns, s.cpu.usage_user_ns, s.cpu.usage_kernel_ns) == (1_500_000, 1_000_000, 500_000)
    assert (s.cpu.throttling_periods, s.cpu.throttled_periods, s.cpu.throttled_time_ns) == (4, 1, 20_000)
    assert (s.memory.usage, s.memory.limit, s.memory.max_usage, s.memory.failcnt) == (4096000, 0, 5000000, 3)
    assert (s.memory.rss, s.memory.cache, s.memory.oom_kill, s.memory.stat["kernel"]) == (1000, 2000, 1, 300)
    assert (s.pids.current, s.pids.limit) == (3, 100)
    assert {(e.op, e.value) for e in s.io.service_bytes} == {("rbytes", 4096), ("wbytes", 8192), ("dbytes", 0)}
    (cg_dir / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    (cg_dir / "cgroup.freeze").write_text("1\n")
    assert cg.freezer_state() == "frozen"


def test_online_cpu_mem_on_a_fake_sysfs(tmp_path: Path) -> None:
    """A fake sysfs with two offline CPUs and one offline memory block."""
    cpus = tmp_path / "devices/system/cpu"
    for n, state in ((0, None), (1, "1"), (2, "0"), (3, "0")):
        (cpus / f"cpu{n}").mkdir(parents=True)
        if state is not None:
            (cpus / f"cpu{n}/online").write_text(state)
    mem = tmp_path / "devices/system/memory"
    for n, state in ((0, "online"), (1, "offline")):
        (mem / f"memory{n}").mkdir(parents=True)
        (mem / f"memory{n}/state").write_text(state)
    assert guest.online_cpu_mem(3, cpu_only=True, sysfs=tmp_path) == (1, 0)
    assert (cpus / "cpu2/online").read_text() == "1" and (cpus / "cpu3/online").read_text() == "0"
    assert guest.online_cpu_mem(0, cpu_only=False, sysfs=tmp_path) == (1, 1)
    assert (mem / "memory1/state").read_text() == "online"
    # fewer: the highest go offline first, cpu0 (no online file) never
    assert guest.online_cpu_mem(2, cpu_only=True, sysfs=tmp_path) == (-2, 0)
    assert [(cpus / f"cpu{n}/online").read_text() for n in (1, 2, 3)] == ["1", "0", "0"]
    assert guest.online_cpu_mem(1, cpu_only=True, sysfs=tmp_path) == (-1, 0)
    assert guest.online_cpu_mem(1, cpu_only=True, sysfs=tmp_path) == (0, 0)  # idempotent
    assert guest.online_cpu_mem(99, cpu_only=True, sysfs=tmp_path) == (3, 0)  # capped at what is present


def test_exit_status_codes() -> None:
    assert ExitStatus(1, 7 << 8, 0).code == 7
    assert ExitStatus(1, signal.SIGKILL, 0).code == 137


async def test_reaper_keeps_a_status_until_the_pid_is_watched() -> None:
    reaper = Reaper()
    reaper.start(subreaper=False)
    try:
        generation = reaper.generation
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 5"], {})
        for _ in range(200):  # let the reaper collect it before anyone watches
            await asyncio.sleep(0.01)
            if reaper.generation > generation:
                break
        assert (await asyncio.wait_for(reaper.watch(pid, since=generation), 5)).code == 5
        # a status reaped before `since` is someone else's (a reused pid): not handed out
        pid2 = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 6"], {})
        await asyncio.sleep(0.2)
        stale = reaper.watch(pid2, since=reaper.generation)
        await asyncio.sleep(0.1)
        assert not stale.done()
        stale.cancel()
        result = await command.run(reaper, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
        assert (result.status.code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        with pytest.raises(command.CommandTimeout):
            await command.run(reaper, ["/bin/sleep", "10"], timeout=0.2)
    finally:
        reaper.close()


async def test_crun_runs_from_a_sealed_copy_that_nothing_can_write() -> None:
    """crun skips its per-call self-copy (mount, lazy unmount, re-exec) only for a fully sealed
    memfd: check the seals, that writes are refused, that it runs, and that the copy's
    descriptor does not reach the program."""
    crun = shutil.which("crun")
    assert crun is not None, "scripts/install.sh installs crun"
    sealed = SealedBinary(crun)
    reaper = Reaper()
    reaper.start(subreaper=False)
    try:
        seals = fcntl.fcntl(sealed.fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.pwrite(sealed.fd, b"x", 0)
        # what CVE-2019-5736 does through /proc/<crun>/exe: open for writing, then write
        fd = os.open(sealed.path, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.write(fd, b"#!/bin/sh\n")
            assert exc.value.errno == errno.EPERM
        finally:
            os.close(fd)
        result = await command.run(reaper, [crun, "--version"], timeout=30, executable=sealed.path)
        assert result.ok and result.stdout.startswith(b"crun version"), result
        listing = await command.run(reaper, ["/bin/ls", "-l", "/proc/self/fd/"], timeout=30)
        assert b"memfd" not in listing.stdout, listing.stdout
    finally:
        reaper.close()
        sealed.close()


def test_virtio_disk_found_by_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake /sys/block: the serial lookup maps to the /dev node of the same name (here /dev/null,
    which exists on every host)."""
    from pykata.agent import storage

    (tmp_path / "vda").mkdir()
    (tmp_path / "vda/serial").write_text("other\n")
    (tmp_path / "null").mkdir()
    (tmp_path / "null/serial").write_text("rootfs-c1\n")
    store = storage.Storages([tmp_path], [tmp_path], sys_block=tmp_path)
    assert store._device_by_serial("storages[0].source", "rootfs-c1") == "/dev/null"
    # a later lookup checks the disk it learned, and scans again when that disk has another serial now
    (tmp_path / "null/serial").write_text("moved\n")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero/serial").write_text("rootfs-c1\n")
    assert store._device_by_serial("storages[0].source", "rootfs-c1") == "/dev/zero"
    assert store._device_by_serial("storages[0].source", "moved") == "/dev/null"
    monkeypatch.setattr(storage, "DEVICE_WAIT", 0.1)
    with pytest.raises(InvalidArgument) as ei:
        store._device_by_serial("storages[0].source", "missing")
    assert ei.value.field == "storages[0].source" and str(ei.value).startswith("storages[0].source")


def test_image_disk_cache_dropped_only_when_no_mount_of_it_is_alive(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes of the mount system calls and the block ioctls (this runs on the host): the first mount of
    an image disk drops the guest's cache of it and reads it ahead; a second container's mount of the
    same disk, while the first's is alive, does neither (the host refills a slot only once no
    container uses it); once every mount of it is gone (an unmount that failed counts as gone, as
    before), the next mount drops the cache again."""
    from pykata.agent import storage

    calls: list[str] = []
    monkeypatch.setattr(storage, "mount", lambda src, target, fstype, flags, data: calls.append(f"mount {fstype}"))
    failing: set[str] = set()

    def fake_umount(target: str) -> None:
        calls.append("umount")
        if target in failing:
            raise OSError(errno.EBUSY, "busy")

    monkeypatch.setattr(storage, "umount", fake_umount)
    monkeypatch.setattr(storage, "flush_block_cache", lambda dev: calls.append(f"flush {dev}"))
    monkeypatch.setattr(storage, "prefetch_block", lambda dev, size: calls.append(f"prefetch {dev} {size}"))
    store = storage.Storages([tmp_path], [tmp_path])

    def disk(name: str) -> agent_pb2.Storage:
        return agent_pb2.Storage(driver="virtio-blk", source="/dev/null", fstype="ext4", options=["ro"],
                                 mount_point=str(tmp_path / name), driver_options=["prefetch=4096"])

    first = store.mount(disk("c1"), "storages[0]")
    assert first.device == "/dev/null"
    assert calls == ["flush /dev/null", "mount ext4", "prefetch /dev/null 4096"]
    calls.clear()
    second = store.mount(disk("c2"), "storages[0]")
    assert calls == ["mount ext4"]
    calls.clear()
    assert store.unmount([first]) == []
    third = store.mount(disk("c3"), "storages[0]")  # c2's mount is still alive
    assert calls == ["umount", "mount ext4"]
    calls.clear()
    failing.add(second.mount_point)
    assert len(store.unmount([second])) == 1
    fourth = store.mount(disk("c4"), "storages[0]")
    assert calls == ["umount", "mount ext4"]  # c3's is alive
    calls.clear()
    assert store.unmount([third, fourth]) == []
    store.mount(disk("c5"), "storages[0]")
    assert calls == ["umount", "umount", "flush /dev/null", "mount ext4", "prefetch /dev/null 4096"]


def test_nsexec_plan_covers_the_plain_case_and_leaves_the_rest_to_crun(tmp_path: Path) -> None:
    """What the agent's own exec path takes on, and what it hands back to crun (None)."""
    config: dict[str, Any] = {"linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount",
                                                                                "network", "cgroup")]}}
    proc: dict[str, Any] = {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/",
                            "user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
                            "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
                                             "ambient": ["CAP_KILL"]},
                            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}], "noNewPrivileges": True}
    kw: dict[str, Any] = {"init_pid": 42, "cgroup_dir": tmp_path, "cgroup_version": 2, "crun_state": tmp_path}
    p = nsexec.plan(config, proc, **kw)
    assert p is not None
    assert p.ns_flags == 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000
    assert (p.bounding, p.effective, p.permitted, p.ambient) == (1 << 5 | 1 << 0, 1 << 5, 0, (5,))
    assert p.rlimits == ((7, 10, 20),) and p.groups == (5,) and p.seccomp is None
    unlimited = nsexec.plan(config, {**proc, "rlimits": [{"type": "RLIMIT_CORE", "soft": 0, "hard": (1 << 64) - 1}]},
                            **kw)
    assert unlimited is not None and unlimited.rlimits == ((4, 0, resource.RLIM_INFINITY),)
    assert p.cgroup_procs == tmp_path / "cgroup.procs"
    crun_only = [
        ({**config, "linux": {"namespaces": [{"type": "user"}]}}, proc, kw),
        (config, {**proc, "terminal": True}, kw),
        (config, {**proc, "oomScoreAdj": 5}, kw),
        (config, {**proc, "capabilities": {"bounding": ["CAP_NO_SUCH"]}}, kw),
        (config, {**proc, "rlimits": [{"type": "RLIMIT_NO_SUCH", "soft": 1, "hard": 1}]}, kw),
        (config, {**proc, "rlimits": [{"type": "RLIMIT_NOFILE", "soft": "many", "hard": 1}]}, kw),
        (config, {**proc, "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1 << 63, "hard": 1 << 63}]}, kw),
        (config, proc, {**kw, "cgroup_version": 1}),
        # seccomp: crun's compiled program is needed; flags and listeners are crun's business
        ({"linux": {**config["linux"], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}}, proc, kw),
        ({"linux": {**config["linux"], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["X"]}}}, proc, kw),
    ]
    for cfg, pr, args in crun_only:
        assert nsexec.plan(cfg, pr, **args) is None, (cfg, pr, args)
    (tmp_path / "seccomp.bpf").write_bytes(b"\x06\x00\x00\x00\x00\x00\xff\x7f")  # RET ALLOW
    with_filter = nsexec.plan({"linux": {**config["linux"], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}},
                              proc, **kw)
    assert with_filter is not None and with_filter.seccomp == b"\x06\x00\x00\x00\x00\x00\xff\x7f"
    (tmp_path / "seccomp.bpf").write_bytes(b"\x06\x00\x00")  # not whole instructions
    assert nsexec.plan({"linux": {**config["linux"], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}},
                       proc, **kw) is None


def test_exec_capabilities_stay_within_the_containers_bounding_set(tmp_path: Path) -> None:
    base = {"capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]}}
    ok = agent_pb2.Process(args=["true"], capabilities=agent_pb2.Capabilities(bounding=["CAP_KILL"]))
    assert bundle.process_from_proto(ok, base, tmp_path)["capabilities"]["bounding"] == ["CAP_KILL"]
    for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        bad = agent_pb2.Process(args=["true"], capabilities=agent_pb2.Capabilities(**{kind: ["CAP_SYS_ADMIN"]}))
        with pytest.raises(InvalidArgument) as ei:
            bundle.process_from_proto(bad, base, tmp_path)
        assert ei.value.field == f"process.capabilities.{kind}" and "CAP_SYS_ADMIN" in str(ei.value)


def test_warm_tree_looks_up_at_most_the_cap_and_stops_on_a_gone_root(tmp_path: Path) -> None:
    from pykata.agent import storage

    for i in range(5):
        (tmp_path / f"d{i}").mkdir()
        for j in range(5):
            (tmp_path / f"d{i}" / f"f{j}").touch()
    (tmp_path / "loop").symlink_to(".")  # not followed
    seen: list[str] = []
    real = os.scandir

    def counting(path: Any) -> Any:
        seen.append(str(path))
        return real(path)

    def warm(root: Path, cap: int) -> None:
        # in a thread of its own, as the agent runs it (it lowers its own thread's priority)
        t = threading.Thread(target=storage.warm_tree, args=(str(root), cap))
        t.start()
        t.join(30)
        assert not t.is_alive()

    mp = pytest.MonkeyPatch()
    mp.setattr(storage.os, "scandir", counting)
    try:
        warm(tmp_path, 1000)
        assert len(seen) == 6  # the root and its 5 directories, never through the symlink
        seen.clear()
        warm(tmp_path, 3)
        assert len(seen) == 1
        warm(tmp_path / "gone", 1000)  # an unmounted storage: returns quietly
    finally:
        mp.undo()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0 or os.nice(0) != 0


def test_shared_directory_is_mounted_once_for_the_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes of the mount system calls (this runs on the host; 9p needs a guest): two containers' requests
    for the shared directory at once make one mount, and the one that did not make it returns only once
    it is made; a container's removal leaves it; the same mount point from another source or with other
    options is refused naming the field; DestroySandbox's unmount_pod_volumes unmounts it once."""
    from pykata.agent import storage

    share = tmp_path / "shared"
    share.mkdir()
    calls: list[str] = []

    def slow_mount(src: str, target: str, fstype: str, flags: int, data: str) -> None:
        calls.append(f"mount {fstype} {data}")
        threading.Event().wait(0.2)
        calls.append("mounted")

    monkeypatch.setattr(storage, "mount", slow_mount)
    monkeypatch.setattr(storage, "umount", lambda target: calls.append(f"umount {target}"))
    store = storage.Storages([share, tmp_path / "storage"], [share], share_root=share)
    nine_p = agent_pb2.Storage(driver="9p", source="pykata-shared", fstype="9p", mount_point=str(share),
                               options=["trans=virtio", "version=9p2000.L", "msize=512000"])
    got: list[storage.Mounted] = []

    def create() -> None:
        got.append(store.mount(nine_p, "storages[0]"))
        calls.append("returned")

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["mount 9p trans=virtio,version=9p2000.L,msize=512000", "mounted", "returned", "returned"]
    assert [(m.mount_point, m.mounted) for m in got] == [(str(share), False)] * 2
    assert store.unmount(got) == [] and calls[-1] == "returned"  # a container's removal leaves it
    other = agent_pb2.Storage(driver="9p", source="pykata-shared", fstype="9p", mount_point=str(share),
                              options=["trans=virtio", "version=9p2000.L", "msize=8192"])
    with pytest.raises(InvalidArgument) as ei:
        store.mount(other, "storages[1]")
    assert ei.value.field == "storages[1]"
    assert store.unmount_pod_volumes() == [] and calls[-1] == f"umount {share}"
    assert store.unmount_pod_volumes() == [] and calls[-1] == f"umount {share}"  # once
