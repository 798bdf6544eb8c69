#!/usr/bin/env python3
"""The Python SDK's goals (issue 17), each next to runc doing the same thing in the same run.

    .venv/bin/python bench/sdk_bench.py [-n 20] [--starts 3] [--file-mib 100] [--concurrent 20]
        [--concurrent-memory-mib M] [--only files|concurrent|pool|start|run] [--only-snapshot] [--json]

- cold start: `Sandbox()` until its first command can run, vs `runc run -d` of the same bundle
  (`--only start`: --starts of them interleaved with runc's, with their phases from pykata.timing marks)
- run("true"): one command round trip in a running sandbox, vs `runc exec` in a running container
- files: write then read --file-mib MiB with `files.write`/`files.read_bytes`, vs `runc exec cat` with
  the data on stdin / stdout; also printed: `docker cp`'s way for runc (a tar stream unpacked into / packed
  from the container's root by the host) and the SDK's channel alone (stdin into `cat > /dev/null`);
  the SDK also `upload`s a host file and `download`s it back (files of 1 MiB or more move through the
  VM's data disk, runtime.data_disk_mib; smaller ones through the channel)
- concurrency: --concurrent AsyncSandboxes started and used from one Python process (one event loop):
  wall time, and the number of threads the process had at most (the goal: not one per sandbox)
- pool: `Pool.acquire()` to the first command's result, when the SDK has a Pool
- snapshot: a --snapshot-mib MiB sandbox (snapshots=True) holding --state-mib MiB of fresh guest state
  (random bytes in its writable layer): `snapshot(path)` until it runs again, and `Sandbox.restore(path)`
  until it returned (ready) and until its first command answered, each --snapshots times; `restore_copy_*`:
  the same of a copy of each snapshot (a new file: its state is hashed, as one from another host);
  baselines: `cp` of the stream (what writing the same bytes costs this disk) and a fresh
  `Sandbox(snapshots=True)` to its first command

Figures are medians (p50). On a shared machine they move with the load: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import pykata  # noqa: E402
from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.sandbox import build_spec  # noqa: E402

GOALS = {"cold_start_s": 1.0, "run_true_p50_s": 0.100, "files_write_mib_s": 50, "files_read_mib_s": 50,
         "pool_acquire_first_command_s": 0.050, "snapshot_s": 1.0, "restore_first_command_s": 1.0}


def _slower(key: str, sdk: float, runc: float) -> float | None:
    """How many times slower the SDK is: a time over runc's, or runc's throughput over the SDK's."""
    if not sdk or not runc:
        return None
    return round(runc / sdk if key.endswith("mib_s") else sdk / runc, 1)


def p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


