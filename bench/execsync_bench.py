#!/usr/bin/env python3
"""CRI ExecSync latency, the first exec of a pod against the later ones, runc beside pykata.

    .venv/bin/python bench/execsync_bench.py [-n 4] [--execs 3] [--pool P]

Each round runs, per runtime (alternately, in one private CRI containerd), a pod with one busybox
container (`sleep 3600`), then `--execs` ExecSync `echo foo` one after the other, then removes the
pod. Prints the median per exec index over `-n` rounds (a first round warms caches and is not
counted) with the load average. In pod_phases.py's cycle the ExecSync is the pod's first exec; this
bench tells how much of it is the first exec's own cost (Nov 2026: ~+40-100 ms on a fresh clone,
in the agent's ExecProcess; the second container's first exec does not pay it, so it is per VM).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from churn import pooled_containerd  # noqa: E402

from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd  # noqa: E402


def one_pod(cri: Cri, handler: str, name: str, execs: int) -> list[float]:
    """Milliseconds of each ExecSync in a new pod. Raises AssertionError on a wrong answer."""
    pod_id, pod_config = cri.run_pod(name, handler)
    try:
        cid = cri.create_container(pod_id, pod_config, "c0", BUSYBOX_IMAGE, ["sleep", "3600"])
        cri.start_container(cid)
        times = []
        for _ in range(execs):
            t0 = time.monotonic()
            reply = cri.exec_sync(cid, ["echo", "foo"])
            times.append(1000 * (time.monotonic() - t0))
            assert reply.stdout == b"foo\n" and reply.exit_code == 0, reply
        return times
    finally:
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--rounds", type=int, default=4)
    ap.add_argument("--execs", type=int, default=3)
    ap.add_argument("--pool", type=int, default=0, metavar="P", help="also pykata with a warm pool of P VMs")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="execsync-bench-"))
    results: dict[str, list[list[float]]] = defaultdict(list)
    loads = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        ctd = CriContainerd(tmp / "ctd")
        stack.callback(ctd.stop)
        ctd.start()
        ctd.import_images(tmp / "cache")
        loops: list[tuple[str, CriContainerd, str]] = [("runc", ctd, "runc"), ("pykata", ctd, "pykata")]
        if args.pool:
            loops.append(("pykata+pool", stack.enter_context(pooled_containerd(tmp, args.pool)), "pykata"))
        clients = {label: stack.enter_context(Cri(c.socket)) for label, c, _ in loops}
        for i in range(args.rounds + 1):
            for label, _, handler in loops:
                times = one_pod(clients[label], handler, f"execsync-{handler}-{i}-{label[-4:]}", args.execs)
                if i:  # round 0 warms caches
                    results[label].append(times)
            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
    print(f"CRI ExecSync `echo foo` (ms), median of {args.rounds} pods; load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'runtime':<14}" + "".join(f"{'exec #' + str(k + 1):>10}" for k in range(args.execs)))
    for label, rounds in results.items():
        print(f"{label:<14}" + "".join(f"{statistics.median(r[k] for r in rounds):10.1f}"
                                       for k in range(args.execs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
