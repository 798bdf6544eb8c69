#!/usr/bin/env python3
"""The pod-churn loop of issue 6: Kubernetes pod life cycles through containerd's CRI plugin.

    .venv/bin/python bench/churn.py N [--runtime pykata|runc|both] [--faults K] [--pool P] [--json]

A private containerd with its CRI plugin (tests/cri/harness.py), the pause and busybox images imported.
Each iteration (tests/cri/pod_cycle.py): RunPodSandbox, two busybox `sleep` containers created and
started, ExecSync `echo foo`, ContainerStatus, 3 concurrent StopPodSandbox + 1 more, RemovePodSandbox,
then a check that the pod is unlisted and left no shim, QEMU, virtiofsd, /run/pykata mount or sandbox dir.
Prints, per runtime measured in the same run: iterations, failures, hangs (a call past its 60 s
deadline), leaks (iterations that left something), tolerated racing-StopPodSandbox errors, and the
median and mean seconds per iteration (of the iterations without a fault). `--faults K`: every K-th
pykata iteration kills QEMU or the shim (alternately) with SIGKILL between the exec and the stops.
`--pool P`: pykata is measured (again) as "pykata+pool" by a second private containerd whose pykata
handler has a warm pool of P CRI VMs (factory.pool_size = P, pool_nics = 1, its own runtime_dir), filled
and ready before its first iteration and refilled by the pods' shims as they take VMs (`--runtime runc
--pool P`: runc and the pooled pykata only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
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


class Churn:
    """The loop for one runtime handler of one containerd, one iteration per step() (main() interleaves
    the runtimes' iterations, so load that comes and goes on a shared host falls on each alike)."""

    def __init__(self, ctd: CriContainerd, handler: str, n: int, fault_every: int = 0, label: str = "") -> None:
        self.ctd, self.handler, self.fault_every = ctd, handler, fault_every
        self.label = label or handler
        self.times: list[float] = []
        self.stats: dict[str, Any] = {"runtime": self.label, "iterations": n, "failures": 0, "hangs": 0,
                                      "leaks": 0, "stop_errors_tolerated": 0, "faults": 0}
        self.cri = Cri(ctd.socket).__enter__()

    def step(self, i: int) -> None:
        ctd, handler, stats, label = self.ctd, self.handler, self.stats, self.label
        marker = fault_for(i, self.fault_every) if handler == "pykata" else None
        fault = None if marker is None else (lambda pod_id, m=marker: kill_pod_process(pod_id, m, ctd))
        stats["faults"] += marker is not None
        try:
            r = pod_cycle(ctd, self.cri, handler, fault=fault)
        except grpc.RpcError as e:
            stats["failures"] += 1
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                stats["hangs"] += 1
            print(f"{label} #{i}: {e.code().name}: {e.details()}", file=sys.stderr)
            _keep_log(ctd, label, i)
            return
        except CycleError as e:
            stats["failures"] += 1
            print(f"{label} #{i}: {e}", file=sys.stderr)
            _keep_log(ctd, label, i)
            return
        if marker is None:
            self.times.append(r.seconds)
        stats["stop_errors_tolerated"] += len(r.stop_errors)
        for err in r.stop_errors:
            print(f"{label} #{i}: a racing StopPodSandbox failed (tolerated, retried): {err}", file=sys.stderr)
        if r.leftovers:
            stats["leaks"] += 1
            print(f"{label} #{i}: pod {r.pod_id} left {r.leftovers}", file=sys.stderr)
        print(f"{label} #{i}: {r.seconds:.2f} s{f' (kill -9 {marker})' if marker else ''}", file=sys.stderr)

    def result(self) -> dict[str, Any]:
        self.cri.__exit__()
        times = self.times
        self.stats["median_s"] = round(statistics.median(times), 2) if times else None
        self.stats["mean_s"] = round(statistics.mean(times), 2) if times else None
        return self.stats


POOL_READY_TIMEOUT = 180.0


@contextlib.contextmanager
def pooled_containerd(tmp: Path, size: int) -> Iterator[CriContainerd]:
    """A private CRI containerd whose pykata handler has a warm pool of `size` CRI VMs, filled and ready;
    the pool is destroyed afterwards. PYKATA_CONFIG names its configuration while it runs (containerd
    passes no runtime options to the shim's `delete`, which must find the pool's runtime directory)."""
    from pykata.config import load_config
    from pykata.factory import pool

    # short: a pod that boots its own VM puts sockets under <runtime_dir>/sandboxes/<64-char id>/vm/
    run = Path(tempfile.mkdtemp(prefix="k", dir="/run"))  # as short as /run/pykata, nearly
    ctd = CriContainerd(tmp / "ctd-pool", runtime_config={
        "pool_size": str(size), "pool_nics": "1", "runtime_dir": f'"{run}"'})
    before = os.environ.get("PYKATA_CONFIG")
    ctd.dir.mkdir(parents=True)
    ctd.config_text()
    os.environ["PYKATA_CONFIG"] = str(ctd.dir / "pykata.toml")
    config = load_config()
    try:
        ctd.start()
        ctd.import_images(tmp / "cache")
        pool.fill(config, pool.entry_argv())
        deadline = time.monotonic() + POOL_READY_TIMEOUT
        while sum(e.ready and e.alive for e in pool.list_entries(config)) < size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool has not {size} ready VMs after {POOL_READY_TIMEOUT:.0f}s")
            time.sleep(0.1)
        yield ctd
    finally:
        try:
            ctd.stop()
        finally:
            pool.destroy(config)
            shutil.rmtree(run, ignore_errors=True)
            if before is None:
                os.environ.pop("PYKATA_CONFIG", None)
            else:
                os.environ["PYKATA_CONFIG"] = before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", type=int, help="iterations per runtime")
    ap.add_argument("--runtime", choices=["pykata", "runc", "both"], default="both")
    ap.add_argument("--faults", type=int, default=0, metavar="K",
                    help="every K-th pykata iteration kills QEMU or the shim (0: none)")
    ap.add_argument("--pool", type=int, default=0, metavar="P",
                    help="also measure pykata with a warm pool of P CRI VMs (0: not)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("n: must be at least 1")
    if args.faults < 0:
        ap.error("--faults: must be 0 or more")
    handlers = ["runc", "pykata"] if args.runtime == "both" else [args.runtime]
    results = []
    with tempfile.TemporaryDirectory(prefix="pykata-churn-") as tmp, contextlib.ExitStack() as stack:
        ctd = CriContainerd(Path(tmp) / "ctd")
        stack.callback(ctd.stop)
        try:
            ctd.start()
            ctd.import_images(Path(tmp) / "cache")
            loops = [Churn(ctd, handler, args.n, args.faults) for handler in handlers]
            if args.pool > 0:
                pooled = stack.enter_context(pooled_containerd(Path(tmp), args.pool))
                loops.append(Churn(pooled, "pykata", args.n, args.faults, label="pykata+pool"))
            for i in range(args.n):
                for loop in loops:
                    loop.step(i)
            results = [loop.result() for loop in loops]
        except Exception:
            traceback.print_exc()
            return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'runtime':11} {'iter':>5} {'faults':>6} {'fail':>5} {'hangs':>5} {'leaks':>5} {'stop-err':>8} "
              f"{'median s':>9} {'mean s':>7}")
        for r in results:
            print(f"{r['runtime']:11} {r['iterations']:>5} {r['faults']:>6} {r['failures']:>5} {r['hangs']:>5} "
                  f"{r['leaks']:>5} {r['stop_errors_tolerated']:>8} {r['median_s']!s:>9} {r['mean_s']!s:>7}")
        runc = next((r["median_s"] for r in results if r["runtime"] == "runc"), None)
        for r in results:
            if runc and r["runtime"] != "runc" and r["median_s"]:
                print(f"{r['runtime']}/runc median time per iteration: {r['median_s'] / runc:.1f}x")
    return 0 if all(r["failures"] == 0 and r["leaks"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
