#!/usr/bin/env python3
"""containerd with pykata against containerd with runc, measured in one run.

    .venv/bin/python bench/ctr_bench.py [-n 5] [--containers 1,10] [--tb-sizes 0,32] [--json]

A private containerd (tests/shim/harness.py: own root, state, socket; the venv's shim on its PATH)
with a local busybox image. Prints:
- the median wall time of `ctr run --rm <busybox> true` with io.containerd.runc.v2 and with
  io.containerd.pykata.v2, and their ratio (one warm-up run each first, not counted);
- host memory per running container (`sleep` in each): the PSS of its shim, QEMU and virtiofsd
  (from /proc/<pid>/smaps_rollup), plus a share of the shims' fork server (runtime.shim_fork_server),
  for 1 and for 10 containers running at once (PSS splits pages
  shared between VMs, such as a VM template's, among them), with runc's shim and container as a
  reference.
With --tb-sizes, both are measured for each TCG translation cache size (MiB; 0 = QEMU's default),
each pykata container run with a configuration file that sets hypervisor.qemu.tcg_tb_size
(`ctr run --runtime-config-path`), all in the same run.

Also, for runc and pykata alike:
- for each N in --containers: the median time of one `ctr run -d` while the others start one by one,
  and the PSS per container once all N run; QEMU's PSS is split by what it is (--breakdown): the TCG
  translation cache, guest RAM dirtied since the clone (anonymous pages of the RAM mapping), guest RAM
  still shared with the template file, and the rest of QEMU (heap, binary, libraries);
- start rate (--rate 1,4, --rate-rounds N timed runs each, runc and pykata alternating, the median
  printed too): --rate-count containers started with 1 and with 4 `ctr run -d` at a time,
  in containers per second, and the CPU seconds each container's own processes used until all had
  started (pykata: shim and QEMU, the guest included; runc: shim and container), which on a shared
  host says more than the rate (2 cores at 0.33 CPU s per start would be 6 starts a second);
- --timeline (with --rate): for each container of each pykata rate run, when each phase of its start
  began (ms after the run began; PYKATA_TIMING_FILE marks of `shim start`, its fork-server child, the
  pool claim, the pod's shim: Create, hand-out, guest set-up, crun create, Start), the host's CPU in
  use and the pool's ready/alive VMs every half second: what overlaps and what waits;
- --pool: pykata runs with a warm pool (factory.pool_size = --pool-size, in a configuration written
  for the run); the timed `ctr run --rm` starts once a pooled VM is ready (the wait is not counted), and
  the pool's waiting VMs are reported apart from the containers' memory. The bench fills the pool
  through the shims' fork server of its containerd, as a pod's shim refills it (server_fork): waiting
  shims it started itself imported everything on their own and measured ~5 MiB more per pod.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from pykata.sandbox import sandboxes_dir  # noqa: E402
from pykata.timing import ENV as TIMING_ENV  # noqa: E402
from pykata.timing import mark  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_rm(ctd: Containerd, runtime: str, opts: tuple[str, ...] = ()) -> float:
    cid = f"bench-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    p = ctd.ctr("run", "--rm", "--runtime", runtime, *opts, IMAGE, cid, "true", check=False)
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"ctr run --runtime {runtime} failed: {p.stderr.decode(errors='replace')}")
    return elapsed


SMAPS_FIELDS = ("Pss", "Private_Dirty", "Private_Clean", "Shared_Dirty", "Shared_Clean", "Anonymous")


def mappings(pid: int) -> list[dict[str, Any]]:
    """Each mapping of `pid`: its name, permissions, size and the smaps fields above (KiB)."""
    out: list[dict[str, Any]] = []
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append({"name": " ".join(parts[5:]), "perms": parts[1], "size": (hi - lo) // 1024, "start": lo})
        elif parts and parts[0].rstrip(":") in SMAPS_FIELDS and out:
            out[-1][parts[0].rstrip(":")] = int(parts[1])
    return out


def qemu_breakdown_kib(pid: int) -> dict[str, int]:
    """QEMU's PSS by what it is: the TCG translation cache (its rwx anonymous mappings), guest
    RAM written since the clone (anonymous pages of the RAM file's private mapping), guest RAM still
    the template file's pages (shared with the other clones), and everything else."""
    out = {"tcg_cache": 0, "guest_dirty": 0, "guest_template": 0, "qemu_rest": 0}
    for m in mappings(pid):
        name = m["name"].split(" ", 1)[0]
        pss, anon = m.get("Pss", 0), m.get("Anonymous", 0)
        if name.endswith("/memory") or "memory-backend" in name or name.startswith("/memfd:"):
            # Pages KSM merged are anonymous yet shared: count the mapping's PSS once (never negative)
            out["guest_dirty"] += min(anon, pss)
            out["guest_template"] += pss - min(anon, pss)
        elif not name and "x" in m["perms"]:  # one rwx mapping per TCG region (guard pages between)
            out["tcg_cache"] += pss
        else:
            out["qemu_rest"] += pss
    return out


def container_processes(ctd: Containerd, cid: str) -> dict[str, list[int]]:
    """The host processes that exist for one container: its shim and what it started (QEMU,
    virtiofsd, the 9p proxy helper: found by the sandbox directory or VM name in their command lines),
    or for runc the shim and the container's processes (the shim's children)."""
    shim = psutil.Process(int((ctd.bundle(cid) / "shim.pid").read_text())) \
        if (ctd.bundle(cid) / "shim.pid").exists() else None
    if shim is None:  # runc: the shim that names the container in its command line
        shim = next(p for p in ctd.shims() if cid in p.cmdline())
    out: dict[str, list[int]] = {"shim": [shim.pid], "qemu": [], "virtiofsd": [], "proxy9p": [], "container": []}
    # a pod that took a pooled VM: sandboxes/<id> links to the pool's directory, the VM has its name
    real = os.path.realpath(sandboxes_dir(load_config()) / cid)
    marks = (f"{sandboxes_dir(load_config()) / cid}/", f"pykata-{cid},", f"{real}/",
             f"pykata-{os.path.basename(real)},")
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not any(m in cmd for m in marks):
            continue
        if "qemu-system" in cmd:
            out["qemu"].append(p.pid)
        elif "virtiofsd" in cmd:
            out["virtiofsd"].append(p.pid)
        elif "virtfs-proxy-helper" in cmd:
            out["proxy9p"].append(p.pid)
    if not out["qemu"]:
        out["container"] = [c.pid for c in shim.children(recursive=True)]
    return out


def start_detached(ctd: Containerd, runtime: str, cid: str, opts: tuple[str, ...] = ()) -> float:
    start = time.perf_counter()
    ctd.ctr("run", "-d", "--runtime", runtime, *opts, IMAGE, cid, "sleep", "1000000", timeout=300)
    return time.perf_counter() - start


def memory(ctd: Containerd, runtime: str, count: int, opts: tuple[str, ...] = (),
           pool_wait: Any = None) -> dict[str, Any]:
    ids = [f"mem-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    started: list[str] = []
    try:
        starts = []
        for cid in ids:
            if pool_wait is not None:
                pool_wait()
            started.append(cid)
            starts.append(start_detached(ctd, runtime, cid, opts))
        time.sleep(3)  # let the guests settle (page cache, agent start-up garbage)
        totals: dict[str, int] = {}
        parts: dict[str, int] = {}
        for cid in ids:
            for kind, pids in container_processes(ctd, cid).items():
                totals[kind] = totals.get(kind, 0) + sum(pss_kib(p) for p in pids)
                if kind == "qemu":
                    for p in pids:
                        for k, v in qemu_breakdown_kib(p).items():
                            parts[k] = parts.get(k, 0) + v
        # pykata.shim.forkserver: its pages are the shims' shared ones (counted when it forked them)
        server = ctd.fork_server_pid()
        if server is not None and any(psutil.Process(container_processes(ctd, cid)["shim"][0]).ppid() == server
                                      for cid in ids):
            totals["fork_server"] = pss_kib(server)
        per = {k: v / count / 1024 for k, v in totals.items() if v}
        out = {"runtime": runtime, "containers": count, "pss_mib_per_container": round(sum(per.values()), 1),
               "start_median_s": round(statistics.median(starts), 3), "start_max_s": round(max(starts), 3),
               "breakdown_mib": {k: round(v, 1) for k, v in per.items()},
               "mem_available_mib": mem_available_mib(), "loadavg": os.getloadavg()}
        if parts:
            out["qemu_breakdown_mib"] = {k: round(v / count / 1024, 1) for k, v in parts.items()}
        return out
    finally:
        for cid in started:
            ctd.remove(cid)


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` (and of their children they waited for)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def own_and_reaped(pid: int | None) -> tuple[float, float]:
    """CPU seconds of `pid` itself and of the children it reaped (containerd: its `shim start` and
    `delete` processes; the fork server: its children that ran a `start`)."""
    if pid is None:
        return 0.0, 0.0
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system, t.children_user + t.children_system
    return 0.0, 0.0


def kernel_threads_cpu() -> float:
    """CPU seconds of the host's kernel threads (kthreadd's children: kworkers of cgroup moves, RCU,
    ksoftirqd), all of them: work done for every process, the starts' included."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for pid in Path("/proc/2/task/2/children").read_text().split():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and every process below it, by pid (as cpu_s: with their reaped children).
    From /proc/<pid>/stat and the kernel's lists of each thread's children, not psutil's children(),
    which reads every process on the host: the sampler of a pooled start_rate runs this for each
    waiting VM 20 times a second, and that way it cost 0.2 CPU s per start measured (load 16)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = sum(int(f) for f in fields[11:15]) / tick
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return out


def thread_stats(pid: int) -> dict[str, list[float]]:
    """Per thread name of `pid` (QEMU: `CPU 0/TCG`, its main loop `qemu-system-x86`, `IO ...`, `call_rcu`,
    `worker`): [CPU seconds, of them in the kernel, minor faults, voluntary + involuntary context
    switches], summed over the threads of that name."""
    out: dict[str, list[float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                switches = sum(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                               if "ctxt_switches:" in line)
                got = out.setdefault(name, [0.0, 0.0, 0.0, 0.0])
                got[0] += (int(fields[11]) + int(fields[12])) / tick
                got[1] += int(fields[12]) / tick
                got[2] += int(fields[7])
                got[3] += switches
    return out


def pool_qemus() -> dict[int, dict[str, list[float]]]:
    """The pool's waiting QEMUs (by pid) and their thread_stats."""
    out = {}
    for tree in pool_cpu().values():
        for pid in tree:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                    out[pid] = thread_stats(pid)
    return out


def pool_cpu(settled: set[int] | None = None, unready: bool = True) -> dict[int, dict[int, float]]:
    """The warm pool's waiting processes (by pid) and the CPU seconds of each one's process tree.
    With `settled`: not those whose pid is in it, and the pids of ready ones are added to it (a ready
    waiting VM is paused: its CPU does not change until it is claimed, so one reading while ready is its
    fill's cost; reading all ten trees ten times a second cost the bench ~5% of a core). `unready`
    False: only ready ones (a VM being made changes at every reading, and its process tree, the shim,
    the lifeline wrappers and QEMU with their threads, is tens of /proc reads)."""
    from pykata.factory import pool

    out = {}
    for e in pool.list_entries(load_config()):
        if (settled is not None and e.pid in settled) or not e.alive:
            continue
        if not unready and not e.ready:
            continue
        out[e.pid] = tree_cpu(e.pid)
        if settled is not None and e.ready:
            settled.add(e.pid)
    return out


# --timeline: (column, mark, whose mark) per container, in the order of one pooled start; whose: the
# bench ("bench"), `shim start` as containerd ran it ("start"), its child of the fork server that ran
# it ("forked"), or the pod's shim ("shim"); a mark ending in "@" is followed by the container id
TIMELINE = [
    ("ctr", "bench.begin@", "bench"), ("exec", "start.exec", "start"), ("fork", "start.forked", "forked"),
    ("claim", "start.claim", "forked"), ("accept", "pool.accepted", "shim"), ("answer", "pool.answered", "shim"),
    ("claimd", "start.claimed", "forked"), ("nopool", "start.unclaimed", "forked"), ("answr", "start.done", "start"),
    ("Create", "task.Create@", "shim"), ("adopt", "vm.start", "shim"), ("resume", "vm.started", "shim"),
    ("clock", "guest.clock", "shim"), ("prep", "guest.prepared", "shim"), ("gsbx", "guest.sandbox", "shim"),
    ("cgroup", "vm.cgroup", "shim"),
    ("rootfs", "rootfs.mounted", "shim"), ("crun", "guest.created", "shim"), ("C.done", "task.Create@.done", "shim"),
    ("Start", "task.Start@", "shim"), ("S.done", "task.Start@.done", "shim"), ("ctr.end", "bench.end@", "bench"),
]


def timeline(path: Path, shim_pids: dict[str, int], t0_ns: int) -> list[str]:
    """One line per container (in the order they began): when each TIMELINE mark happened, in ms
    after the run began (`-` when it did not)."""
    by_pid: dict[int, list[tuple[int, str]]] = {}
    owner: dict[int, tuple[str, str]] = {}  # pid -> (container, "start" | "forked")
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        ns, pid, name = int(parts[0]), int(parts[1]), parts[2]
        by_pid.setdefault(pid, []).append((ns, name))
        if name.startswith("start.id@"):
            owner[pid] = (name.split("@", 1)[1], "start")
    for pid, marks in by_pid.items():
        if pid in owner and any(n == "start.forked" for _, n in marks):
            owner[pid] = (owner[pid][0], "forked")
    rows = []
    bench = by_pid.get(os.getpid(), [])
    for cid in sorted(shim_pids, key=lambda c: next((ns for ns, n in bench if n == f"bench.begin@{c}"), 0)):
        whose = {"bench": bench, "shim": by_pid.get(shim_pids[cid], [])}
        for pid, (c, kind) in owner.items():
            if c == cid:
                whose[kind] = by_pid[pid]
        cells = []
        for _, name, who in TIMELINE:
            want = name.replace("@", f"@{cid}" + ("/" if name.startswith("task.") else ""), 1) \
                if "@" in name else name
            at = next((ns for ns, n in whose.get(who, []) if n == want), None)
            cells.append(f"{(at - t0_ns) / 1e6:7.0f}" if at is not None else f"{'-':>7}")
        rows.append(f"{cid[-8:]:>8} " + "".join(cells))
    return [f"{'ms':>8} " + "".join(f"{c:>7}" for c, _, _ in TIMELINE), *rows]


def host_busy(samples: list[tuple[float, float, float]], step: float = 0.5) -> str:
    """The host's CPU use (in cores) per `step` seconds, from /proc/stat samples (t, busy, total)."""
    out = []
    cores = os.cpu_count() or 1
    i = 0
    while i < len(samples) - 1:
        j = i + 1
        while j < len(samples) - 1 and samples[j][0] - samples[i][0] < step:
            j += 1
        _, busy, total = samples[i]
        _, busy2, total2 = samples[j]
        out.append(f"{cores * (busy2 - busy) / max(1e-9, total2 - total):.1f}")
        i = j
    return " ".join(out)


# The start-rate sampler reads the process trees of the pool's VMs being made (not ready) once in this
# many of its 0.1 s rounds.
UNREADY_EVERY = 5


def proc_stat() -> tuple[float, float]:
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def start_rate(ctd: Containerd, runtime: str, count: int, concurrency: int,
               opts: tuple[str, ...] = (), pooled: bool = False,
               timing: Path | None = None) -> dict[str, Any]:
    """`count` `ctr run -d`, `concurrency` at a time: containers per second and the CPU seconds per
    container. The CPU is what each container's own processes used from their start until all had
    started (pykata: its shim and QEMU, the guest included; runc: its shim and the container's
    processes), split by process, read from the processes themselves, so other load on the host does
    not count in it; beside it, containerd's (with its short-lived `shim start`/`delete` children) and
    the `ctr` clients', measured as differences over the run. `pooled`: the pool's waiting VMs' CPU
    before the claim (their fill, off the start path) is taken out of the containers' and reported
    apart, with the CPU of the VMs the pool started during the run (its refill). `timing`: the
    PYKATA_TIMING_FILE containerd got; the result then has a timeline of each container's start (when
    each phase began), the host's CPU use and the pool's ready VMs every half second."""
    ids = [f"rate-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    before = pool_cpu() if pooled else {}
    qemus_before = pool_qemus() if pooled else {}
    # each waiting VM's CPU until it was claimed: the last sample while it was still in the pool (it
    # waits paused, so this is its fill's cost), also for VMs the refill made ready during the run
    last_seen: dict[int, dict[int, float]] = dict(before)
    done = threading.Event()

    busy: list[tuple[float, float, float]] = []
    ready_seen: list[tuple[float, int, int]] = []

    settled: set[int] = set()

    def sample() -> None:
        rounds = 0
        while not done.wait(0.1):  # its reads cost CPU the starts need: not more often
            if pooled:
                # a VM that gets ready is read at once (claimed, its CPU from then on is the start's); the
                # refill's VMs being made only every UNREADY_EVERY-th time and once after the run. A tree
                # with its QEMU (shim, lifeline wrappers, QEMU) is 0.8-0.9 ms of reads; a waiting shim
                # that defers its VM until the burst is over (pool.quiet_wait) has no QEMU yet, ~0.1 ms,
                # so in a burst served whole by the pool this saves little (the bench's own CPU per
                # start was 0.061-0.068 after, 0.044-0.068 before, load 21-30)
                last_seen.update(pool_cpu(settled, unready=rounds % UNREADY_EVERY == 0))
                rounds += 1
            if timing is not None:
                busy.append((time.monotonic(), *proc_stat()))
                if pooled:
                    from pykata.factory import pool

                    entries = [e for e in pool.list_entries(load_config()) if e.alive]
                    ready_seen.append((time.monotonic(), sum(e.ready for e in entries), len(entries)))

    sampler = threading.Thread(target=sample, daemon=True)
    if pooled or timing is not None:
        if timing is not None:
            timing.write_bytes(b"")
        sampler.start()
    ctd_proc = psutil.Process(ctd.proc.pid) if ctd.proc is not None else None
    ctd_before = cpu_s([ctd_proc.pid]) if ctd_proc is not None else 0.0
    # pykata's fork server runs `start` in children it reaps (pykata.shim.handoff): counted apart
    server = ctd.fork_server_pid()
    server_before = cpu_s([server]) if server is not None else 0.0
    ctd_split_before = own_and_reaped(ctd_proc.pid if ctd_proc is not None else None)
    server_split_before = own_and_reaped(server)
    kthreads_before = kernel_threads_cpu()
    host_before = proc_stat()[0]
    kids_before = os.times()
    try:
        at_own_start: dict[str, float] = {}
        shim_pids: dict[str, int] = {}

        def start_one(cid: str) -> None:
            mark(f"bench.begin@{cid}")
            start_detached(ctd, runtime, cid, opts)
            mark(f"bench.end@{cid}")
            # its shim's process tree (QEMU included) as its `ctr run -d` returned: what its own start
            # cost, without the idle VM's CPU while the others start
            shim = ctd.bundle(cid) / "shim.pid"
            if shim.exists():
                shim_pids[cid] = int(shim.read_text())
            tree = tree_cpu(shim_pids[cid]) if cid in shim_pids else {}
            at_own_start[cid] = sum(c - seen_before(q) for q, c in tree.items())

        def seen_before(pid: int) -> float:
            return next((t[pid] for t in list(last_seen.values()) if pid in t), 0.0)

        start = time.perf_counter()
        t0_ns = time.monotonic_ns()
        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(start_one, ids))
        elapsed = time.perf_counter() - start
        kids_after = os.times()
        host_after = proc_stat()[0]
        kthreads_after = kernel_threads_cpu()
        ctd_split_after = own_and_reaped(ctd_proc.pid if ctd_proc is not None else None)
        server_split_after = own_and_reaped(server)
        done.set()
        if pooled or timing is not None:
            sampler.join()
        if pooled:
            last_seen.update(pool_cpu(settled))  # the refill's VMs as the last start returned
        seen_pid = {pid: c for tree in last_seen.values() for pid, c in tree.items()}
        by_kind: dict[str, float] = {}
        claimed: set[int] = set()
        for cid in ids:
            for kind, pids in container_processes(ctd, cid).items():
                for p in pids:
                    if p in last_seen:
                        claimed.add(p)
                    by_kind[kind] = by_kind.get(kind, 0.0) + cpu_s([p]) - seen_pid.get(p, 0.0)
        out: dict[str, Any] = {
            "per_s": round(count / elapsed, 2),
            "cpu_s_per_container": round(sum(by_kind.values()) / count, 3),
            "cpu_s_by_process": {k: round(v / count, 3) for k, v in by_kind.items() if v},
            "cpu_s_at_own_start": round(statistics.median(at_own_start.values()), 3) if at_own_start else None,
            "containerd_cpu_s": round((cpu_s([ctd_proc.pid]) - ctd_before) / count, 3) if ctd_proc else None,
            "fork_server_cpu_s": round((cpu_s([server]) - server_before) / count, 3) if server is not None else 0.0,
            "ctr_cpu_s": round((kids_after.children_user + kids_after.children_system
                                - kids_before.children_user - kids_before.children_system) / count, 3),
            # this process (its sampler of the pool and of /proc): CPU the host spends beside the starts
            "bench_cpu_s": round((kids_after.user + kids_after.system - kids_before.user - kids_before.system)
                                 / count, 3),
            # containerd itself and the `shim start`/`delete` processes it reaped; the fork server itself
            # and its children that ran a `start` (a claim) and exited; the host's kernel threads; the
            # whole host's busy CPU (/proc/stat: other work on the host included) over the run
            "containerd_own_cpu_s": round((ctd_split_after[0] - ctd_split_before[0]) / count, 3),
            "shim_start_cpu_s": round((ctd_split_after[1] - ctd_split_before[1]) / count, 3),
            "fork_server_own_cpu_s": round((server_split_after[0] - server_split_before[0]) / count, 3),
            "fork_server_children_cpu_s": round((server_split_after[1] - server_split_before[1]) / count, 3),
            "kernel_threads_cpu_s": round((kthreads_after - kthreads_before) / count, 3),
            "host_busy_cpu_s": round((host_after - host_before) / os.sysconf("SC_CLK_TCK") / count, 3),
            "elapsed_s": round(elapsed, 3)}
        if timing is not None:
            out["timeline"] = timeline(timing, shim_pids, t0_ns)
            out["host_cores_busy_per_half_s"] = host_busy(busy)
            if ready_seen:
                t0 = ready_seen[0][0]
                out["pool_ready_of_alive"] = " ".join(
                    f"{r}/{a}" for t, r, a in ready_seen if int((t - t0) / 0.1) % 5 == 0)
        if pooled:
            out["pooled_claims"] = len(claimed)
            out["pooled_before_run"] = len(claimed & set(before))
            out["fill_cpu_s_per_claimed"] = round(
                sum(sum(last_seen[p].values()) for p in claimed) / max(1, len(claimed)), 3)
            refill = {p: sum(t.values()) for p, t in last_seen.items() if p not in before}
            out["refill_started"] = len(refill)
            out["refill_cpu_s_during_run"] = round(sum(refill.values()), 3)
            # the claimed QEMUs' threads from before the run (they waited paused) to the last start
            threads: dict[str, list[float]] = {}
            claimed_qemus = [p for p in qemus_before if any(p in last_seen.get(c, {}) for c in claimed)]
            for q in claimed_qemus:
                now = thread_stats(q)
                for name, values in now.items():
                    was = qemus_before[q].get(name, [0.0] * len(values))
                    got = threads.setdefault(name, [0.0] * len(values))
                    for i, v in enumerate(values):
                        got[i] += v - was[i]
            n = max(1, len(claimed_qemus))
            out["qemu_process_cpu_s_per_claim"] = round(sum(
                tree_cpu(q).get(q, 0.0) - seen_pid.get(q, 0.0) for q in claimed_qemus) / n, 3)
            out["qemu_claimed_counted"] = len(claimed_qemus)
            out["qemu_threads_per_claim"] = {k: [round(v[0] / n, 3), round(v[1] / n, 3), round(v[2] / n),
                                                 round(v[3] / n)]
                                             for k, v in sorted(threads.items())}
        return out
    finally:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(ctd.remove, ids))


@contextlib.contextmanager
def config_in_force(path: str | None) -> Any:
    """PYKATA_CONFIG = `path` meanwhile (None: unchanged), as a pod's shim has it when containerd passes it
    `--runtime-config-path`: the pool's VMs serve only pods of the configuration they were made for
    (factory.pool fingerprint), and `pool.fill` starts them with this process's environment."""
    before = os.environ.get("PYKATA_CONFIG")
    if path is not None:
        os.environ["PYKATA_CONFIG"] = path
    try:
        yield load_config()
    finally:
        if before is not None:
            os.environ["PYKATA_CONFIG"] = before
        else:
            os.environ.pop("PYKATA_CONFIG", None)


def server_fork(config: Any, address: str | None) -> Any:
    """pykata.factory.pool.fill's `fork` as a pod's shim passes it (pykata.shim.tasks.pod.refill_pool):
    the waiting shims are forked by the shims' fork server of the containerd at `address`, so they share
    its imported code, as the ones pods refill the pool with do. Started by this process as fresh
    `pool-entry` processes instead, each imported everything itself (~26 MiB private where a forked
    one has ~15), and the pods that claimed them measured 22-23 MiB of shim PSS at N=10 against 18.4
    (2026-12-01). None (fresh
    processes) without an address or with runtime.shim_fork_server off; when no server runs, the one
    launched now serves the next fill and this fill's are fresh, as for a pod's."""
    if address is None or not config.runtime.shim_fork_server:
        return None
    from pykata.shim.forkclient import pool_fork

    return pool_fork(config.runtime.runtime_dir, address)


def fill_pool(size: int, config_path: str | None = None, timeout: float = 600.0,
              address: str | None = None) -> dict[str, Any]:
    """Fill the warm pool to `size` ready VMs of the configuration at `config_path` (None: the one in
    force) and wait for them: the wall time and the CPU seconds each waiting VM's processes used to get
    ready (restore, reseed, warm-up). `address`: containerd's, whose fork server forks them (server_fork)."""
    from pykata.factory import pool

    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        with config_in_force(config_path) as config:
            mine = pool.fingerprint(config)
            pool.fill(config, pool.entry_argv(), fork=server_fork(config, address))
        ready = [e for e in pool.list_entries(config) if e.ready and e.alive and e.fingerprint == mine]
        if len(ready) >= size:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the warm pool did not fill ({len(ready)} of {size} ready)")
        time.sleep(0.2)
    cpu = [sum(tree_cpu(e.pid).values()) for e in ready]
    return {"size": size, "fill_s": round(time.perf_counter() - start, 1),
            "cpu_s_per_vm": round(statistics.median(cpu), 3), "loadavg": os.getloadavg()}


def pool_config(directory: Path, size: int) -> Path:
    """A copy of the configuration in force with factory.pool_size = `size` and a runtime_dir of its
    own (so the pool, and its `destroy` at the end, are this run's only: other checkouts' pools on the
    host are left alone)."""
    from pykata.config.load import find_config_path, packaged_default_text

    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    text = re.sub(r"(?m)^runtime_dir\s*=.*$", f'runtime_dir = "{directory / "run"}"', text)
    path = directory / "pool.toml"
    path.write_text(text.replace("\npool_size = 0\n", f"\npool_size = {size}\n"))
    return path


def set_key(text: str, section: str, name: str, value: str) -> str:
    """`text` (a configuration file) with `name = value` in its [section] instead of the line there.
    Raises SystemExit when the section has no such line."""
    lines = text.splitlines()
    current = ""
    for i, line in enumerate(lines):
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            current = header.group(1).strip()
        elif current == section and re.match(rf"^{re.escape(name)}\s*=", line):
            lines[i] = f"{name} = {value}"
            return "\n".join(lines) + "\n"
    raise SystemExit(f"--variant: no {name} in [{section}] of the configuration to change")


def wait_for_pool(config_path: str | None = None, timeout: float = 120.0, address: str | None = None) -> None:
    """Until a pooled VM of the configuration at `config_path` (None: the one in force) is ready
    (started now if the pool is short of them: forked by the fork server of the containerd at
    `address`, see server_fork)."""
    from pykata.factory import pool

    with config_in_force(config_path) as config:
        mine = pool.fingerprint(config)
        pool.fill(config, pool.entry_argv(), fork=server_fork(config, address))
    deadline = time.monotonic() + timeout
    while not any(e.ready and e.alive and e.fingerprint == mine for e in pool.list_entries(config)):
        if time.monotonic() > deadline:
            raise SystemExit("the warm pool did not fill")
        time.sleep(0.05)


def pool_pss_mib() -> float:
    """PSS of the pool's waiting VMs and their shims, in total."""
    from pykata.factory import pool

    config = load_config()
    total = 0
    for e in pool.list_entries(config):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(e.pid)
            total += sum(pss_kib(p.pid) for p in [proc, *proc.children(recursive=True)])
    return round(total / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=5)
    ap.add_argument("--containers", default="1,10", help="comma-separated container counts for memory")
    ap.add_argument("--tb-sizes", default="0", help="comma-separated tcg_tb_size values (MiB, 0 = default)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE",
                    help="also measure pykata with [hypervisor.qemu] KEY = VALUE, or [SECTION] KEY with "
                         "SECTION.KEY (a runtime config file), e.g. fpr-off=free_page_reporting=false, "
                         "no-fork-server=runtime.shim_fork_server=false")
    ap.add_argument("--rate", default="", help="comma-separated concurrencies for the start rate, e.g. 1,4")
    ap.add_argument("--rate-count", type=int, default=8, help="containers per start-rate measurement")
    ap.add_argument("--rate-rounds", type=int, default=1,
                    help="timed runs per concurrency (runc and pykata alternate; the pool refilled before each)")
    ap.add_argument("--pool", action="store_true", help="pykata with a warm pool (see above)")
    ap.add_argument("--pool-size", type=int, default=1)
    ap.add_argument("--skip-runc-memory", action="store_true", help="runc memory only at N=1")
    ap.add_argument("--timeline", action="store_true",
                    help="with --rate: when each phase of each container's start began (PYKATA_TIMING_FILE "
                         "marks), the host's CPU use and the pool's ready VMs every half second")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.containers.split(",") if c]
    rates = [int(c) for c in args.rate.split(",") if c]
    tb_sizes = [int(t) for t in args.tb_sizes.split(",") if t]

    tmp = Path(tempfile.mkdtemp(prefix="ctr-bench-"))
    if args.pool:
        os.environ["PYKATA_CONFIG"] = str(pool_config(tmp, args.pool_size))
    timing = tmp / "timing" if args.timeline else None
    if timing is not None:
        os.environ[TIMING_ENV] = str(timing)  # containerd and every shim it runs inherit it
    ctd = Containerd(tmp / "ctd")
    pool_wait = functools.partial(wait_for_pool, address=str(ctd.socket)) if args.pool else None
    result: dict[str, Any] = {"loadavg_start": os.getloadavg(), "pool": args.pool_size if args.pool else 0}
    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
                str(export_oci_archive(image, tmp / "busybox.tar", IMAGE)))
        variants: dict[str, tuple[str, ...]] = {RUNC_RUNTIME: ()}
        for tb in tb_sizes:
            name = PYKATA_RUNTIME if tb == 0 else f"{PYKATA_RUNTIME} tb-size={tb}"
            if tb == 0:
                variants[name] = ()
            else:
                cfg = tmp / f"tb{tb}.toml"
                if args.pool:  # as for --variant below: the whole configuration, its pool kept
                    cfg.write_text(set_key(Path(os.environ["PYKATA_CONFIG"]).read_text(), "hypervisor.qemu",
                                           "tcg_tb_size", str(tb)))
                else:
                    cfg.write_text(f"[hypervisor.qemu]\ntcg_tb_size = {tb}\n")
                variants[name] = ("--runtime-config-path", str(cfg))
        for v in args.variant:
            vname, key, value = v.split("=", 2)
            cfg = tmp / f"{vname}.toml"
            section, _, name = key.rpartition(".") if "." in key else ("hypervisor.qemu", "", key)
            if args.pool:
                # --runtime-config-path replaces the whole configuration: the variant's must keep the pool
                cfg.write_text(set_key(Path(os.environ["PYKATA_CONFIG"]).read_text(), section, name, value))
            else:
                cfg.write_text(f"[{section}]\n{name} = {value}\n")
            variants[f"{PYKATA_RUNTIME} {vname}"] = ("--runtime-config-path", str(cfg))
        runtime_of = {name: RUNC_RUNTIME if name == RUNC_RUNTIME else PYKATA_RUNTIME for name in variants}
        # each pykata variant waits for a pooled VM of its own configuration (a shim claims with the one
        # containerd passes it; before, a --tb-sizes variant had no pool at all and a --variant one
        # waited for any ready VM, often the base configuration's, which its pod refused)
        config_of = {name: (opts[1] if opts else None) for name, opts in variants.items()}
        for name, opts in variants.items():
            run_rm(ctd, runtime_of[name], opts)  # warm-up: caches, and the VM template on a first pykata run
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, opts in variants.items():
                if pool_wait is not None and runtime_of[name] == PYKATA_RUNTIME:
                    pool_wait(config_of[name])
                times[name].append(run_rm(ctd, runtime_of[name], opts))
        runc = statistics.median(times[RUNC_RUNTIME])
        result["run_rm_true"] = [
            {"variant": name, "runs": args.runs, "runc_s": round(runc, 3),
             "median_s": round(statistics.median(ts), 3), "ratio": round(statistics.median(ts) / runc, 1),
             "all_s": [round(t, 3) for t in ts]}
            for name, ts in times.items() if name != RUNC_RUNTIME]
        result["memory"] = []
        for n in counts:
            if n == 1 or not args.skip_runc_memory:
                result["memory"].append(memory(ctd, RUNC_RUNTIME, n))
            for name, opts in variants.items():
                if name != RUNC_RUNTIME:
                    wait = functools.partial(pool_wait, config_of[name]) if pool_wait is not None else None
                    result["memory"].append({**memory(ctd, runtime_of[name], n, opts, wait), "runtime": name})
        if args.pool:
            result["pool_waiting_pss_mib"] = pool_pss_mib()
        result["start_rate"] = []
        for c in [c for c in rates for _ in range(args.rate_rounds)]:
            for name, opts in variants.items():
                pooled = args.pool and runtime_of[name] == PYKATA_RUNTIME
                filled = fill_pool(args.pool_size, config_of[name], address=str(ctd.socket)) if pooled else None
                load = os.getloadavg()
                r = start_rate(ctd, runtime_of[name], args.rate_count, c, opts, pooled,
                               timing if runtime_of[name] == PYKATA_RUNTIME else None)
                result["start_rate"].append({"variant": name, "concurrency": c, "containers": args.rate_count,
                                             **r, "pool_filled": filled, "loadavg": load,
                                             "loadavg_end": os.getloadavg()})
    finally:
        ctd.stop()
        if args.pool:
            from pykata.factory import pool

            pool.destroy(load_config())  # PYKATA_CONFIG names a file in tmp
        shutil.rmtree(tmp, ignore_errors=True)  # containerd's root, the image archive
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for r in result["run_rm_true"]:
        print(f"ctr run --rm busybox true (median of {r['runs']}): runc {r['runc_s']:.3f} s, "
              f"{r['variant']} {r['median_s']:.3f} s, ratio {r['ratio']}x  (runs: {r['all_s']})")
    runc_start = {m["containers"]: m["start_median_s"] for m in result["memory"] if m["runtime"] == RUNC_RUNTIME}
    for m in result["memory"]:
        parts = ", ".join(f"{k} {v}" for k, v in m["breakdown_mib"].items())
        q = m.get("qemu_breakdown_mib")
        base = runc_start.get(m["containers"])
        ratio = f" ({m['start_median_s'] / base:.1f}x runc)" if base and m["runtime"] != RUNC_RUNTIME else ""
        print(f"N={m['containers']}, {m['runtime']}: `ctr run -d` median {m['start_median_s']} s{ratio}, "
              f"max {m['start_max_s']} s; {m['pss_mib_per_container']} MiB PSS per container ({parts})"
              + (f"; qemu: {', '.join(f'{k} {v}' for k, v in q.items())}" if q else "")
              + f"; load {m['loadavg'][0]:.1f}")
    if "pool_waiting_pss_mib" in result:
        print(f"the pool's waiting VMs with their shims: {result['pool_waiting_pss_mib']} MiB PSS in total")
    base: dict[str, Any] = {}
    for r in result["start_rate"]:
        if r["variant"] == RUNC_RUNTIME:
            base = r  # the runc run of the same round, just before
        else:
            split = ", ".join(f"{k} {v}" for k, v in r["cpu_s_by_process"].items())
            print(f"start rate, {r['concurrency']} at a time, {r['containers']} containers: {r['variant']} "
                  f"{r['per_s']}/s ({r['cpu_s_per_container']} CPU s per container: {split}; "
                  f"median {r['cpu_s_at_own_start']} as its own start returned; containerd "
                  f"{r['containerd_cpu_s']}, fork server {r['fork_server_cpu_s']}, ctr {r['ctr_cpu_s']}, "
                  f"this bench {r['bench_cpu_s']}), "
                  f"runc {base['per_s']}/s "
                  f"({base['cpu_s_per_container']} CPU s; containerd {base['containerd_cpu_s']}, ctr "
                  f"{base['ctr_cpu_s']}); load {r['loadavg'][0]:.1f} -> {r['loadavg_end'][0]:.1f}")
            if "host_busy_cpu_s" in r:
                print(f"  CPU s per container: containerd itself {r['containerd_own_cpu_s']}, its `shim start`/"
                      f"`delete` processes {r['shim_start_cpu_s']}, fork server itself "
                      f"{r['fork_server_own_cpu_s']} and its exited children {r['fork_server_children_cpu_s']}, "
                      f"kernel threads {r['kernel_threads_cpu_s']}; the whole host {r['host_busy_cpu_s']} "
                      f"({r['elapsed_s']} s)")
            if r.get("pool_filled"):
                f = r["pool_filled"]
                print(f"  pool: filled to {f['size']} ready before the run in {f['fill_s']} s (load "
                      f"{f['loadavg'][0]:.1f}), {f['cpu_s_per_vm']} CPU s per waiting VM; {r['pooled_claims']} "
                      f"starts took a pooled VM ({r['pooled_before_run']} of them ready before the run; "
                      f"{r['fill_cpu_s_per_claimed']} CPU s each before the claim, "
                      f"not counted above); refill during the run: {r['refill_started']} VMs started, "
                      f"{r['refill_cpu_s_during_run']} CPU s until the last start")
            if r.get("qemu_threads_per_claim"):
                print(f"  claimed QEMU per start ({r['qemu_claimed_counted']} QEMUs, process "
                      f"{r['qemu_process_cpu_s_per_claim']} CPU s), by thread "
                      "[CPU s, of it kernel, minor faults, context switches]: "
                      + ", ".join(f"{k} {v}" for k, v in r["qemu_threads_per_claim"].items()))
            if r.get("timeline"):
                print("  timeline (ms after the run began):")
                for line in r["timeline"]:
                    print(f"    {line}")
                print(f"  host CPU in use (cores, per 0.5 s): {r['host_cores_busy_per_half_s']}")
                if r.get("pool_ready_of_alive"):
                    print(f"  pool ready/alive (per 0.5 s): {r['pool_ready_of_alive']}")
    if args.rate_rounds > 1:
        for c in rates:
            for name in variants:
                got = [r["per_s"] for r in result["start_rate"] if r["variant"] == name and r["concurrency"] == c]
                print(f"start rate, {c} at a time, median of {len(got)} rounds: {name} {statistics.median(got):.2f}/s "
                      f"(rounds: {got})")


if __name__ == "__main__":
    main()
