#!/usr/bin/env python3
"""What one pykata pod costs on the host beyond its guest's memory and vCPUs: the figures behind the
RuntimeClass's overhead.podFixed (pykata.resources.sizing's HOST_* constants, `pykata install runtimeclass`).

    .venv/bin/python bench/overhead_bench.py [--containers 3] [--idle 10] [--memory-limit 256]

A private containerd (tests/shim/harness.py) runs --containers busybox `sleep`s with pykata (each its own
VM, --memory-limit MiB) and as many with runc (the baseline, in the same run). After they settle, for
each pod:
- host memory: PSS of the shim, of QEMU outside its guest-RAM mapping (QEMU's own heap, TCG's
  translation cache, libraries) and of the file server; plus the PSS of the guest-RAM mapping itself
  (what the guest uses, counted against the VM's size, not the overhead);
- CPU at idle: CPU seconds of all the pod's host processes over --idle seconds, as millicores (under
  TCG the idle guest's own ticks are in QEMU's share: they are the vCPUs' cost, reported apart as
  `qemu_vcpu`, beside `qemu_main` (QEMU's other threads), `shim` and `helpers`, each with its
  wakeups per second: voluntary context switches, what an idle pod's timers and pollers cost).
runc's shim PSS and CPU are the baseline; the ratio pykata/runc is printed. Report the load average
printed beside the figures: other VMs on a 2-core machine change the CPU figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.ctr_bench import pss_kib  # noqa: E402
from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from pykata.resources import sizing  # noqa: E402
from pykata.sandbox import sandboxes_dir  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402

MIB = 1 << 20


def smaps_split(pid: int, guest_ram_bytes: int) -> tuple[int, int]:
    """(PSS KiB of the guest-RAM mapping(s), PSS KiB of everything else) of QEMU `pid`: the guest RAM
    is the mapping as large as the VM's boot memory."""
    ram = other = 0
    size = 0
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = head.split("-")
            size = int(hi, 16) - int(lo, 16)
        elif head == "Pss:":
            kib = int(line.split()[1])
            if size == guest_ram_bytes:
                ram += kib
            else:
                other += kib
    return ram, other


def pod_processes(ctd: Containerd, cid: str) -> dict[str, list[psutil.Process]]:
    shim_pid = ctd.bundle(cid) / "shim.pid"
    shim = psutil.Process(int(shim_pid.read_text())) if shim_pid.exists() else \
        next(p for p in ctd.shims() if cid in p.cmdline())
    out: dict[str, list[psutil.Process]] = {"shim": [shim], "qemu": [], "helpers": []}
    marks = (f"{sandboxes_dir(load_config()) / cid}/", f"pykata-{cid},")
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(m in cmd for m in marks):
            out["qemu" if "qemu-system" in cmd else "helpers"].append(p)
    if not out["qemu"]:
        out["helpers"] = shim.children(recursive=True)  # runc: the container's processes
    return out


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


PARTS = ("shim", "qemu_vcpu", "qemu_main", "helpers")
ThreadCounters = dict[int, tuple[float, int]]  # thread id -> (CPU seconds, voluntary context switches)


def _delta(before: ThreadCounters, after: ThreadCounters, i: int) -> float:
    """Counter `i` (0: CPU seconds, 1: wakeups) summed over the threads alive at both samples."""
    return sum(after[t][i] - before[t][i] for t in after.keys() & before.keys())


