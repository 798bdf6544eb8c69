#!/usr/bin/env python3
"""Boot benchmark: QEMU start -> kernel -> init -> agent channel ready, per phase, median of N.

Two guests:
  tiny   the cached kernel + a busybox initrd whose init writes to the agent virtio-serial port; the
         host measures the first byte on the channel socket. The floor of what the VM layer costs.
  image  the cached kernel + the root filesystem of `pykata image build`; ready when the agent prints
         PYKATA_AGENT_READY (it is then serving ttrpc on the channel).
  clone  (--template) the image guest started from a VM template (pykata.factory) with a
         9p share like a sandbox's; ready when the agent answers a health check over the channel.
         The template is made once before the runs (its time is reported as template-make).
  prestarted (--template --prestart) the clone, but from a QEMU started ahead and waiting for the
         template's state (QemuHypervisor.launch: a pre-started VMM, as Firecracker's snapshot load
         is timed from a running VMM); its phases count from the moment the state load begins, and
         `waiting-pss`/`waiting-cpu` say what the waiting QEMU cost (PSS MiB, CPU s) until then.

Phases (host wall clock unless noted):
  spawn        QEMU fork+exec returned
  qmp          QMP connected (QEMU has set the machine up)
  pre-kernel   QEMU start until the guest clock starts: total - guest uptime at ready (tiny only)
  kernel       guest uptime when init starts (guest clock; tiny only)
  init         init start until the channel is written (guest clock; tiny only)
  to-init      QEMU start until the kernel prints "Run /init" (host clock; image only, which therefore
               boots without "quiet")
  userspace    from "Run /init" until the agent is ready (image only: init script + Python agent)
  image only, from the guest's boot marks (kernel parameter PYKATA_BOOT_MARKS=1, see agent/pid1.py),
  each as QEMU CPU seconds (cpu-*: what the phase costs whatever the host's load) and host wall
  seconds (wall-*):
    *-unpack   QEMU start until the kernel starts unpacking the initramfs
    *-initrd   unpacking it (until "Freeing initrd memory")
    *-kernel   the rest of the kernel, until "Run /init"
    *-python   Python's own start, from "Run /init" until /init's first line runs
    *-init     setting the VM up (mounts, cgroups, lo, the agent's port: agent/pid1.py)
    *-imports  importing the agent
    *-agent    the agent's start until it serves (PYKATA_AGENT_READY)
    *-to-py    (--quiet, which boots with the kernel's "quiet" as pykata does, so the kernel prints no
               marks) QEMU start until /init's first line: the kernel phases and Python's start
  ready        QEMU start until the host sees the guest ready on the channel (the figure that counts)
  qemu-cpu     CPU seconds QEMU used until ready (all threads): what `ready` would be on an idle host
  tcg-mib      TCG's translation cache resident at ready (MiB): host code made for the guest code run so far
               with a spare core, useful when the machine is busy
  qemu-starved seconds QEMU's most starved thread was ready to run but waited for a host CPU, from
               QEMU's start until ready (schedstat run_delay): the part of `ready` the host's load
               took, which the boot deadline does not count (pykata.hypervisor.readiness.BootDeadline)
  restore      QEMU start until the saved state is loaded and the guest continues (clone only;
               prestarted: from the start of the load)
  answer       from the guest's continuing until the host has the agent's first answer (clone only):
               the guest code that answers, translated afresh by a new QEMU's TCG
  stop         stop(): QMP quit, reap, clean up

    .venv/bin/python bench/boot_bench.py [-n 5] [--guest tiny|image|both] [--template [--prestart]] [--json]
        [--quiet] [--kernel VMLINUX] [--initrd CPIO] [--kernel-params ...] [--cpu-model ...] [--console-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from pykata.config import Config, parse_toml
from pykata.factory import ensure_template, start_vm
from pykata.hypervisor import Hypervisor, QemuHypervisor
from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from pykata.hypervisor.readiness import Starvation, cpu_seconds

TINY_INIT = """#!/bin/sh
mount -t proc proc /proc
read up rest < /proc/uptime; echo "PYKATA_T init $up"
mount -t devtmpfs dev /dev
mount -t sysfs sys /sys
port=
while [ -z "$port" ]; do
    for d in /sys/class/virtio-ports/*; do
        read n < $d/name 2>/dev/null
        [ "$n" = agent.channel.0 ] && [ -c /dev/${d##*/} ] && port=/dev/${d##*/}
    done
done
read up rest < /proc/uptime; echo "PYKATA_T ready $up"
until echo PYKATA_CHANNEL_READY > $port; do sleep 0.01; done 2>/dev/null
while true; do sleep 1000; done
"""
_T = re.compile(r"PYKATA_T (\w+) ([\d.]+)")
# Console lines that end each phase of the image guest's boot, in order (see guestimage/init).
BOOT_MARKS = (("unpack", b"Unpacking initramfs"), ("initrd", b"Freeing initrd memory"), ("kernel", b"Run /init"),
              ("python", b"PYKATA_BOOT py "), ("init", b"PYKATA_BOOT setup "), ("imports", b"PYKATA_BOOT imported "),
              ("agent", b"PYKATA_AGENT_READY"))
# --quiet boots as pykata does (kernel "quiet"): the kernel prints none of its marks, so the first phase
# runs from QEMU's start until /init's first line.
QUIET_MARKS = (("to-py", b"PYKATA_BOOT py "), *BOOT_MARKS[4:])


def make_config(workdir: Path, memory: int, verbose_kernel: bool = False, kernel_params: str = "",
                cpu_model: str = "") -> Config:
    return parse_toml(
        f"""
        [hypervisor.qemu]
        default_memory = {memory}
        kernel_params = {json.dumps(kernel_params)}
        cpu_model = {json.dumps(cpu_model)}
        shared_fs = "none"
        enable_debug = {"true" if verbose_kernel else "false"}
        [runtime]
        runtime_dir = "{workdir}/run"
        cache_dir = "{workdir}/cache"
        """
    )


def make_clone_config(workdir: Path, memory: int, kernel: Path, initrd: Path, kernel_params: str = "",
                      cpu_model: str = "") -> Config:
    return parse_toml(
        f"""
        [hypervisor.qemu]
        kernel = "{kernel}"
        initrd = "{initrd}"
        default_memory = {memory}
        kernel_params = {json.dumps(kernel_params)}
        cpu_model = {json.dumps(cpu_model)}
        shared_fs = "virtio-9p"
        [runtime]
        runtime_dir = "{workdir}/run"
        cache_dir = "{workdir}/cache"
        [factory]
        enable_template = true
        template_path = "{workdir}/template"
        """
    )


async def channel_first_byte(vm: Hypervisor) -> None:
    """Ready when the guest has written to the agent virtio-serial port."""
    path = vm.agent_endpoint.socket
    assert path is not None
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            break
        except OSError:
            await asyncio.sleep(0.002)
    try:
        data = await reader.read(64)
        if not data:
            raise RuntimeError("agent channel closed before the guest wrote")
    finally:
        writer.close()


async def seen_at(console: Path, marker: bytes) -> float:
    """Host time at which `marker` appears on the console (QEMU writes the file as the guest prints)."""
    while True:
        try:
            if marker in console.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.002)


def qemu_cpu(pid: int) -> float:
    """CPU seconds all of QEMU's threads have run (schedstat: nanoseconds, unlike cpu_times' ticks)."""
    total = 0
    for tid in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that just ended
            total += int((tid / "schedstat").read_text().split()[0])
    return total / 1e9


async def boot_marks(vm: QemuHypervisor, t0: float, out: dict[str, float],
                     marks: tuple[tuple[str, bytes], ...] = BOOT_MARKS) -> None:
    """Fill `out` with cpu-<phase> and wall-<phase> as each of `marks` appears on the console."""
    assert vm.pid is not None
    at = 0
    last_cpu = last_wall = 0.0
    while at < len(marks):
        try:
            log = vm.console_log.read_bytes()
        except FileNotFoundError:
            log = b""
        while at < len(marks) and marks[at][1] in log:
            cpu, wall = qemu_cpu(vm.pid), time.monotonic() - t0
            name = marks[at][0]
            out[f"cpu-{name}"], out[f"wall-{name}"] = cpu - last_cpu, wall - last_wall
            last_cpu, last_wall = cpu, wall
            at += 1
        await asyncio.sleep(0.002)


async def one_boot(i: int, guest: str, config: Config, kernel: Path, initrd: Path,
                   console_dir: Path | None = None, quiet: bool = False) -> dict[str, float]:
    readiness = channel_first_byte if guest == "tiny" else None
    vm: Hypervisor | None = None
    init_seen: asyncio.Task[float] | None = None
    marking: asyncio.Future[None] | None = None
    marks: dict[str, float] = {}
    try:
        waiting: dict[str, float] = {}
        if guest in ("clone", "prestarted"):
            # As a sandbox gets it: the factory picks the template; a share like a sandbox's.
            shared = Path(config.runtime.runtime_dir) / f"shared-{i}"
            shared.mkdir(parents=True)
            vm = await start_vm(f"bench-{guest}-{i}", config, shared_dir=shared, defer=guest == "prestarted")
            if guest == "prestarted":
                assert isinstance(vm, QemuHypervisor) and vm.pid is not None
                await asyncio.sleep(PRESTART_SETTLE)  # QEMU waits, idle, as in a pool
                qemu = psutil.Process(vm.pid)
                waiting = {"waiting-pss": qemu.memory_full_info().pss / 2**20, "waiting-cpu": cpu_seconds(vm.pid)}
                await vm.start()
        else:
            params = ("PYKATA_BOOT_MARKS=1",) if guest == "image" else ()
            vm = QemuHypervisor(f"bench-{guest}-{i}", config, kernel=kernel, initrd=initrd, readiness=readiness,
                                extra_kernel_params=params)
            await vm.prepare()
            await vm.start()
            if guest == "image":
                marking = asyncio.ensure_future(boot_marks(vm, vm.timestamps["start"], marks,
                                                           QUIET_MARKS if quiet else BOOT_MARKS))
        assert isinstance(vm, QemuHypervisor)
        if guest == "image" and not quiet:
            # Needs the kernel's info messages: the image guest boots without "quiet".
            init_seen = asyncio.ensure_future(seen_at(vm.console_log, b"Run /init as init process"))
        starvation = Starvation(vm.pid)  # (from just after QEMU's start: its first ms are not counted)
        await vm.wait_ready(60)
        starved = starvation()
        if marking is not None:  # the READY line may be read a poll after wait_ready saw it
            await asyncio.wait({marking}, timeout=1)
        ts = vm.timestamps
        t0 = ts["load"] if guest == "prestarted" else ts["start"]
        out = {"ready": ts["ready"] - t0, **waiting, **marks}
        if guest != "prestarted":
            out |= {"spawn": ts["qemu_spawned"] - t0, "qmp": ts["qmp_connected"] - t0}
        if "resumed" in ts:
            out["restore"] = ts["resumed"] - t0
            out["answer"] = ts["ready"] - ts["resumed"]
        if init_seen is not None and init_seen.done():
            out["to-init"] = init_seen.result() - t0
            out["userspace"] = ts["ready"] - init_seen.result()
        if vm.pid is not None:
            # CPU seconds QEMU used until ready: close to the wall time an idle host would see, so
            # runs on a busy machine can still be compared.
            out["qemu-cpu"] = cpu_seconds(vm.pid)  # schedstat: ns, where cpu_times() counts 10 ms ticks
            out["tcg-mib"] = tcg_resident_mib(vm.pid)
            out["qemu-starved"] = starved
        if guest == "tiny":
            marks = dict(_T.findall(vm.console_log.read_text(errors="replace")))
            if "init" in marks and "ready" in marks:
                up_init, up_ready = float(marks["init"]), float(marks["ready"])
                out["kernel"] = up_init
                out["init"] = up_ready - up_init
                out["pre-kernel"] = out["ready"] - up_ready
    finally:
        if init_seen is not None:
            init_seen.cancel()
        if marking is not None:
            marking.cancel()
        stop_at = time.monotonic()
        if vm is not None and console_dir is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(vm.console_log, console_dir / f"{guest}-{i}.log")
        if vm is not None:
            await vm.stop()
    out["stop"] = time.monotonic() - stop_at
    return out


def tcg_resident_mib(pid: int) -> float:
    """The resident size of QEMU's TCG translation cache (its anonymous rwx mappings, MiB): the host
    code translated for the guest code run so far (0 under KVM)."""
    total, rwx = 0, False
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                rwx = head[1].startswith("rwx") and len(head) < 6
            elif rwx and head[0] == "Rss:":
                total += int(head[1])
    return total / 1024


ORDER = ["template-make", "waiting-pss", "waiting-cpu", "spawn", "qmp", "restore", "answer", "pre-kernel", "kernel",
         "init",
         "to-init", "userspace",
         *(f"{kind}-{name}" for kind in ("wall", "cpu") for name, _ in (QUIET_MARKS[:1] + BOOT_MARKS)),
         "ready", "qemu-cpu", "qemu-starved", "tcg-mib", "stop"]
# How long a pre-started QEMU waits before its state is loaded (its set-up is then surely over).
PRESTART_SETTLE = 0.3


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for phase in ORDER:
        values = [r[phase] for r in runs if phase in r]
        if values:
            summary[phase] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


async def bench(guest: str, n: int, memory: int, kernel: Path, initrd: Path | None,
                console_dir: Path | None = None, kernel_params: str = "", cpu_model: str = "",
                quiet: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="pkbench"))
    try:
        config = make_config(workdir, memory, verbose_kernel=guest == "image" and not quiet,
                             kernel_params=kernel_params, cpu_model=cpu_model)
        if guest == "tiny":
            initrd = write_busybox_initrd(workdir / "tiny.cpio", TINY_INIT)
        assert initrd is not None
        made: float | None = None
        if guest in ("clone", "prestarted"):
            config = make_clone_config(workdir, memory, kernel, initrd, kernel_params, cpu_model)
            started = time.monotonic()
            await ensure_template(config)
            made = time.monotonic() - started
        # The accelerator verdict (a KVM trial boot where /dev/kvm exists) is taken once, outside the runs.
        warm = QemuHypervisor("bench-warmup", config, kernel=kernel, initrd=initrd)
        await warm.prepare()
        await warm.stop()
        runs = []
        for i in range(n):
            runs.append(await one_boot(i, guest, config, kernel, initrd, console_dir, quiet))
            print(f"[boot_bench] {guest} run {i + 1}/{n}: ready {runs[-1]['ready']:.3f}s", file=sys.stderr)
        phases = summarize(runs)
        if made is not None:
            phases = {"template-make": {"median": made, "min": made, "max": made}, **phases}
        return {"guest": guest, "runs": n, "memory_mib": memory, "accel": warm.accel.accel if warm.accel else "?",
                "kernel": str(kernel), "initrd": str(initrd), "phases": phases}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def find_assets(kernel: str | None, image_initrd: str | None, want_image: bool) -> tuple[Path, Path | None]:
    from pykata.guestimage.kernel import find_kernel

    k = Path(kernel) if kernel else getattr(find_kernel(), "vmlinux", None)
    if k is None:
        sys.exit("boot_bench: no guest kernel; run `pykata image build` or pass --kernel")
    if kernel is None:  # as pykata gives QEMU the cached kernel (pykata.hypervisor.qemu.assets)
        from pykata.hypervisor.qemu.assets import without_symbols

        k = without_symbols(k)
    initrd: Path | None = Path(image_initrd) if image_initrd else None
    if want_image and initrd is None:
        from pykata.config import load_config
        from pykata.guestimage.rootfs import find_rootfs

        found = find_rootfs(load_config().runtime.cache_path)
        initrd = found.initrd if found else None
    return k, initrd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="boots per guest (default 5)")
    ap.add_argument("--guest", choices=["tiny", "image", "both", "none"], default="both",
                    help="cold-boot guests to time ('none': only --template's clones)")
    ap.add_argument("--memory", type=int, default=512, help="guest MiB (default 512)")
    ap.add_argument("--kernel", help="vmlinux (default: the cached build)")
    ap.add_argument("--initrd", help="initrd for --guest image (default: the cached build)")
    ap.add_argument("--template", action="store_true",
                    help="also boot the image guest from a VM template (guest 'clone')")
    ap.add_argument("--prestart", action="store_true",
                    help="with --template: also clone into a QEMU started ahead (guest 'prestarted')")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kernel-params", default="",
                    help="appended to the guest kernel's command line (hypervisor.qemu.kernel_params)")
    ap.add_argument("--quiet", action="store_true",
                    help="boot the image guest with the kernel's 'quiet', as pykata does: no kernel phases "
                         "(cpu-to-py is QEMU's start until /init's first line)")
    ap.add_argument("--cpu-model", default="", help="QEMU -cpu (hypervisor.qemu.cpu_model; default: pykata's)")
    ap.add_argument("--console-dir", type=Path,
                    help="copy each boot's serial console log here (<guest>-<run>.log), e.g. to read initcall_debug")
    args = ap.parse_args()
    if args.console_dir is not None:
        args.console_dir.mkdir(parents=True, exist_ok=True)
    guests = {"both": ["tiny", "image"], "none": []}.get(args.guest, [args.guest])
    if args.template:
        guests.append("clone")
        if args.prestart:
            guests.append("prestarted")
    kernel, image_initrd = find_assets(args.kernel, args.initrd, bool({"image", "clone"} & set(guests)))
    results = []
    for guest in guests:
        if guest in ("image", "clone", "prestarted") and image_initrd is None:
            print("[boot_bench] no guest image (pykata image build): skipping --guest image", file=sys.stderr)
            continue
        results.append(asyncio.run(bench(guest, args.n, args.memory, kernel, image_initrd, args.console_dir,
                                         args.kernel_params, args.cpu_model, args.quiet)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['guest']}: {r['runs']} boots, {r['memory_mib']} MiB, accel {r['accel']}, initrd {r['initrd']}")
        for phase, s in r["phases"].items():
            unit = " MiB" if phase in ("waiting-pss", "tcg-mib") else "s"
            print(f"  {phase:<11} median {s['median']:.3f}{unit}  (min {s['min']:.3f}, max {s['max']:.3f})")


if __name__ == "__main__":
    main()
