#!/usr/bin/env python3
"""Where the CPU of a pooled VM's pod start goes, phase by phase, on the host and in the guest:

    .venv/bin/python bench/claim_cpu.py [-n 3] [--idle 3] [--variant NAME=SECTION.KEY=VALUE ...]
                                        [--throwaway IMAGE]

Through the Sandbox API (no containerd, no shim start), per round: a VM is made as the warm pool makes
one (Sandbox.create_warm: restore, reseed, warm-up, paused), then handed out as a pod's shim does
(adopt: resume, clock, policy, CreateSandbox), a busybox container running `sleep` is created and
started, and the VM is left idle for --idle seconds. For each phase it prints the median CPU seconds
of QEMU (its vCPU runs the guest: agent, crun, the workload; read from /proc/<pid>/stat, so other load
on the host does not count) and of this process (the host side a pod's shim would run: Python, the
ttrpc client, mounts), and the idle VM's CPU per second, and how big TCG's translation cache is after
each phase (resident MiB: what the guest code run so far cost in host code). With --variant, rounds
alternate between the configuration in force and each variant (e.g. `tb64=hypervisor.qemu.tcg_tb_size=64`). With
--throwaway IMAGE, a variant "throwaway" creates and deletes one container of IMAGE (another image
than the measured busybox: `pause`) through the real path right after the hand-out and before the
measured create, and charges it to the adopt phase: what a warm-up that took the pod's own create path
(image slot, ext4, overlay, crun) would save the pod's first create, against the agent's WarmUp today.
2 cores at 6 starts a second leave ~0.33 CPU s per start for everything on its path.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pykata.config import Config, find_config_path, load_config, packaged_default_text, parse_mapping  # noqa: E402
from pykata.errors import ConfigError, PykataError  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.sandbox import Sandbox, build_spec  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PHASES = ("make (pool, off the start path)", "adopt: resume, clock, CreateSandbox", "create container",
          "start container", "idle, per second", "(a 2nd container: create + start)")
AGENT_LINE = re.compile(r"created container (c\d) .* in (\d+) ms: \d+ storages (\d+), bundle (\d+), crun create (\d+)")


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of `pid` (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


agent_lines: dict[int, dict[str, list[float]]] = {}  # round -> container id -> the agent's split
memory: dict[int, float] = {}  # round -> QEMU's anonymous memory (MiB) once the first container started and idled


tcg: dict[int, list[float]] = {}  # round -> TCG's translation cache (MiB resident) after each phase
# round -> per phase: the guest's own account (GetGuestMetrics) and QEMU's threads, with --guest
guest: dict[int, list[dict[str, float]]] = {}
GUEST_COLUMNS = ("g_user", "g_sys", "g_irq", "g_idle", "agent_usr", "agent_sys", "vcpu", "qemu_main", "qemu_other")


async def guest_snapshot(sb: Sandbox, qemu: int | None) -> dict[str, float]:
    """CPU seconds so far: the guest's user, system, (soft)irq and idle time (its /proc/stat: guest
    time runs with the wall clock, so a vCPU the host does not run still counts), the agent's own
    process (user and system: its Python, and the kernel's work it asked for: mounts, forks), and
    QEMU's vCPU thread(s), main loop and other threads (from /proc, host CPU). The GetGuestMetrics
    call itself is charged to the phase after it."""
    m = await sb.agent.get_guest_metrics(timeout=30)
    out = {"g_user": (m.cpu.user_ns + m.cpu.nice_ns) / 1e9, "g_sys": m.cpu.system_ns / 1e9,
           "g_irq": (m.cpu.irq_ns + m.cpu.softirq_ns) / 1e9, "g_idle": m.cpu.idle_ns / 1e9,
           "agent_usr": m.agent.cpu_user_ns / 1e9, "agent_sys": m.agent.cpu_system_ns / 1e9,
           "vcpu": 0.0, "qemu_main": 0.0, "qemu_other": 0.0}
    for task in Path(f"/proc/{qemu}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        key = "vcpu" if comm.startswith("CPU ") else "qemu_main" if comm.startswith("qemu-system") else "qemu_other"
        out[key] += (int(f[11]) + int(f[12])) / TICK
    return out


def tcg_mib(pid: int | None) -> float:
    """The resident size of QEMU's TCG translation cache (its anonymous rwx mappings): the host code
    translated so far, which every QEMU makes again for the guest code it runs."""
    total, rwx = 0, False
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(maxsplit=6)
            if "-" in head[0] and not head[0].endswith(":"):
                rwx = head[1].startswith("rwx") and len(head) < 6
            elif rwx and head[0] == "Rss:":
                total += int(head[1])
    except OSError:
        pass
    return total / 1024


def anon_mib(pid: int | None) -> float:
    """QEMU's anonymous memory (its own: TCG's translation cache, guest RAM written since the clone,
    heap), which unlike PSS does not depend on how many other VMs share the template's pages."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def one(config: Config, runtime: Path, rootfs: Path, n: int, idle: float,
              throwaway: Path | None = None, with_guest: bool = False) -> list[tuple[float, float]]:
    """[(QEMU CPU s, this process's CPU s)] per phase of PHASES."""
    directory = runtime / "pool" / f"pool-{n:012x}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    host0 = own_cpu()
    sb = await Sandbox.create_warm(config, directory)
    assert sb.vm is not None
    qemu = sb.vm.pid
    out = []
    last = (proc_cpu(qemu), own_cpu())
    out.append((last[0], last[1] - host0))
    tcg[n] = [tcg_mib(qemu)]
    if with_guest:
        guest[n] = [{}]  # the paused VM answers no RPC: its split starts after the hand-out

    async def step() -> None:
        nonlocal last
        now = (proc_cpu(qemu), own_cpu())
        out.append((now[0] - last[0], now[1] - last[1]))
        tcg[n].append(tcg_mib(qemu))
        if with_guest:
            guest[n].append(await guest_snapshot(sb, qemu))
        last = (proc_cpu(qemu), own_cpu())

    try:
        await sb.adopt(f"claimcpu{n}", serve_proxy=True)
        if throwaway is not None:
            other = await sb.create_container("c0", build_spec(["true"], env=["PATH=/bin"]), throwaway)
            await other.delete()
        await step()
        container = await sb.create_container("c1", build_spec(["sleep", "1000"], env=["PATH=/bin"]), rootfs)
        await step()
        await container.start()
        await step()
        await asyncio.sleep(idle)
        await step()
        out[-1] = (out[-1][0] / idle, out[-1][1] / idle)
        memory.setdefault(n, anon_mib(qemu))
        second = await sb.create_container("c2", build_spec(["sleep", "1000"], env=["PATH=/bin"]), rootfs)
        await second.start()
        await step()
        console = getattr(sb.vm, "console_log", None)
        text = console.read_text(errors="replace") if isinstance(console, Path) and console.exists() else ""
        for m in AGENT_LINE.finditer(text):
            agent_lines.setdefault(n, {})[m[1]] = [float(x) for x in m.groups()[1:]]
        return out
    finally:
        await sb.stop(remove=True)


