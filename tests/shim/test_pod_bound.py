"""A pod cannot use more of the host than its size plus the overhead: a 256 MiB container that fills its
memory is OOM-killed in the guest (exit 137), its VM keeps running, and the sandbox's host cgroup never
went above the limit the shim set (the VM's size plus sizing's host overhead), and the VM's own memory,
page cache not counted, stayed within its size plus that overhead."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from pykata.resources import sizing
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd

pytestmark = [pytest.mark.vm]
MIB = 1 << 20


def _host_memory_cgroup(sandbox_id: str) -> Path:
    for base in (Path("/sys/fs/cgroup/memory/pykata_overhead"), Path("/sys/fs/cgroup/pykata_overhead")):
        if (base / sandbox_id).is_dir():
            return base / sandbox_id
    raise AssertionError(f"no host memory cgroup for {sandbox_id}")


def _read(cg: Path, *names: str) -> int:
    for name in names:
        if (cg / name).exists():
            return int((cg / name).read_text().split()[0])
    raise AssertionError(f"none of {names} in {cg}")


def _stat(cg: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (cg / "memory.stat").read_text().splitlines())}


def _charged(cg: Path) -> tuple[int, int]:
    """(what the cgroup is charged now, the part of it that is page cache on the file LRU lists).

    The page cache is files this pod's QEMU read first on this host (the template's memory file, the
    kernel, the image): charged here, shared with whoever reads them next and reclaimable, unlike the
    VM's own anonymous memory (its guest RAM, the TCG cache, page tables), shared memory included
    (shmem sits on the anon lists: guest RAM in a memfd is not reclaimable without swap)."""
    stat = _stat(cg)
    if (cg / "memory.usage_in_bytes").exists():  # cgroup v1: hierarchical totals
        return _read(cg, "memory.usage_in_bytes"), stat["total_active_file"] + stat["total_inactive_file"]
    return _read(cg, "memory.current"), stat["active_file"] + stat["inactive_file"]


def _tcg_cache_bytes(sandbox_id: str) -> int:
    """Resident bytes of the sandbox's QEMU TCG translation cache (its one large anonymous executable
    mapping). The cache only grows (until full), so read after the peak it bounds what it held then."""
    for proc in Path("/proc").iterdir():
        try:
            if f"pykata-{sandbox_id}," not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            rss, in_cache = 0, False
            for line in (proc / "smaps").read_text().splitlines():
                parts = line.split()
                if parts and "-" in parts[0] and not parts[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    in_cache = len(parts) == 5 and "x" in parts[1] and hi - lo >= 8 << 20
                elif in_cache and parts[0] == "Rss:":
                    rss += int(parts[1]) * 1024
            return rss
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no QEMU process for {sandbox_id}")


def test_a_container_filling_its_memory_is_oom_killed_in_the_guest(containerd: Containerd) -> None:
    cid = f"oom-{uuid.uuid4().hex[:8]}"
    try:
        # the workload keeps all it reads: it grows until the guest's OOM killer ends it
        containerd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, "--memory-limit", str(256 * MIB), IMAGE, cid,
                       "sh", "-c", "sleep 2; tail /dev/zero")
        cg = _host_memory_cgroup(cid)
        limit = _read(cg, "memory.limit_in_bytes", "memory.max")
        vm_mib = 256 + sizing.VM_MEMORY_OVERHEAD_MIB
        tcg_cache = sizing.TCG_DEFAULT_TB_MIB  # this host runs TCG with QEMU's default cache
        assert limit == (vm_mib + sizing.HOST_MEMORY_OVERHEAD_MIB + tcg_cache) * MIB, limit
        # the VM's own (non-reclaimable) use, sampled while the workload grows: guest RAM once touched
        # stays resident and the TCG cache only grows, so its largest sample is its peak
        own_peak, cache_then = 0, 0
        deadline = time.monotonic() + 120
        while True:
            charged, cache = _charged(cg)
            if charged - cache > own_peak:
                own_peak, cache_then = charged - cache, cache
            if containerd.tasks().get(cid) == "STOPPED" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # `tail /dev/zero` never ends by itself: only the guest's OOM killer stops it
        assert containerd.tasks().get(cid) == "STOPPED"
        peak = _read(cg, "memory.max_usage_in_bytes", "memory.peak")
        # ... and the host's cgroup was never at its limit, page cache included: the VM stayed within its size
        assert peak < limit, (peak, limit)
        if (cg / "memory.failcnt").exists():
            assert _read(cg, "memory.failcnt") == 0
        # and the VM's own memory stayed within its size plus the measured overhead plus what QEMU's
        # translation cache holds (it grows with the code the guest runs: the reclaim and OOM-kill
        # paths are new code). The peak charge also counts page cache of files this QEMU read first
        # (the template's memory file, the image): 885 MiB once, 521 MiB the next run.
        tcg_used = _tcg_cache_bytes(cid)
        assert own_peak <= (vm_mib + sizing.HOST_MEMORY_OVERHEAD_MIB) * MIB + tcg_used, \
            (own_peak // MIB, tcg_used // MIB, cache_then // MIB)
        print(f"host peak {peak // MIB} MiB, of which the VM's own {own_peak // MIB} MiB (page cache then "
              f"{cache_then // MIB} MiB); limit {limit // MIB} MiB (VM {vm_mib} MiB, TCG cache {tcg_used // MIB} MiB)")
    finally:
        containerd.remove(cid)
