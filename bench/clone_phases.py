#!/usr/bin/env python3
"""Where a template clone's time to a ready agent goes, phase by phase, and what the next RPCs cost.

For each run: a clone as `pykata.factory.start_vm` makes it (cold: QEMU spawned on the clock;
`--prestart`: QEMU started ahead and waiting, the clock starting at the state load), then the
readiness probe (the agent's health check), then the RPCs a sandbox sends next (ReseedRandomDev,
SetGuestDateTime), each timed, with QEMU's CPU seconds and TCG's translated block count (HMP
`info jit`) after the answer. Medians of N, variants interleaved.

Phases (ms, host clock):
  spawn        fork+exec of QEMU returned
  qmp          QMP negotiated (QEMU's start-up: dynamic linking, devices, machine)
  accept       the early agent connection accepted by QEMU (query-chardev)
  load         the incoming migration of the device state (RAM is the template's file)
  cont         `cont` answered (and the root slots, if any)
  answer       guest running -> the agent's first answer (hello echo + Check + Version)
  next-rpcs    ReseedRandomDev + SetGuestDateTime after ready (a sandbox's next two calls)
  ready        the start of the clock -> ready
  pages-ready  pages of the template's memory the clone wrote until ready (copy-on-write faults;
               pages-launch: before the load)

    .venv/bin/python bench/clone_phases.py [-n 5] [--prestart] [--variant NAME=ENV=VALUE ...]
        [--image NAME=ROOTFS.CPIO ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from boot_bench import find_assets, make_clone_config

from pykata.agentapi.client import Agent
from pykata.factory import ensure_template, start_vm
from pykata.factory.template import sync_guest_clock
from pykata.hypervisor import QemuHypervisor
from pykata.hypervisor.readiness import cpu_seconds


async def tb_count(vm: QemuHypervisor) -> float:
    """TCG's translated blocks so far (HMP info jit), or nan."""
    with contextlib.suppress(Exception):
        out = await vm.qmp.execute("human-monitor-command", {"command-line": "info jit"})
        for line in str(out).splitlines():
            if line.strip().startswith("TB count"):
                return float(line.split()[2])
    return float("nan")


def template_pages_written(pid: int) -> float:
    """Pages of the template's memory file (mapped privately) the clone has written so far: each one a
    copy-on-write fault in QEMU (smaps Anonymous of that mapping: the file is on tmpfs, whose pages
    count as dirty even when only read)."""
    kib = 0
    inside = False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if "-" in first[0] and len(first) >= 5 and first[0][0] in "0123456789abcdef" and ":" not in first[0]:
                inside = len(first) >= 6 and first[-1].rstrip().endswith("/memory")
            elif inside and line.startswith("Anonymous:"):
                kib += int(line.split()[1])
    return kib / 4


async def one(i: int, config: Any, prestart: bool, probe_only: bool) -> dict[str, float]:
    shared = Path(config.runtime.runtime_dir) / f"shared-{i}-{secrets.token_hex(2)}"
    shared.mkdir(parents=True)
    got: list[Agent] = []

    async def probe(vm: Any) -> None:
        got.append(await Agent.connect(vm.agent_endpoint.socket, "bench", timeout=60,
                                       connection=vm.take_agent_connection()))

    vm = await start_vm(f"clone-{i}-{secrets.token_hex(2)}", config, shared_dir=shared, readiness=probe,
                        defer=prestart)
    out: dict[str, float] = {}
    try:
        assert isinstance(vm, QemuHypervisor) and vm.pid is not None
        if prestart:
            await asyncio.sleep(0.3)
            cpu0, tb0 = cpu_seconds(vm.pid), await tb_count(vm)
            out["cpu-launch"] = cpu0  # QEMU's start until it waits for the state (0.3 s idle included)
            out["pages-launch"] = template_pages_written(vm.pid)
            await vm.start()
        else:
            cpu0, tb0 = 0.0, 0.0
        await vm.wait_ready(60)
        cpu1, tb1 = cpu_seconds(vm.pid), await tb_count(vm)
        out["pages-ready"] = template_pages_written(vm.pid)
        ts = vm.timestamps
        t0 = ts["load"] if prestart else ts["start"]
        if not prestart:
            out["spawn"] = ts["qemu_spawned"] - ts["start"]
            out["qmp"] = ts["qmp_connected"] - ts["qemu_spawned"]
            out["pre-load"] = ts["load"] - ts["qmp_connected"]
        accepted = ts.get("accepted", ts["load"])  # (a driver before that mark: counted in load)
        out["accept"] = accepted - ts["load"]
        out["load"] = ts["restored"] - accepted
        out["cont"] = ts["resumed"] - ts["restored"]
        out["answer"] = ts["ready"] - ts["resumed"]
        out["ready"] = ts["ready"] - t0
        out["cpu-ready"] = cpu1 - cpu0
        out["tb-ready"] = tb1 - tb0
        if not probe_only:
            agent = got[0]
            t1 = time.monotonic()
            steps: list[tuple[str, Any]] = [
                ("check2", lambda: agent.check()),
                ("reseed", lambda: agent.reseed_random_dev(secrets.token_bytes(64), str(uuid.uuid4()))),
                ("clock", lambda: sync_guest_clock(agent)),
                ("check3", lambda: agent.check())]
            for name, call in steps:
                c, t, w = cpu_seconds(vm.pid), await tb_count(vm), time.monotonic()
                await call()
                out[f"rpc-{name}"] = time.monotonic() - w
                out[f"cpu-{name}"] = cpu_seconds(vm.pid) - c
                out[f"tb-{name}"] = await tb_count(vm) - t
            out["next-rpcs"] = time.monotonic() - t1
    finally:
        for a in got:
            await a.close()
        await vm.stop()
        shutil.rmtree(shared, ignore_errors=True)
    return out