def thread_counters(pods: dict[str, dict[str, list[psutil.Process]]]) -> dict[str, dict[str, ThreadCounters]]:
    """Per pod and part, CPU seconds and voluntary context switches (wakeups) of every thread. QEMU's
    vCPU threads (named "CPU n/TCG" or "CPU n/KVM" with debug-threads=on) are apart from its other
    threads (the main loop: timers, virtio, QMP), so the guest's own idle cost shows separately."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[str, ThreadCounters]] = {}
    for cid, procs in pods.items():
        parts: dict[str, ThreadCounters] = {k: {} for k in PARTS}
        for kind, ps in procs.items():
            for p in ps:
                try:
                    tids = os.listdir(f"/proc/{p.pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        stat = Path(f"/proc/{p.pid}/task/{tid}/stat").read_text()
                        status = Path(f"/proc/{p.pid}/task/{tid}/status").read_text()
                    except OSError:
                        continue
                    name = stat[stat.index("(") + 1:stat.rindex(")")]
                    fields = stat[stat.rindex(")") + 2:].split()
                    part = kind if kind != "qemu" else ("qemu_vcpu" if name.startswith("CPU ") else "qemu_main")
                    parts[part][int(tid)] = ((int(fields[11]) + int(fields[12])) / hz,
                                             int(status.split("voluntary_ctxt_switches:")[1].split()[0]))
        out[cid] = parts
    return out


def measure(ctd: Containerd, runtime: str, count: int, idle: float, memory_limit: int) -> dict[str, Any]:
    ids = [f"ovh-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    try:
        for cid in ids:
            ctd.ctr("run", "-d", "--runtime", runtime, "--memory-limit", str(memory_limit * MIB),
                    IMAGE, cid, "sleep", "1000000")
        time.sleep(5)  # settle: agent start-up, free page reporting (every 2 s)
        pods = {cid: pod_processes(ctd, cid) for cid in ids}
        q = load_config().qemu
        ram_bytes = (q.balloon_memory() or q.default_memory) * MIB
        mem: dict[str, list[float]] = {"shim": [], "qemu_own": [], "guest_ram": [], "helpers": []}
        for procs in pods.values():
            mem["shim"].append(sum(pss_kib(p.pid) for p in procs["shim"]) / 1024)
            mem["helpers"].append(sum(pss_kib(p.pid) for p in procs["helpers"]) / 1024)
            ram = own = 0
            for p in procs["qemu"]:
                r, o = smaps_split(p.pid, ram_bytes)
                ram, own = ram + r, own + o
            mem["qemu_own"].append(own / 1024)
            mem["guest_ram"].append(ram / 1024)
        before = {cid: cpu_seconds([p for ps in procs.values() for p in ps]) for cid, procs in pods.items()}
        threads_before = thread_counters(pods)
        time.sleep(idle)
        after = {cid: cpu_seconds([p for ps in procs.values() for p in ps]) for cid, procs in pods.items()}
        threads_after = thread_counters(pods)
        milli = [1000 * (after[c] - before[c]) / idle for c in ids]
        per = {k: round(statistics.median(v), 1) for k, v in mem.items()}
        by_part = {k: round(statistics.median(1000 * _delta(threads_before[c][k], threads_after[c][k], 0) / idle
                                              for c in ids), 1) for k in PARTS}
        wakeups = {k: round(statistics.median(_delta(threads_before[c][k], threads_after[c][k], 1) / idle
                                              for c in ids), 1) for k in PARTS}
        return {"runtime": runtime, "pods": count, "memory_limit_mib": memory_limit,
                "pss_mib_median": per,
                "overhead_mib": round(per["shim"] + per["qemu_own"] + per["helpers"], 1),
                "idle_millicores_median": round(statistics.median(milli), 1),
                "idle_millicores_max": round(max(milli), 1),
                "idle_millicores_by_part_median": by_part,
                "idle_wakeups_per_s_by_part_median": wakeups}
    finally:
        for cid in ids:
            ctd.remove(cid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containers", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--memory-limit", type=int, default=256, help="MiB, each container's limit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ovh-bench-"))
    ctd = Containerd(tmp / "ctd")
    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        archive = export_oci_archive(image, tmp / "busybox.tar", IMAGE)
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        load = [round(x, 2) for x in psutil.getloadavg()]
        runc = measure(ctd, RUNC_RUNTIME, args.containers, args.idle, args.memory_limit)
        pykata = measure(ctd, PYKATA_RUNTIME, args.containers, args.idle, args.memory_limit)
        result = {"runc": runc, "pykata": pykata, "loadavg_before": load,
                  "loadavg_after": [round(x, 2) for x in psutil.getloadavg()],
                  "configured": {"HOST_MEMORY_OVERHEAD_MIB": sizing.HOST_MEMORY_OVERHEAD_MIB,
                                 "HOST_CPU_OVERHEAD_MILLI": sizing.HOST_CPU_OVERHEAD_MILLI,
                                 "VM_MEMORY_OVERHEAD_MIB": sizing.VM_MEMORY_OVERHEAD_MIB}}
        runc_mib = max(runc["overhead_mib"], 0.1)
        result["ratio_overhead_pykata_to_runc"] = round(pykata["overhead_mib"] / runc_mib, 1)
        if args.json:
            print(json.dumps(result, indent=1))
            return
        print(f"load average {load} -> {result['loadavg_after']}")
        for r in (runc, pykata):
            print(f"{r['runtime']:26} pods={r['pods']} PSS MiB (median) {r['pss_mib_median']} "
                  f"overhead {r['overhead_mib']} MiB; idle CPU {r['idle_millicores_median']}m "
                  f"(max {r['idle_millicores_max']}m)")
            print(f"{'':26} idle millicores by part {r['idle_millicores_by_part_median']}; "
                  f"wakeups/s {r['idle_wakeups_per_s_by_part_median']}")
        print(f"overhead pykata/runc: {result['ratio_overhead_pykata_to_runc']}x; configured {result['configured']}")
    finally:
        ctd.stop()


if __name__ == "__main__":
    main()
