"""Real software under pykata vs runc: CPython 3.11's regression-test modules of
tests/cli/test_real_software.py on the cached Debian bookworm rootfs (scripts/debian-rootfs.sh), run by
`pykata run --rm` and by `runc run` on the same bundle, interleaved; prints each module's time inside the
container and the whole run's wall time, and the ratio pykata/runc of each.

    .venv/bin/python bench/real_software.py [--rounds N] [--modules test_os,test_posix]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cli.test_real_software import (
    MODULES,
    debian_rootfs,
    make_bundle,
    module_times,
    run_pykata,
    run_runc,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--modules", default=",".join(MODULES))
    args = ap.parse_args()
    modules = tuple(args.modules.split(","))
    rootfs = debian_rootfs()
    times: dict[str, dict[str, list[float]]] = {"runc": defaultdict(list), "pykata": defaultdict(list)}
    with tempfile.TemporaryDirectory(prefix="realsw-bench-") as tmp:
        bundle = make_bundle(rootfs, Path(tmp), modules)
        for _ in range(args.rounds):
            for name, run in (("pykata", run_pykata), ("runc", run_runc)):
                start = time.monotonic()
                p = run(bundle)
                wall = time.monotonic() - start
                if p.returncode != 0:
                    sys.exit(f"{name} failed ({p.returncode}): {p.stderr[-2000:]}")
                times[name]["(wall, whole run)"].append(wall)
                for module, secs in module_times(p.stdout).items():
                    times[name][module].append(secs)
    print(f"{'module':32} {'runc s':>8} {'pykata s':>9} {'ratio':>7}   (median of {args.rounds})")
    for module in (*modules, "(wall, whole run)"):
        r = statistics.median(times["runc"][module])
        k = statistics.median(times["pykata"][module])
        print(f"{module:32} {r:8.2f} {k:9.2f} {k / r if r else float('inf'):7.1f}")
    print(f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