def variant_env(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition("=")
    env = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        env[k] = v
    return name, env


def _variant_name(image: str, env_name: str) -> str:
    if not image:
        return env_name
    return image if env_name == "default" else f"{image}/{env_name}"


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    kernel, initrd = find_assets(args.kernel, args.initrd, True)
    assert initrd is not None
    workdir = Path(tempfile.mkdtemp(prefix="pkclone"))
    variants = [variant_env(v) for v in args.variant] or [("default", {})]
    try:
        # --image NAME=CPIO: one template per guest image, its clones interleaved with the others'
        images = [tuple(v.split("=", 1)) for v in args.image] or [("", str(initrd))]
        configs: dict[str, Any] = {}
        for j, (image, cpio) in enumerate(images):
            (workdir / str(j)).mkdir()
            configs[image] = make_clone_config(workdir / str(j), 512, kernel, Path(cpio), args.kernel_params)
            await ensure_template(configs[image])
        names = [(_variant_name(image, name), image, env) for image, _ in images for name, env in variants]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in names}
        for i in range(args.n):
            for name, image, env in (names if i % 2 == 0 else names[::-1]):
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    r = await one(i, configs[image], args.prestart, args.probe_only)
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                runs[name].append(r)
                print(f"[clone_phases] {name} {i + 1}/{args.n}: ready {1000 * r['ready']:.1f} ms "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        results = []
        for name, rs in runs.items():
            phases = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            results.append({"variant": name, "n": len(rs), "phases": phases,
                            "all": {k: [r[k] for r in rs] for k in rs[0]}})
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--prestart", action="store_true", help="QEMU started ahead; the clock starts at the load")
    ap.add_argument("--probe-only", action="store_true", help="no RPCs after the probe")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=ENV=VALUE[,ENV=VALUE]: environment for the clone's QEMU start (interleaved)")
    ap.add_argument("--kernel", help="vmlinux (default: the cached build, as pykata gives it to QEMU)")
    ap.add_argument("--initrd", help="the guest image's rootfs.cpio (default: the cached build of this tree)")
    ap.add_argument("--image", action="append", default=[],
                    help="NAME=ROOTFS.CPIO: A/B guest images, a template each, their clones interleaved (repeat)")
    ap.add_argument("--kernel-params", default="", help="appended to the guest kernel's command line")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    results = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}, {'prestarted' if args.prestart else 'cold QEMU'}")
    for r in results:
        print(f"{r['variant']} (n={r['n']}, medians):")
        for k, v in r["phases"].items():
            count = k.startswith(("tb-", "pages-"))
            unit = "" if count else " ms"
            val = v if count else 1000 * v
            spread = r["all"][k]
            lo, hi = min(spread), max(spread)
            if not count:
                lo, hi = 1000 * lo, 1000 * hi
            print(f"  {k:<10} {val:8.1f}{unit}  ({lo:.1f}-{hi:.1f})")


if __name__ == "__main__":
    main()