class RuncContainer:
    """A runc container idling in a bundle of the busybox image: the baseline."""

    def __init__(self, tmp: Path) -> None:
        rootfs = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox").rootfs
        self.bundle = tmp / f"bundle-{uuid.uuid4().hex[:6]}"
        shutil.copytree(rootfs, self.bundle / "rootfs", symlinks=True)
        spec = build_spec(["sleep", "1000000"], env=["PATH=/bin:/usr/bin"])
        spec["linux"]["resources"] = {}
        (self.bundle / "config.json").write_text(json.dumps(spec))
        self.id = f"sdkbench-{uuid.uuid4().hex[:8]}"

    def start(self) -> float:
        t = time.perf_counter()
        subprocess.run(["runc", "run", "-d", "--bundle", str(self.bundle), self.id], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.exec(["true"])
        return time.perf_counter() - t

    def exec(self, argv: list[str], stdin: bytes | None = None) -> bytes:
        p = subprocess.run(["runc", "exec", self.id, *argv], input=stdin, capture_output=True, check=True)
        return p.stdout

    def delete(self) -> None:
        subprocess.run(["runc", "delete", "-f", self.id], capture_output=True, check=False)


def measure_runc(tmp: Path, n: int, starts: int, data: bytes) -> dict[str, float]:
    start_s = []
    for _ in range(starts):
        c = RuncContainer(tmp)
        try:
            start_s.append(c.start())
        finally:
            c.delete()
    c = RuncContainer(tmp)
    try:
        c.start()
        runs = []
        for _ in range(n):
            t = time.perf_counter()
            c.exec(["true"])
            runs.append(time.perf_counter() - t)
        mib = len(data) / (1 << 20)
        t = time.perf_counter()
        c.exec(["sh", "-c", "cat > /tmp/f"], stdin=data)
        write = time.perf_counter() - t
        t = time.perf_counter()
        back = c.exec(["cat", "/tmp/f"])
        read = time.perf_counter() - t
        assert back == data
        cp_write, cp_read = docker_cp(c, data)
    finally:
        c.delete()
    return {"cold_start_s": p50(start_s), "run_true_p50_s": p50(runs), "files_write_mib_s": round(mib / write, 1),
            "files_read_mib_s": round(mib / read, 1), "cp_write_mib_s": round(mib / cp_write, 1),
            "cp_read_mib_s": round(mib / cp_read, 1)}


def docker_cp(c: RuncContainer, data: bytes) -> tuple[float, float]:
    """What `docker cp` does for a runc container: a tar stream unpacked into (and packed from) the
    container's root file system by the host, no exec. Seconds each way."""
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        info = tarfile.TarInfo("cp.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    t = time.perf_counter()
    subprocess.run(["tar", "-x", "-C", str(c.bundle / "rootfs" / "tmp")], input=stream.getvalue(), check=True)
    write = time.perf_counter() - t
    t = time.perf_counter()
    out = subprocess.run(["tar", "-c", "-C", str(c.bundle / "rootfs" / "tmp"), "cp.bin"], capture_output=True,
                         check=True).stdout
    read = time.perf_counter() - t
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        member = tar.extractfile("cp.bin")
        assert member is not None and member.read() == data
    return write, read


def measure_run(tmp: Path, n: int) -> dict[str, object]:
    """run("true") in a running sandbox and `runc exec true` in a running container, alternately."""
    c = RuncContainer(tmp)
    try:
        c.start()
        with pykata.Sandbox(image="busybox") as sb:
            sb.run("true")
            ours, runc = [], []
            for _ in range(n):
                t = time.perf_counter()
                sb.run("true")
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                c.exec(["true"])
                runc.append(time.perf_counter() - t)
    finally:
        c.delete()
    s, r = sorted(ours), sorted(runc)
    return {"n": n, "run_true_p50_s": p50(ours), "run_true_p99_s": round(s[min(n - 1, round(0.99 * (n - 1)))], 4),
            "runc_exec_p50_s": p50(runc), "runc_exec_p99_s": round(r[min(n - 1, round(0.99 * (n - 1)))], 4),
            "times_slower_than_runc": round(p50(ours) / p50(runc), 1)}


def measure_sdk(n: int, starts: int, data: bytes) -> dict[str, float]:
    start_s = []
    for _ in range(starts):
        t = time.perf_counter()
        with pykata.Sandbox(image="busybox") as sb:
            sb.run("true")
            start_s.append(time.perf_counter() - t)
    with pykata.Sandbox(image="busybox") as sb:
        sb.run("true")
        runs = []
        for _ in range(n):
            t = time.perf_counter()
            sb.run("true")
            runs.append(time.perf_counter() - t)
        mib = len(data) / (1 << 20)
        qemu_pid = sb._async._sandbox.vm.pid  # type: ignore[union-attr]
        c0, t = _cpu_seconds(qemu_pid), time.perf_counter()
        sb.files.write("/tmp/f", data)
        write = time.perf_counter() - t
        c1, t = _cpu_seconds(qemu_pid), time.perf_counter()
        back = sb.files.read_bytes("/tmp/f", max_bytes=len(data))
        read = time.perf_counter() - t
        c2 = _cpu_seconds(qemu_pid)
        assert back == data
        # upload / download: host file to guest file and back (the same data disk path, from and to disk)
        with tempfile.TemporaryDirectory() as tmp:
            local, copy = Path(tmp) / "up.bin", Path(tmp) / "down.bin"
            local.write_bytes(data)
            t = time.perf_counter()
            sb.files.upload(local, "/tmp/up.bin")
            upload = time.perf_counter() - t
            t = time.perf_counter()
            sb.files.download("/tmp/up.bin", copy)
            download = time.perf_counter() - t
            assert copy.read_bytes() == data
        # the channel alone (the agent and virtio-serial, no file system): stdin into `cat > /dev/null`
        proc = sb.spawn(["sh", "-c", "cat > /dev/null"], stdin=True)
        t = time.perf_counter()
        proc.stdin.write(data)
        proc.stdin.close()
        assert proc.wait() == 0
        channel_write = time.perf_counter() - t
    return {"cold_start_s": p50(start_s), "run_true_p50_s": p50(runs), "files_write_mib_s": round(mib / write, 1),
            "files_read_mib_s": round(mib / read, 1), "channel_write_mib_s": round(mib / channel_write, 1),
            "upload_mib_s": round(mib / upload, 1), "download_mib_s": round(mib / download, 1),
            # what moving a MiB costs the VM (QEMU's CPU time): the figure the machine's load moves least
            "files_write_qemu_cpu_ms_per_mib": round(1000 * (c1 - c0) / mib, 1),
            "files_read_qemu_cpu_ms_per_mib": round(1000 * (c2 - c1) / mib, 1)}


def measure_start(tmp: Path, n: int) -> dict[str, object]:
    """Cold `Sandbox()` (no pool) until start() returned and until its first command answered, n times,
    interleaved with `runc run -d`; the phases of each start from pykata.timing's marks (medians, in s
    from the Sandbox() call)."""
    from pykata.timing import ENV
    marks_file = tmp / "marks"
    os.environ[ENV] = str(marks_file)
    started, firsts, runc, phases = [], [], [], {}
    kinds = set()
    try:
        for _ in range(n):
            c = RuncContainer(tmp)
            try:
                runc.append(c.start())
            finally:
                c.delete()
            marks_file.write_text("")
            t0 = time.monotonic_ns()
            with pykata.Sandbox(image="busybox") as sb:
                started.append((time.monotonic_ns() - t0) / 1e9)
                sb.run("true")
                firsts.append((time.monotonic_ns() - t0) / 1e9)
                vm = sb._async._sandbox.vm  # type: ignore[union-attr]
                kinds.add("template clone" if vm.restore_source is not None else "cold boot")
            for line in marks_file.read_text().splitlines():
                ns, _pid, name = line.split(" ", 2)
                phases.setdefault(name, []).append((int(ns) - t0) / 1e9)
    finally:
        del os.environ[ENV]
    return {"sandbox_start_s": p50(started), "cold_start_s": p50(firsts), "runc_start_s": p50(runc),
            "times_slower_than_runc": round(p50(firsts) / p50(runc), 1), "vm": sorted(kinds),
            "phases_s": {k: p50(v) for k, v in sorted(phases.items(), key=lambda kv: statistics.median(kv[1]))},
            "all_cold_start_s": [round(x, 3) for x in firsts]}


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` so far (all its threads)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_concurrent(count: int, memory_mib: int | None = None) -> dict[str, float]:
    most_threads = threading.active_count()
    done = threading.Event()

    def watch() -> None:
        nonlocal most_threads
        while not done.wait(0.05):
            most_threads = max(most_threads, threading.active_count() - 1)  # not counting this watcher

    async def one() -> float:
        async with pykata.AsyncSandbox(image="busybox", memory_mib=memory_mib) as sb:
            t = time.perf_counter()
            r = await sb.run("true")
            assert r.ok
            return time.perf_counter() - t

    async def all_of_them() -> list[float]:
        return list(await asyncio.gather(*(one() for _ in range(count))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    t = time.perf_counter()
    try:
        runs = asyncio.run(all_of_them())
    finally:
        done.set()
        watcher.join()
    return {"sandboxes": count, "wall_s": round(time.perf_counter() - t, 2), "most_threads": most_threads,
            "run_true_p50_s": p50(runs)}


def measure_pool(n: int, pause_idle: bool = True) -> dict[str, float] | None:
    pool_cls = getattr(pykata, "Pool", None)
    if pool_cls is None:
        return None
    with pool_cls(size=2, image="busybox", pause_idle=pause_idle) as pool:
        pool.wait_ready()
        firsts = []
        for _ in range(n):
            t = time.perf_counter()
            with pool.acquire() as sb:
                sb.run("true")
                firsts.append(time.perf_counter() - t)
            pool.wait_ready()
    return {"pool_acquire_first_command_s": p50(firsts), "all_s": [round(f, 3) for f in firsts]}


def measure_snapshot(memory_mib: int, state_mib: int, n: int) -> dict[str, object]:
    saves, restores, copies = [], [], []
    # memory_mib= only raises the configured size: the VM is exactly memory_mib with it configured
    base = load_config()
    config = dataclasses.replace(base, hypervisor=dataclasses.replace(
        base.hypervisor, qemu=dataclasses.replace(base.qemu, default_memory=memory_mib)))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as t:
        with pykata.Sandbox(image="busybox", snapshots=True, config=config):
            pass  # the template for this size is made once, outside the figures
        start = time.perf_counter()
        with pykata.Sandbox(image="busybox", snapshots=True, config=config) as sb:
            sb.run("true")
            fresh = time.perf_counter() - start
            sb.run(f"head -c {state_mib << 20} /dev/urandom > /root/state.bin", timeout=600)
            for i in range(n):
                path = Path(t) / f"snap{i}"
                start = time.perf_counter()
                sb.snapshot(path)
                saves.append(time.perf_counter() - start)
        stream = (Path(t) / "snap0" / "state").stat().st_size
        vm_mib = json.loads((Path(t) / "snap0" / "manifest.json").read_text())["machine"]["default_memory"]
        for i in range(n):
            # the baseline, and copies to restore: a copy is a new file, whose state a restore hashes
            # (this host remembers only the digests of the files it hashed: pykata.sandbox.snapshotdir)
            os.mkdir(Path(t) / f"copy{i}", 0o700)
            shutil.copy(Path(t) / f"snap{i}" / "manifest.json", Path(t) / f"copy{i}" / "manifest.json")
            start = time.perf_counter()
            subprocess.run(["cp", str(Path(t) / f"snap{i}" / "state"), str(Path(t) / f"copy{i}" / "state")],
                           check=True)
            copies.append(time.perf_counter() - start)
        phases, verified, verified_phases = [], [], []
        vm_phases: dict[str, list[float]] = {}
        for i in range(n):  # interleaved: a saved snapshot, then a copy
            for path, firsts, ready in ((Path(t) / f"snap{i}", restores, phases),
                                        (Path(t) / f"copy{i}", verified, verified_phases)):
                start = time.monotonic()
                with pykata.Sandbox.restore(path, config=config) as r:
                    restored = time.monotonic() - start
                    r.run("true")
                    firsts.append(time.monotonic() - start)
                    ready.append(round(restored, 3))
                    if firsts is restores:  # the driver's marks (time.monotonic), from the restore() call
                        for k, v in r._async._sandbox.vm.timestamps.items():  # type: ignore[union-attr]
                            vm_phases.setdefault(k, []).append(v - start)
                    assert r.run("stat -c %s /root/state.bin").text.strip() == str(state_mib << 20)
    return {"memory_mib": vm_mib, "state_mib": state_mib, "stream_mib": round(stream / (1 << 20), 1),
            "snapshot_s": p50(saves), "restore_first_command_s": p50(restores), "restore_ready_s": p50(phases),
            "restore_copy_ready_s": p50(verified_phases), "restore_copy_first_command_s": p50(verified),
            # QEMU spawned, its QMP up, the stream loaded, the guest left the saved agent session, the
            # agent answered (restores of the saved snapshots)
            "restore_vm_phases_s": {k: p50(v) for k, v in vm_phases.items() if k != "virtiofsd"},
            "cp_stream_s": p50(copies), "snapshot_vs_cp": round(p50(saves) / p50(copies), 1),
            "fresh_start_first_command_s": round(fresh, 3), "restore_vs_fresh_start": round(p50(restores) / fresh, 2),
            "all_snapshot_s": [round(x, 3) for x in saves], "all_restore_ready_s": phases,
            "all_restore_copy_ready_s": verified_phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="run('true') round trips")
    ap.add_argument("--starts", type=int, default=3, help="cold starts")
    ap.add_argument("--file-mib", type=int, default=100)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--concurrent-memory-mib", type=int, default=None, help="each concurrent sandbox's memory")
    ap.add_argument("--only", choices=["files", "concurrent", "pool", "start", "run"],
                    help="measure only this (and its baseline); start: --starts cold starts with their phases; "
                         "run: -n run('true') round trips beside runc exec, interleaved")
    ap.add_argument("--pool-n", type=int, default=5)
    ap.add_argument("--pool-pause", choices=["on", "off"], default="on",
                    help="Pool(pause_idle=): waiting sandboxes paused (on) or left running (off)")
    ap.add_argument("--snapshot-mib", type=int, default=512, help="memory of the snapshotted sandbox")
    ap.add_argument("--state-mib", type=int, default=100, help="guest state written before the snapshot")
    ap.add_argument("--snapshots", type=int, default=3, help="snapshots and restores (0: skip)")
    ap.add_argument("--only-snapshot", action="store_true", help="measure snapshot/restore only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.only_snapshot:
        snap = measure_snapshot(a.snapshot_mib, a.state_mib, a.snapshots)
        print(json.dumps({"snapshot": snap, "goals": {k: GOALS[k] for k in ("snapshot_s", "restore_first_command_s")},
                          "loadavg": os.getloadavg()}, indent=None if not a.json else 2))
        return
    if a.only == "start":
        with tempfile.TemporaryDirectory() as t:
            start = measure_start(Path(t), a.starts)
        print(json.dumps({"start": start, "goal_s": GOALS["cold_start_s"], "loadavg": os.getloadavg()},
                         indent=2 if a.json else None))
        return
    if a.only == "run":
        with tempfile.TemporaryDirectory() as t:
            print(json.dumps({"run": measure_run(Path(t), a.n), "goal_s": GOALS["run_true_p50_s"],
                              "loadavg": os.getloadavg()}, indent=2 if a.json else None))
        return
    if a.only == "pool":
        pool = measure_pool(a.pool_n, a.pool_pause == "on")
        print(json.dumps({"pool": pool, "goal_s": GOALS["pool_acquire_first_command_s"],
                          "loadavg": os.getloadavg()}, indent=2 if a.json else None))
        return
    if a.only == "concurrent":
        res_c = {"concurrent": measure_concurrent(a.concurrent, a.concurrent_memory_mib), "loadavg": os.getloadavg()}
        print(json.dumps(res_c, indent=2))
        return
    if a.only == "files":
        a.n, a.starts = 1, 1
    data = os.urandom(a.file_mib << 20)
    with tempfile.TemporaryDirectory() as t:
        runc = measure_runc(Path(t), a.n, a.starts, data)
    sdk = measure_sdk(a.n, a.starts, data)
    res: dict[str, object] = {"sdk": sdk, "runc": runc, "goals": GOALS,
                              "times_slower_than_runc": {k: _slower(k, sdk[k], runc[k]) for k in sdk if k in runc},
                              "loadavg": os.getloadavg()}
    if a.only == "files":
        print(json.dumps(res, indent=2))
        return
    if a.concurrent:
        res["concurrent"] = measure_concurrent(a.concurrent, a.concurrent_memory_mib)
    pool = measure_pool(a.pool_n, a.pool_pause == "on")
    if pool is not None:
        res["pool"] = pool
    if a.snapshots:
        res["snapshot"] = measure_snapshot(a.snapshot_mib, a.state_mib, a.snapshots)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{'':24}{'sdk':>10}{'runc':>10}{'x slower':>10}{'goal':>10}")
    for k, v in sdk.items():
        if k in runc:
            print(f"{k:24}{v:>10}{runc[k]:>10}{res['times_slower_than_runc'][k]:>10}{GOALS[k]:>10}")  # type: ignore[index]
    print(f"channel alone (stdin into cat > /dev/null): {sdk['channel_write_mib_s']} MiB/s; runc docker-cp-like "
          f"(tar into/from its root on the host): write {runc['cp_write_mib_s']}, read {runc['cp_read_mib_s']} MiB/s")
    if "concurrent" in res:
        print(f"concurrent: {res['concurrent']}")
    if pool is not None:
        print(f"pool: {pool} (goal {GOALS['pool_acquire_first_command_s']}s)")
    if "snapshot" in res:
        print(f"snapshot: {res['snapshot']} (goals: snapshot_s and restore_first_command_s <= 1.0)")
    print(f"load average during the run: {res['loadavg']} (the machine is shared)")


if __name__ == "__main__":
    main()
