#!/usr/bin/env python3
"""Where the wall time of one CRI pod cycle goes, per CRI call and per phase inside it, beside runc.

    .venv/bin/python bench/pod_phases.py [-n 5] [--pool P] [--runtime pykata|pool|both] [--json]

The cycle is bench/churn.py's (tests/cri/pod_cycle.py): RunPodSandbox, 2 busybox containers created
and started, ExecSync, status checks, 3 racing StopPodSandbox + 1 more, RemovePodSandbox, then the
wait until the pod's shim, QEMU and virtiofsd are gone. A private CRI containerd gets
PYKATA_TIMING_FILE in its environment and passes it to the shims (pykata.timing): the shim's `start`
and `delete` processes, the long-lived shim (one `task.<RPC>@<task id>/<exec id>` mark at each task
RPC's start and end), the sandbox and the QEMU driver append CLOCK_MONOTONIC marks there. This bench
marks each CRI call's start and end on the same clock (the 3 racing StopPodSandbox calls are one
window, from the first start to the last end).

Prints, per window (a CRI call, or the client's own work between calls), the median over N cycles for
runc, pykata and (with --pool P) pykata with a warm pool of P VMs, measured alternately in the same
run; under each pykata window, the gaps between consecutive marks inside it ("a -> b", task ids
replaced by pod/c0/c1/exec), median of the cycles that had them ([k/N] when not all did). The gaps
sum to their window; work another process does in parallel shows in whichever gap it lands in.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from churn import pooled_containerd  # noqa: E402
from phases import read_marks  # noqa: E402

from pykata.timing import ENV, mark  # noqa: E402
from tests.cri.harness import Cri, CriContainerd  # noqa: E402
from tests.cri.pod_cycle import pod_cycle  # noqa: E402

Marks = list[tuple[int, str]]


class MarkedCri(Cri):
    """A CRI client that marks each call's start and end (bench marks: `cri.<Call>` / `.end`);
    concurrent StopPodSandbox calls make one window."""

    def __init__(self, socket: Path) -> None:
        super().__init__(socket)
        self.roles: dict[str, str] = {}
        self._stops = 0
        self._stops_lock = threading.Lock()

    def _timed(self, call: str, fn: Any, *args: Any) -> Any:
        mark(f"cri.{call}")
        try:
            return fn(*args)
        finally:
            mark(f"cri.{call}.end")

    def run_pod(self, name: str, handler: str) -> tuple[str, Any]:
        pod_id, config = self._timed("RunPodSandbox", super().run_pod, name, handler)
        self.roles[pod_id] = "pod"
        return pod_id, config

    def create_container(self, pod_id: str, pod_config: Any, name: str, image: str, command: list[str]) -> str:
        cid: str = self._timed(f"CreateContainer({name})", super().create_container, pod_id, pod_config, name,
                               image, command)
        self.roles[cid] = name
        return cid

    def start_container(self, cid: str) -> None:
        self._timed(f"StartContainer({self.roles.get(cid, '?')})", super().start_container, cid)

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 30) -> Any:
        return self._timed("ExecSync", super().exec_sync, cid, cmd, timeout)

    def stop_pod(self, pod_id: str) -> None:
        with self._stops_lock:
            self._stops += 1
            if self._stops == 1:
                mark("cri.StopPodSandbox")
        try:
            super().stop_pod(pod_id)
        finally:
            with self._stops_lock:
                self._stops -= 1
                if self._stops == 0:
                    mark("cri.StopPodSandbox.end")

    def remove_pod(self, pod_id: str) -> None:
        self._timed("RemovePodSandbox", super().remove_pod, pod_id)


def normalize(name: str, roles: dict[str, str]) -> str:
    """`task.Create@<64 hex>/` -> `task.Create@pod`; exec ids -> `exec`."""
    if not name.startswith("task.") or "@" not in name:
        return name
    head, _, rest = name.partition("@")
    done = rest.endswith(".done")
    rest = rest.removesuffix(".done")
    tid, _, eid = rest.partition("/")
    who = roles.get(tid, "?") + ("/exec" if eid else "")
    return f"{head}{'.done' if done else ''}@{who}"


def windows(marks: Marks, roles: dict[str, str]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """The cycle's windows in order: (label, seconds, [(gap label, seconds)...]); bench marks delimit
    them, a CRI call's own window is labelled by the call, the client's work between calls by `client`."""
    bench = [(ts, n) for ts, n in marks if n.startswith(("cri.", "cycle."))]
    out: list[tuple[str, float, list[tuple[str, float]]]] = []
    seq: dict[str, int] = defaultdict(int)
    for (t0, a), (t1, b) in itertools.pairwise(bench):
        if a.startswith("cri.") and not a.endswith(".end") and b == f"{a}.end":
            label = a.removeprefix("cri.")
        else:
            label = ("client: waits for the pod's processes to be gone (polls every 0.2 s)" if b == "cycle.end"
                     else f"client: between {a.removeprefix('cri.').removesuffix('.end')} and "
                          f"{b.removeprefix('cri.')}")
        seq[label] += 1
        if seq[label] > 1:
            label = f"{label} #{seq[label]}"
        inner = [(ts, normalize(n, roles)) for ts, n in marks if t0 < ts < t1 and not n.startswith(("cri.", "cycle."))]
        points = [(t0, "begin"), *inner, (t1, "end")]
        gaps: list[tuple[str, float]] = []
        gseq: dict[str, int] = defaultdict(int)
        for (u0, m0), (u1, m1) in itertools.pairwise(points):
            g = f"{m0} -> {m1}"
            gseq[g] += 1
            gaps.append((g if gseq[g] == 1 else f"{g} #{gseq[g]}", (u1 - u0) / 1e9))
        out.append((label, (t1 - t0) / 1e9, gaps))
    return out


def one_cycle(ctd: CriContainerd, cri: MarkedCri, handler: str, timing: Path) -> tuple[float, list[Any]]:
    timing.write_bytes(b"")
    mark("cycle.begin")
    r = pod_cycle(ctd, cri, handler)
    mark("cycle.end")
    if r.leftovers:
        raise SystemExit(f"{handler}: pod {r.pod_id} left {r.leftovers}")
    time.sleep(0.3)  # marks of processes still ending (a `delete` subcommand) land before the next cycle
    return r.seconds, windows(read_marks(timing), cri.roles)


def summarize(cycles: list[list[Any]]) -> list[dict[str, Any]]:
    """Median per window and per gap, windows in the order of the first cycle."""
    order: list[str] = []
    per_window: dict[str, list[float]] = defaultdict(list)
    per_gap: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    gap_order: dict[str, list[str]] = defaultdict(list)
    for cycle in cycles:
        for label, secs, gaps in cycle:
            if label not in order:
                order.append(label)
            per_window[label].append(secs)
            for g, s in gaps:
                if g not in gap_order[label]:
                    gap_order[label].append(g)
                per_gap[label][g].append(s)
    return [{"window": w, "median_s": statistics.median(per_window[w]), "n": len(per_window[w]),
             "gaps": [{"gap": g, "median_s": statistics.median(per_gap[w][g]), "n": len(per_gap[w][g])}
                      for g in gap_order[w]]} for w in order]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=5)
    ap.add_argument("--pool", type=int, default=0, metavar="P", help="also pykata with a warm pool of P VMs")
    ap.add_argument("--no-plain", action="store_true", help="with --pool: skip pykata without the pool")
    ap.add_argument("--min-gap-ms", type=float, default=5.0, help="gaps shorter than this are not printed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pod-phases-"))
    timing = tmp / "timing"
    os.environ[ENV] = str(timing)  # containerd and every shim it runs inherit it
    runs: dict[str, list[Any]] = defaultdict(list)
    totals: dict[str, list[float]] = defaultdict(list)
    loads = []
    with contextlib.ExitStack() as stack:
        ctd = CriContainerd(tmp / "ctd")
        stack.callback(ctd.stop)
        ctd.start()
        ctd.import_images(tmp / "cache")
        loops: list[tuple[str, CriContainerd, str]] = [("runc", ctd, "runc")]
        if not args.no_plain:
            loops.append(("pykata", ctd, "pykata"))
        if args.pool:
            loops.append(("pykata+pool", stack.enter_context(pooled_containerd(tmp, args.pool)), "pykata"))
        clients = {label: stack.enter_context(MarkedCri(c.socket)) for label, c, _ in loops}
        for label, c, handler in loops:  # warm-up: caches, the template on a first run
            one_cycle(c, clients[label], handler, timing)
        for i in range(args.runs):
            for label, c, handler in loops:
                secs, wins = one_cycle(c, clients[label], handler, timing)
                totals[label].append(secs)
                runs[label].append(wins)
                print(f"{label} #{i}: {secs:.2f} s", file=sys.stderr)
            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
    os.environ.pop(ENV, None)
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"runs": args.runs, "load_1min": [min(loads), max(loads)],
              "total_s": {k: round(statistics.median(v), 3) for k, v in totals.items()},
              "windows": {k: summarize(v) for k, v in runs.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    labels = list(totals)
    print(f"pod cycle, median of {args.runs}; load average (1 min) {min(loads):.1f}-{max(loads):.1f}: "
          + ", ".join(f"{k} {result['total_s'][k]:.3f} s" for k in labels)
          + "".join(f", {k}/runc {result['total_s'][k] / result['total_s']['runc']:.1f}x"
                    for k in labels if k != "runc"))
    win = {k: {w["window"]: w for w in result["windows"][k]} for k in labels}
    print(f"{'window / phase (ms)':<70}" + "".join(f"{k:>12}" for k in labels))
    for w in [x["window"] for x in result["windows"][labels[-1]]]:
        print(f"{w:<70}" + "".join(f"{1000 * win[k][w]['median_s']:12.1f}" if w in win[k] else f"{'-':>12}"
                                   for k in labels))
        for k in labels[1:]:
            if w not in win[k]:
                continue
            for g in win[k][w]["gaps"]:
                if 1000 * g["median_s"] < args.min_gap_ms:
                    continue
                n = "" if g["n"] == args.runs else f" [{g['n']}/{args.runs}]"
                print(f"  {k:<11} {g['gap'][:55] + n:<57}{1000 * g['median_s']:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
