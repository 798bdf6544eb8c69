#!/usr/bin/env python3
"""Where an idle pod's host memory goes, part by part (issue 14's memory table).

    .venv/bin/python bench/pod_memory.py [--containers 10] [--settle 5] [--variant NAME=KEY=VALUE]
                                         [--guest-pages] [--shim-pages] [--hold SECONDS] [--json]

A private containerd (tests/shim/harness.py) starts N pykata containers (`ctr run -d <busybox> sleep`),
one after the other, and waits --settle seconds. Then, per container (averaged over the N), from
/proc/<pid>/smaps of each process:
- the shim: PSS, its private pages (written since the fork: refcounts, its own heap), pages still
  shared with the fork server, and the server's PSS share;
- QEMU by mapping (qemu_kind): TCG translation cache, guest RAM dirtied since the clone, guest RAM
  still the template's, the malloc heap, the thread arenas, large malloc blocks mmap'd alone, QEMU's
  own RAM blocks (ROMs), thread and coroutine stacks, QEMU's binary and libraries (private pages:
  relocations, data), other; and the CPU seconds the shim and QEMU used
  so far (start and settle: what a setting such as tcg_tb_size costs);
- the guest as it sees itself (`ctr task exec ... cat /proc/meminfo` in one container): used, page
  cache, slab, free;
- with --guest-pages, the guest RAM written since the clone, page by page against the template's
  memory file (new, now zero, written back identical, a few words changed, rewritten), and how much
  of it two clones wrote identically (what merging identical pages, KSM, could share).
With --shim-pages, each shim the fork server forked against the server, page by page at the same
addresses: still shared, a private copy that differs in at most 16 8-byte words (reference counts and
the interpreter's warm-up counters written as code runs), a copy that differs more, its own pages.
--variant NAME=KEY=VALUE runs the same for a configuration with [SECTION] KEY = VALUE (as ctr_bench's),
interleaved with the default. --hold keeps the containers that long (inspect them by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import struct
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

from bench.ctr_bench import container_processes, mappings, start_detached  # noqa: E402
from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd  # noqa: E402

ZERO_PAGE = bytes(4096)


def qemu_kind(m: dict[str, Any], prev: dict[str, Any] | None, nxt: dict[str, Any] | None) -> str:
    """What one mapping of QEMU is (QEMU 7.2 on glibc: the layout is recognised by sizes and alignment,
    since QEMU's heap objects carry no names)."""
    name = m["name"]
    if name.endswith("/memory") or "memory-backend" in name or name.startswith("/memfd:"):
        return "guest"
    if name == "[heap]":
        return "heap"  # the main thread's malloc heap: devices, memory regions, TCG's TB hash, ...
    if name.startswith("[stack"):
        return "thread_stacks"
    if name.startswith("/"):
        return "binary+libs"  # only their private pages count: relocations, .data/.bss
    if name:
        return "other"
    if "x" in m["perms"]:  # TCG's code buffer: one rwx mapping per region (guard pages between)
        return "tcg_cache"
    guarded_below = prev is not None and not prev["name"] and prev["perms"].startswith("---") \
        and prev["start"] + prev["size"] * 1024 == m["start"]
    reserved_above = nxt is not None and not nxt["name"] and nxt["perms"].startswith("---") \
        and m["start"] + m["size"] * 1024 == nxt["start"]
    # glibc's thread arenas: 64 MiB-aligned reservations, mostly PROT_NONE, the used head rw
    if m["start"] % (64 << 20) == 0 and reserved_above and m["size"] + nxt["size"] == 64 << 10:
        return "arenas"
    if guarded_below and m["size"] == 8 << 10:
        return "thread_stacks"  # 8 MiB (glibc's default) above a guard page
    if guarded_below and m["size"] == 1 << 10:
        return "coroutine_stacks"  # QEMU's 1 MiB coroutine stacks (the 9p server, block I/O)
    if m["start"] % (2 << 20) == 0 and reserved_above and nxt["size"] == 4:
        return "ram_blocks"  # QEMU's own RAM blocks (ROMs, ACPI tables): 2 MiB-aligned, a guard page above
    return "malloc_mmap"  # large malloc blocks mmap'd alone: TCG's softmmu TLBs, big buffers


def qemu_parts(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    maps = mappings(pid)
    for i, m in enumerate(maps):
        kind = qemu_kind(m, maps[i - 1] if i else None, maps[i + 1] if i + 1 < len(maps) else None)
        if kind == "guest":
            # Pages KSM merged are anonymous yet shared: count the mapping's PSS once (never negative)
            anon = min(m.get("Anonymous", 0), m.get("Pss", 0))
            out["guest_dirty"] = out.get("guest_dirty", 0) + anon
            out["guest_template"] = out.get("guest_template", 0) + m.get("Pss", 0) - anon
        else:
            out[kind] = out.get(kind, 0) + m.get("Pss", 0)
    return out


def guest_dirty_pages(pid: int) -> dict[str, Any]:
    """The guest RAM pages QEMU `pid` has written since the clone (private copies of the template's
    memory file), each compared with the template's page: "new" (the template's was zero: memory the
    template never used), "zero" (all zero now), "same" (written back identical), "words" (at most 16
    8-byte words differ: counters, refcounts, list links), "rewritten" (more). Also a digest per page,
    to compare clones (`hashes`: guest page number -> digest)."""
    out: dict[str, Any] = {"new": 0, "zero": 0, "same": 0, "words": 0, "rewritten": 0, "hashes": {}}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[5].endswith("/memory"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path, offset = parts[5], int(parts[2], 16)
            break
    else:
        return out
    pages = (hi - lo) // 4096
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open(f"/proc/{pid}/mem", "rb") as mem, open(path, "rb") as tf:
        pm.seek(lo // 4096 * 8)
        flags = pm.read(pages * 8)
        for i in range(pages):
            v = int.from_bytes(flags[i * 8:i * 8 + 8], "little")
            if not v >> 63 or (v >> 61) & 1:  # not present, or still the file's page
                continue
            mem.seek(lo + i * 4096)
            now = mem.read(4096)
            tf.seek(offset + i * 4096)
            was = tf.read(4096).ljust(4096, b"\0")
            if now == ZERO_PAGE:
                kind = "zero"
            elif was == ZERO_PAGE:
                kind = "new"
            elif now == was:
                kind = "same"
            else:
                changed = sum(1 for j in range(0, 4096, 8) if now[j:j + 8] != was[j:j + 8])
                kind = "words" if changed <= 16 else "rewritten"
            out[kind] += 1
            out["hashes"][i] = hashlib.blake2b(now, digest_size=12).digest()
    return out


def shim_parts(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in mappings(pid):
        private = m.get("Private_Dirty", 0) + m.get("Private_Clean", 0)
        where = "binary+libs" if m["name"].startswith("/") else "anon"
        out[f"private_{where}"] = out.get(f"private_{where}", 0) + private
        out["shared_pss"] = out.get("shared_pss", 0) + m.get("Pss", 0) - private
    return out


def _rw_anon(pid: int) -> list[tuple[int, int]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        name = parts[5] if len(parts) > 5 else ""
        if parts[1].startswith("rw") and name in ("", "[heap]"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def _frames(pid: int, lo: int, hi: int) -> list[int]:
    """The physical frame of each page of [lo, hi) in `pid` (0: not present)."""
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        pm.seek(lo // 4096 * 8)
        data = pm.read((hi - lo) // 4096 * 8)
    return [v & ((1 << 55) - 1) if v >> 63 else 0 for (v,) in struct.iter_unpack("<Q", data)]


def shim_pages(shim: int, server: int) -> dict[str, int]:
    """A shim's writable anonymous pages against its fork server's at the same addresses: "shared" (the
    same physical page), "copy_words" (a private copy differing from the server's page in at most 16
    8-byte words: reference counts, warm-up counters), "copy" (differing more), "own" (the server has no
    page there: the shim's own allocations). Page counts."""
    out = {"shared": 0, "copy_words": 0, "copy": 0, "own": 0}
    server_ranges = _rw_anon(server)
    with open(f"/proc/{shim}/mem", "rb") as sm, open(f"/proc/{server}/mem", "rb") as vm:
        for lo, hi in _rw_anon(shim):
            theirs = {}
            for slo, shi in server_ranges:
                a, b = max(lo, slo), min(hi, shi)
                if a < b:
                    theirs.update(zip(range(a, b, 4096), _frames(server, a, b), strict=True))
            for i, frame in enumerate(_frames(shim, lo, hi)):
                addr = lo + i * 4096
                if not frame:
                    continue
                other = theirs.get(addr, 0)
                if not other:
                    out["own"] += 1
                elif other == frame:
                    out["shared"] += 1
                else:
                    sm.seek(addr)
                    vm.seek(addr)
                    mine, was = struct.iter_unpack("<Q", sm.read(4096)), struct.iter_unpack("<Q", vm.read(4096))
                    out["copy_words" if sum(x != y for x, y in zip(mine, was, strict=True)) <= 16 else "copy"] += 1
    return out


def guest_meminfo(ctd: Containerd, cid: str) -> dict[str, int]:
    p = ctd.ctr("task", "exec", "--exec-id", f"m{uuid.uuid4().hex[:6]}", cid, "cat", "/proc/meminfo",
                check=False, timeout=60)
    out = {}
    for line in p.stdout.decode(errors="replace").splitlines():
        k, _, v = line.partition(":")
        if v.split():
            out[k] = int(v.split()[0])
    return out


def measure(ctd: Containerd, count: int, opts: tuple[str, ...], settle: float, hold: float,
            guest_pages: bool = False, shim_split: bool = False) -> dict[str, Any]:
    ids = [f"pm-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    started: list[str] = []
    try:
        for cid in ids:
            started.append(cid)
            start_detached(ctd, PYKATA_RUNTIME, cid, opts)
        time.sleep(settle)
        shim: dict[str, float] = {}
        qemu: dict[str, float] = {}
        other = 0
        shim_pids = []
        cpu = {"shim": 0.0, "qemu": 0.0}
        for cid in ids:
            procs = container_processes(ctd, cid)
            shim_pids += procs["shim"]
            for p in procs["shim"]:
                for k, v in shim_parts(p).items():
                    shim[k] = shim.get(k, 0) + v
            for kind in cpu:
                for p in procs[kind]:
                    with contextlib.suppress(psutil.Error):
                        t = psutil.Process(p).cpu_times()
                        cpu[kind] += t.user + t.system
            for p in procs["qemu"]:
                for k, v in qemu_parts(p).items():
                    qemu[k] = qemu.get(k, 0) + v
            for p in procs["virtiofsd"] + procs["proxy9p"]:
                other += sum(m.get("Pss", 0) for m in mappings(p))
        server = ctd.fork_server_pid()
        forked = [p for p in shim_pids if server is not None and psutil.Process(p).ppid() == server]
        if server is not None and forked:
            shim["server_share"] = sum(m.get("Pss", 0) for m in mappings(server))
        shim_vs_server: dict[str, float] = {}
        if shim_split and server is not None:
            for p in forked:
                for k, v in shim_pages(p, server).items():
                    shim_vs_server[k] = shim_vs_server.get(k, 0) + v * 4 / 1024 / len(forked)
        guest = guest_meminfo(ctd, ids[0])
        pages: dict[str, float] = {}
        if guest_pages:
            per_vm = [guest_dirty_pages(p) for cid in ids[:2] for p in container_processes(ctd, cid)["qemu"]]
            for d in per_vm:
                for k in ("new", "zero", "same", "words", "rewritten"):
                    pages[k] = pages.get(k, 0) + d[k] * 4 / 1024 / len(per_vm)
            if len(per_vm) == 2:  # written alike by two clones: what merging identical pages could share
                a, b = per_vm[0]["hashes"], per_vm[1]["hashes"]
                pages["alike_in_2_clones"] = sum(1 for pg, h in a.items() if b.get(pg) == h) * 4 / 1024
        if hold:
            print(f"holding {ids} for {hold} s", file=sys.stderr, flush=True)
            time.sleep(hold)

        def per(d: dict[str, float]) -> dict[str, float]:
            return {k: round(v / count / 1024, 1) for k, v in sorted(d.items())}

        g = {k: round(guest.get(k, 0) / 1024, 1) for k in ("MemTotal", "MemFree", "Cached", "Shmem", "Slab",
                                                           "AnonPages", "KernelStack", "PageTables")}
        shim_total = sum(shim.values()) / count / 1024
        qemu_total = sum(qemu.values()) / count / 1024
        return {"containers": count, "loadavg": os.getloadavg(),
                "pss_mib_per_container": round(shim_total + qemu_total + other / count / 1024, 1),
                "shim_mib": round(shim_total, 1), "shim": per(shim),
                "qemu_mib": round(qemu_total, 1), "qemu": per(qemu),
                "helpers_mib": round(other / count / 1024, 1),
                "cpu_s_per_container": {k: round(v / count, 2) for k, v in cpu.items()}, "guest_meminfo_mib": g,
                "guest_dirty_mib": {k: round(v, 1) for k, v in pages.items()},
                "shim_vs_server_mib": {k: round(v, 1) for k, v in shim_vs_server.items()}}
    finally:
        for cid in started:
            ctd.remove(cid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containers", type=int, default=10)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE")
    ap.add_argument("--guest-pages", action="store_true", help="classify the guest pages written since the clone")
    ap.add_argument("--shim-pages", action="store_true",
                    help="compare each forked shim's pages with the fork server's, page by page")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pod-memory-"))
    ctd = Containerd(tmp / "ctd")
    variants: dict[str, tuple[str, ...]] = {"default": ()}
    for v in args.variant:
        vname, key, value = v.split("=", 2)
        cfg = tmp / f"{vname}.toml"
        section, _, name = key.rpartition(".") if "." in key else ("hypervisor.qemu", "", key)
        cfg.write_text(f"[{section}]\n{name} = {value}\n")
        variants[vname] = ("--runtime-config-path", str(cfg))
    results = []

    def show(r: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(r), flush=True)
            return
        print(f"[{r['variant']}] N={r['containers']} load {r['loadavg'][0]:.1f}: "
              f"{r['pss_mib_per_container']} MiB PSS per container (MiB each); CPU seconds each so far: "
              + ", ".join(f"{k} {v}" for k, v in r["cpu_s_per_container"].items()))
        print(f"  shim {r['shim_mib']}: " + ", ".join(f"{k} {v}" for k, v in r["shim"].items()))
        print(f"  qemu {r['qemu_mib']}: " + ", ".join(f"{k} {v}" for k, v in r["qemu"].items()))
        if r["helpers_mib"]:
            print(f"  helpers (virtiofsd, 9p proxy) {r['helpers_mib']}")
        print("  guest (one container's /proc/meminfo): "
              + ", ".join(f"{k} {v}" for k, v in r["guest_meminfo_mib"].items()))
        if r["shim_vs_server_mib"]:
            print("  shim pages against the fork server's (MiB per shim): "
                  + ", ".join(f"{k} {v}" for k, v in r["shim_vs_server_mib"].items()))
        if r["guest_dirty_mib"]:
            print("  guest pages written since the clone (MiB per VM): "
                  + ", ".join(f"{k} {v}" for k, v in r["guest_dirty_mib"].items()))
        sys.stdout.flush()

    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
                str(export_oci_archive(image, tmp / "busybox.tar", IMAGE)))
        for name, opts in variants.items():
            ctd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, *opts, IMAGE, f"w-{uuid.uuid4().hex[:6]}", "true",
                    timeout=300)  # warm-up: the template, the fork server
            results.append({"variant": name, **measure(ctd, args.containers, opts, args.settle, args.hold,
                                                                 args.guest_pages, args.shim_pages)})
            show(results[-1])
    finally:
        ctd.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # containerd's root, the image archive


if __name__ == "__main__":
    main()
