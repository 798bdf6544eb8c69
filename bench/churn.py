#!/usr/bin/env python3
"""The pod-churn loop of issue 6: Kubernetes pod life cycles through containerd's CRI plugin.

    .venv/bin/python bench/churn.py N [--runtime pykata|runc|both] [--faults K] [--json]

A private containerd with its CRI plugin (tests/cri/harness.py), the pause and busybox images imported.
Each iteration (tests/cri/pod_cycle.py): RunPodSandbox, two busybox `sleep` containers created and
started, ExecSync `echo foo`, ContainerStatus, 3 concurrent StopPodSandbox + 1 more, RemovePodSandbox,
then a check that the pod is unlisted and left no shim, QEMU, virtiofsd, /run/pykata mount or sandbox dir.
Prints, per runtime measured in the same run: iterations, failures, hangs (a call past its 60 s
deadline), leaks (iterations that left something), tolerated racing-StopPodSandbox errors, and the
median and mean seconds per iteration (of the iterations without a fault). `--faults K`: every K-th
pykata iteration kills QEMU or the shim (alternately) with SIGKILL between the exec and the stops.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cri.harness import Cri, CriContainerd  # noqa: E402
from tests.cri.pod_cycle import CycleError, fault_for, kill_pod_process, pod_cycle  # noqa: E402


def _keep_log(ctd: CriContainerd, handler: str, i: int) -> None:
    """Copy containerd's log (with the shims' lines) of a failed iteration out of the temporary directory."""
    dest = Path.cwd() / f"churn-failure-{handler}-{i}.log"
    try:
        shutil.copyfile(ctd.log, dest)
        print(f"{handler} #{i}: containerd's log kept in {dest}", file=sys.stderr)
    except OSError as e:
        print(f"{handler} #{i}: cannot keep containerd's log: {e}", file=sys.stderr)


def churn(ctd: CriContainerd, handler: str, n: int, fault_every: int = 0) -> dict[str, Any]:
    times: list[float] = []
    stats: dict[str, Any] = {"runtime": handler, "iterations": n, "failures": 0, "hangs": 0, "leaks": 0,
                             "stop_errors_tolerated": 0, "faults": 0}
    with Cri(ctd.socket) as cri:
        for i in range(n):
            marker = fault_for(i, fault_every) if handler == "pykata" else None
            fault = None if marker is None else (lambda pod_id, m=marker: kill_pod_process(pod_id, m))
            stats["faults"] += marker is not None
            try:
                r = pod_cycle(ctd, cri, handler, fault=fault)
            except grpc.RpcError as e:
                stats["failures"] += 1
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    stats["hangs"] += 1
                print(f"{handler} #{i}: {e.code().name}: {e.details()}", file=sys.stderr)
                _keep_log(ctd, handler, i)
                continue
            except CycleError as e:
                stats["failures"] += 1
                print(f"{handler} #{i}: {e}", file=sys.stderr)
                _keep_log(ctd, handler, i)
                continue
            if marker is None:
                times.append(r.seconds)
            stats["stop_errors_tolerated"] += len(r.stop_errors)
            for err in r.stop_errors:
                print(f"{handler} #{i}: a racing StopPodSandbox failed (tolerated, retried): {err}", file=sys.stderr)
            if r.leftovers:
                stats["leaks"] += 1
                print(f"{handler} #{i}: pod {r.pod_id} left {r.leftovers}", file=sys.stderr)
            print(f"{handler} #{i}: {r.seconds:.2f} s{f' (kill -9 {marker})' if marker else ''}", file=sys.stderr)
    stats["median_s"] = round(statistics.median(times), 2) if times else None
    stats["mean_s"] = round(statistics.mean(times), 2) if times else None
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", type=int, help="iterations per runtime")
    ap.add_argument("--runtime", choices=["pykata", "runc", "both"], default="both")
    ap.add_argument("--faults", type=int, default=0, metavar="K",
                    help="every K-th pykata iteration kills QEMU or the shim (0: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("n: must be at least 1")
    if args.faults < 0:
        ap.error("--faults: must be 0 or more")
    handlers = ["runc", "pykata"] if args.runtime == "both" else [args.runtime]
    results = []
    with tempfile.TemporaryDirectory(prefix="pykata-churn-") as tmp:
        ctd = CriContainerd(Path(tmp) / "ctd")
        try:
            ctd.start()
            ctd.import_images(Path(tmp) / "cache")
            for handler in handlers:
                results.append(churn(ctd, handler, args.n, args.faults))
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            ctd.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'runtime':8} {'iter':>5} {'faults':>6} {'fail':>5} {'hangs':>5} {'leaks':>5} {'stop-err':>8} "
              f"{'median s':>9} {'mean s':>7}")
        for r in results:
            print(f"{r['runtime']:8} {r['iterations']:>5} {r['faults']:>6} {r['failures']:>5} {r['hangs']:>5} "
                  f"{r['leaks']:>5} {r['stop_errors_tolerated']:>8} {r['median_s']!s:>9} {r['mean_s']!s:>7}")
        if len(results) == 2 and results[0]["median_s"] and results[1]["median_s"]:
            print(f"pykata/runc median time per iteration: {results[1]['median_s'] / results[0]['median_s']:.1f}x")
    return 0 if all(r["failures"] == 0 and r["leaks"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