def configuration_in_force() -> tuple[dict[str, Any], str]:
    """The TOML data of the configuration load_config reads, and its name for errors."""
    path = find_config_path()
    if path is None:
        return tomllib.loads(packaged_default_text()), "<packaged default>"
    return tomllib.loads(path.read_text()), str(path)


def with_setting(data: dict[str, Any], source: str, setting: str) -> Config:
    """The configuration `data` with one key set, `SECTION.KEY=VALUE` (VALUE in TOML; a bare word is a
    string), parsed and checked as configuration.toml itself is.

    Raises:
        ConfigError: `setting` is not SECTION.KEY=VALUE (field --variant), or the key is unknown or its
            value bad (field: the dotted key).
    """
    key, eq, text = setting.partition("=")
    parts = key.split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise ConfigError("--variant", f"{setting[:200]!r} is not SECTION.KEY=VALUE")
    try:
        parsed = tomllib.loads(f"v = {text}")
        value = parsed["v"] if list(parsed) == ["v"] else text
    except tomllib.TOMLDecodeError:
        value = text
    tree = copy.deepcopy(data)
    table = tree
    for i, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(".".join(parts[:i + 1]), "is a key, not a section")
    table[parts[-1]] = value
    return parse_mapping(tree, source)


def prepare(args: argparse.Namespace) -> tuple[dict[str, Config], Path, Path | None]:
    """The configurations to compare (before their runtime directory is set) and the images' root
    file systems, all checked before anything is made.

    Raises:
        PykataError: a bad --variant (ConfigError naming the key), configuration or image.
    """
    base = load_config()
    variants = {"as configured": base}
    data, source = configuration_in_force() if args.variant else ({}, "")
    for v in args.variant:
        name, _, setting = v.partition("=")
        if not name or name in variants or (name == "throwaway" and args.throwaway):
            raise ConfigError("--variant", f"{v[:200]!r}: NAME must be given and differ from the others")
        try:
            variants[name] = with_setting(data, source, setting)
        except ConfigError as exc:
            raise ConfigError(f"--variant {v[:200]!r}", str(exc)) from None
    store = ImageStore(base.runtime.cache_path)
    rootfs = store.resolve("busybox").rootfs
    throwaway = store.resolve(args.throwaway).rootfs if args.throwaway else None
    if throwaway is not None:
        variants["throwaway"] = base
    return variants, rootfs, throwaway


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3, help="rounds (each makes one VM per variant)")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds the started VM is left idle")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE")
    ap.add_argument("--throwaway", metavar="IMAGE", help="also a variant with a throwaway container of IMAGE")
    ap.add_argument("--guest", action="store_true",
                    help="also split each phase from the hand-out on by the guest's account (user, system, irq,"
                         " idle, the agent's process) and QEMU's threads (vCPU, main loop, others)")
    args = ap.parse_args()
    global idle_s
    idle_s = args.idle
    try:
        prepared, rootfs, throwaway = prepare(args)
    except PykataError as exc:
        ap.error(str(exc))
    # made once everything was checked (a bad --variant leaves nothing behind), removed on every path
    runtime = Path(tempfile.mkdtemp(prefix="pkcc", dir="/tmp"))  # short: unix socket paths
    try:
        await measure(args, prepared, runtime, rootfs, throwaway)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def measure(args: argparse.Namespace, prepared: dict[str, Config], runtime: Path, rootfs: Path,
                  throwaway: Path | None) -> None:
    variants = {name: dataclasses.replace(c, runtime=dataclasses.replace(c.runtime, runtime_dir=str(runtime)))
                for name, c in prepared.items()}
    results: dict[str, list[list[tuple[float, float]]]] = {v: [] for v in variants}
    with_guest = bool(args.guest)
    rounds_of: dict[str, list[int]] = {v: [] for v in variants}
    loads = []
    for i in range(args.n):
        order = list(variants.items()) if i % 2 == 0 else list(variants.items())[::-1]
        for j, (name, config) in enumerate(order):
            loads.append(os.getloadavg()[0])
            rounds_of[name].append(len(variants) * i + j)
            results[name].append(await one(config, runtime, rootfs, len(variants) * i + j, args.idle,
                                           throwaway if name == "throwaway" else None, with_guest))
    print(f"CPU seconds per phase of a pooled VM's pod start, median of {args.n}; load {min(loads):.1f}-"
          f"{max(loads):.1f}")
    for name, rounds in results.items():
        print(f"{name}:")
        print(f"  {'phase':<40}{'QEMU':>8}{'host':>8}{'TCG MiB after':>15}")
        start_path = [0.0, 0.0]
        for k, phase in enumerate(PHASES):
            q = statistics.median(r[k][0] for r in rounds)
            h = statistics.median(r[k][1] for r in rounds)
            if 0 < k < 4:
                start_path[0] += q
                start_path[1] += h
            t = [tcg[r][k] for r in rounds_of[name] if r in tcg and len(tcg[r]) > k]
            print(f"  {phase:<40}{q:8.3f}{h:8.3f}{statistics.median(t) if t else 0:15.1f}")
        print(f"  {'start path (adopt + create + start)':<40}{start_path[0]:8.3f}{start_path[1]:8.3f}")
        pss = [memory[k] for k in rounds_of[name] if k in memory]
        if pss:
            print(f"  QEMU anonymous memory once its container ran and idled: {statistics.median(pss):.0f} MiB")
    if with_guest:
        print_guest(results, rounds_of)
    print("the agent's account of each create (console), median ms: total = storages + bundle + crun create")
    for name in results:
        for cid in ("c0", "c1", "c2"):
            rows = [agent_lines[k][cid] for k in rounds_of[name] if cid in agent_lines.get(k, {})]
            if rows:
                t, st, b, c = (statistics.median(col) for col in zip(*rows, strict=True))
                print(f"  {name}, {cid}: {t:5.0f} = {st:4.0f} + {b:3.0f} + {c:4.0f}")


def print_guest(results: dict[str, Any], rounds_of: dict[str, list[int]]) -> None:
    print("each phase by the guest's account and QEMU's threads, CPU s, median (idle: per second;"
          " each phase includes one GetGuestMetrics call)")
    for name in results:
        print(f"{name}:")
        print(f"  {'phase':<40}" + "".join(f"{c:>11}" for c in GUEST_COLUMNS))
        for k, phase in enumerate(PHASES[2:], start=2):
            rows = []
            for r in rounds_of[name]:
                g = guest.get(r, [])
                if len(g) > k and g[k - 1]:
                    per = idle_s if k == 4 else 1.0
                    rows.append([(g[k][c] - g[k - 1][c]) / per for c in GUEST_COLUMNS])
            if rows:
                print(f"  {phase:<40}" + "".join(f"{statistics.median(col):11.3f}" for col in zip(*rows, strict=True)))


idle_s = 3.0

if __name__ == "__main__":
    asyncio.run(main())
