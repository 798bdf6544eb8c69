#!/usr/bin/env python3
"""Cold boot A/B: guest images and kernel parameters, interleaved, in QEMU CPU seconds.

    .venv/bin/python bench/boot_ab.py -n 6 base=/tmp/base.cpio new=/tmp/new.cpio \
        "new-norng=/tmp/new.cpio:initcall_blacklist=virtio_rng_init" "newk=/tmp/new.cpio,/tmp/vmlinux"

Each variant is LABEL=INITRD[,VMLINUX][:KERNEL PARAMETERS][@CPU MODEL]. Every round boots each variant once
with `bench/boot_bench.py -n 1 --guest image --initrd INITRD [--kernel VMLINUX] [--kernel-params ...]
[--cpu-model ...]` (the parameters are appended to the command line pykata builds; the CPU model replaces
QEMU's -cpu, e.g. "new-noerms=/tmp/new.cpio@max,-erms,-fsrm"), in an order reversed every other round, so a
load that changes during the run reaches every variant alike. Prints each boot's QEMU CPU to ready and
its phases (boot_bench's cpu-* rows, from the guest's boot marks), then per variant the medians, how many
rounds it was lowest in QEMU CPU, and the host load range. On this shared 2-core host QEMU CPU seconds
say what a change saves; wall times mostly say how busy the host was. An image to compare against is
made from another checkout's sources with `PYTHONPATH=<checkout>/src .venv/bin/pykata image build` (the
path is printed; copy the cpio aside, since the cache keeps only its 16 newest builds); a kernel to
compare against is a `vmlinux` copied out of /var/cache/pykata/kernel/<key>/.
(Before 2026-11-30 the parameters went through PYKATA_CONFIG, which boot_bench's own configuration
ignores: A/B figures of kernel parameters from earlier sessions compared a variant with itself.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
PHASES = ("qemu-cpu", "ready", "cpu-to-py", "cpu-unpack", "cpu-initrd", "cpu-kernel", "cpu-python", "cpu-init",
          "cpu-imports", "cpu-agent")


class Variant(NamedTuple):
    label: str
    initrd: Path
    kernel: Path | None
    params: str
    cpu_model: str = ""


def parse_variant(text: str) -> Variant:
    label, eq, rest = text.partition("=")
    rest, _, cpu_model = rest.partition("@")
    files, _, params = rest.partition(":")
    initrd, _, kernel = files.partition(",")
    if not eq or not label or not initrd:
        sys.exit(f"boot_ab: variant {text!r}: expected LABEL=INITRD[,VMLINUX][:KERNEL PARAMETERS][@CPU MODEL]")
    for what, path in (("initrd", initrd), ("kernel", kernel)):
        if path and not Path(path).is_file():
            sys.exit(f"boot_ab: variant {label}: no such {what} {path}")
    return Variant(label, Path(initrd), Path(kernel) if kernel else None, params, cpu_model)


def one_boot(v: Variant, quiet: bool = False) -> dict[str, float] | None:
    cmd = [sys.executable, str(HERE / "boot_bench.py"), "-n", "1", "--guest", "image", "--initrd", str(v.initrd),
           "--json", *(["--quiet"] if quiet else [])]
    if v.kernel is not None:
        cmd += ["--kernel", str(v.kernel)]
    if v.params:
        cmd += [f"--kernel-params={v.params}"]
    if v.cpu_model:
        cmd += [f"--cpu-model={v.cpu_model}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        phases = json.loads(proc.stdout)[0]["phases"]
    except (ValueError, LookupError):
        print(f"  boot failed: {proc.stderr.strip()[-400:]}", flush=True)
        return None
    return {name: s["median"] for name, s in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=4, help="rounds (default 4)")
    ap.add_argument("--quiet", action="store_true", help="boot_bench --quiet: the kernel's 'quiet', as pykata boots")
    ap.add_argument("variants", nargs="+", help="LABEL=INITRD[,VMLINUX][:KERNEL PARAMETERS][@CPU MODEL]")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    rows: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
    wins = dict.fromkeys(rows, 0)
    for i in range(args.n):
        this_round: dict[str, float] = {}
        for v in variants if i % 2 == 0 else variants[::-1]:
            label = v.label
            load = float(Path("/proc/loadavg").read_text().split()[0])
            got = one_boot(v, args.quiet)
            if got is None:
                continue
            got["load"] = load
            rows[label].append(got)
            this_round[label] = got["qemu-cpu"]
            print(f"{label} round {i} load {load:.1f} "
                  + " ".join(f"{k}={got[k]:.3f}" for k in PHASES if k in got), flush=True)
        if this_round:
            wins[min(this_round, key=this_round.__getitem__)] += 1
    print("medians per variant (QEMU CPU seconds; ready is wall):")
    for label, runs in rows.items():
        if not runs:
            print(f"  {label}: no boot succeeded")
            continue
        loads = [r["load"] for r in runs]
        medians = " ".join(f"{k}={statistics.median(r[k] for r in runs):.3f}" for k in PHASES
                           if all(k in r for r in runs))
        print(f"  {label} n={len(runs)} lowest in {wins[label]} rounds, "
              f"load {min(loads):.1f}-{max(loads):.1f}: {medians}")


if __name__ == "__main__":
    main()
