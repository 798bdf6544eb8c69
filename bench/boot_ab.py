#!/usr/bin/env python3
"""Cold boot A/B: guest images and kernel parameters, interleaved, in QEMU CPU seconds.

    .venv/bin/python bench/boot_ab.py -n 6 base=/tmp/base.cpio new=/tmp/new.cpio \
        "new-norng=/tmp/new.cpio:initcall_blacklist=virtio_rng_driver_init"

Each variant is LABEL=INITRD[:KERNEL PARAMETERS]. Every round boots each variant once with
`bench/boot_bench.py -n 1 --guest image --initrd INITRD` (the parameters go in through a copy of the
configuration in effect with hypervisor.qemu.kernel_params set, by PYKATA_CONFIG), in an order reversed every
other round, so a load that changes during the run reaches every variant alike. Prints each boot's
QEMU CPU to ready and its phases (boot_bench's cpu-* rows, from the guest's boot marks), then per
variant the medians, how many rounds it was lowest in QEMU CPU, and the host load range. On this
shared 2-core host QEMU CPU seconds say what a change saves; wall times mostly say how busy the host
was. An image to compare against is made from another checkout's sources with
`PYTHONPATH=<checkout>/src .venv/bin/pykata image build` (the path is printed; copy the cpio aside,
since the cache keeps only its 16 newest builds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("qemu-cpu", "ready", "cpu-unpack", "cpu-initrd", "cpu-kernel", "cpu-python", "cpu-init", "cpu-imports",
          "cpu-agent")


def parse_variant(text: str) -> tuple[str, Path, str]:
    label, eq, rest = text.partition("=")
    initrd, _, params = rest.partition(":")
    if not eq or not label or not initrd:
        sys.exit(f"boot_ab: variant {text!r}: expected LABEL=INITRD[:KERNEL PARAMETERS]")
    if not Path(initrd).is_file():
        sys.exit(f"boot_ab: variant {label}: no such initrd {initrd}")
    return label, Path(initrd), params


def config_with_params(params: str, workdir: Path, label: str) -> Path:
    from pykata.config.load import find_config_path, packaged_default_text

    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    if 'kernel_params = ""' not in text:
        sys.exit(f"boot_ab: {found or 'the packaged configuration'} has no empty kernel_params line to set")
    path = workdir / f"{label}.toml"
    path.write_text(text.replace('kernel_params = ""', f"kernel_params = {json.dumps(params)}", 1))
    return path


def one_boot(initrd: Path, config: Path | None) -> dict[str, float] | None:
    env = dict(os.environ)
    if config is not None:
        env["PYKATA_CONFIG"] = str(config)
    proc = subprocess.run([sys.executable, str(HERE / "boot_bench.py"), "-n", "1", "--guest", "image",
                           "--initrd", str(initrd), "--json"], capture_output=True, text=True, env=env, check=False)
    try:
        phases = json.loads(proc.stdout)[0]["phases"]
    except (ValueError, LookupError):
        print(f"  boot failed: {proc.stderr.strip()[-400:]}", flush=True)
        return None
    return {name: s["median"] for name, s in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=4, help="rounds (default 4)")
    ap.add_argument("variants", nargs="+", help="LABEL=INITRD[:KERNEL PARAMETERS]")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    rows: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    wins = dict.fromkeys(rows, 0)
    with tempfile.TemporaryDirectory(prefix="boot-ab-") as tmp:
        configs = {label: config_with_params(params, Path(tmp), label) if params else None
                   for label, _, params in variants}
        for i in range(args.n):
            this_round: dict[str, float] = {}
            for label, initrd, _ in variants if i % 2 == 0 else variants[::-1]:
                load = float(Path("/proc/loadavg").read_text().split()[0])
                got = one_boot(initrd, configs[label])
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
