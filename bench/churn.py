#!/usr/bin/env python3
"""The pod-churn loop of issue 6: Kubernetes pod life cycles through containerd's CRI plugin.

    .venv/bin/python bench/churn.py N [--runtime pykata|runc|both] [--faults K] [--pool P]
        [--shared-fs virtio-fs] [--stop-mode stops|remove-race] [--restart-containerd K] [--json]

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
--pool P`: runc and the pooled pykata only). `--shared-fs virtio-fs`: the pykata pods ask for virtio-fs
(the annotation; they boot cold, each with its own virtiofsd) and the faults kill virtiofsd too, in turn.
`--stop-mode remove-race`: the pod ends with 2 StopPodSandbox concurrent with a RemovePodSandbox, then both
again until it is gone (tests/cri/pod_cycle.py STOP_MODES). `--restart-containerd K`: every K-th iteration
restarts containerd (its shims live on) between the exec and the stops, after any fault of that iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
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

from tests.cri.harness import CALL_TIMEOUT, Cri, CriContainerd  # noqa: E402
from tests.cri.pod_cycle import (  # noqa: E402
    FAULT_MARKERS,
    STOP_MODES,
    VIRTIO_FS_ANNOTATIONS,
    VIRTIO_FS_FAULT_MARKERS,
    CycleError,
    fault_for,
    kill_pod_process,
    pod_cycle,
    pod_name,
    reap_pod,
    stray_shims,
    wait_cri_ready,
)

# the admin lets pods choose their shared file system (--shared-fs)
SHARED_FS_ALLOWED = 'hypervisor.qemu.enable_annotations = ["shared_fs"]'
SLOW_CYCLE = 5.0  # seconds: an iteration slower than this is listed at the end


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

    def __init__(self, ctd: CriContainerd, handler: str, n: int, fault_every: int = 0, label: str = "", *,
                 shared_fs: str = "", stop_mode: str = "stops", restart_every: int = 0,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        self.ctd, self.handler, self.fault_every = ctd, handler, fault_every
        self.label = label or handler
        self.virtio_fs = shared_fs == "virtio-fs" and handler == "pykata"
        self.stop_mode, self.restart_every = stop_mode, restart_every
        self.times: list[float] = []
        self.slow: list[str] = []
        self.stats: dict[str, Any] = {"runtime": self.label, "iterations": n, "failures": 0, "hangs": 0,
                                      "leaks": 0, "stop_errors_tolerated": 0, "faults": 0, "restarts": 0,
                                      "slow": 0, "done": 0}
        self.cri = Cri(ctd.socket, timeout=call_timeout).__enter__()

    def step(self, i: int) -> None:
        self._step(i)
        self.stats["done"] = i + 1

    def _step(self, i: int) -> None:
        ctd, handler, stats, label = self.ctd, self.handler, self.stats, self.label
        markers = VIRTIO_FS_FAULT_MARKERS if self.virtio_fs else FAULT_MARKERS
        marker = fault_for(i, self.fault_every, markers) if handler == "pykata" else None
        restart = self.restart_every > 0 and i % self.restart_every == self.restart_every - 1
        what = " ".join(x for x in (marker and f"kill -9 {marker}", restart and "containerd restarted") if x)

        def fault(pod_id: str) -> None:
            if marker is not None:
                kill_pod_process(pod_id, marker, ctd)
            if restart:
                ctd.restart()
                wait_cri_ready(self.cri)

        stats["faults"] += marker is not None
        stats["restarts"] += restart
        name = pod_name(handler)
        start = time.monotonic()
        try:
            r = pod_cycle(ctd, self.cri, handler, fault=fault if what else None, stop_mode=self.stop_mode,
                          annotations=VIRTIO_FS_ANNOTATIONS if self.virtio_fs else None, name=name)
        except (grpc.RpcError, CycleError) as e:
            stats["failures"] += 1
            if isinstance(e, grpc.RpcError):
                stats["hangs"] += e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                why = f"{e.code().name}: {e.details()}"
            else:
                why = str(e)
            took = time.monotonic() - start
            self.slow.append(f"#{i} {name} failed after {took:.1f} s{f' ({what})' if what else ''}: {why}")
            print(f"{label} #{i}: {name} after {took:.1f} s: {why}", file=sys.stderr)
            _keep_log(ctd, label, i)
            # ended as kubelet would, then checked as any other pod: a failure must not leak either
            left = reap_pod(ctd, self.cri, name) + stray_shims(ctd, self.cri)
            if left:
                stats["leaks"] += 1
                print(f"{label} #{i}: failed pod {name} left {left}", file=sys.stderr)
            return
        if not what:
            self.times.append(r.seconds)
        if r.seconds > SLOW_CYCLE:
            stats["slow"] += 1
            self.slow.append(f"#{i} {r.pod_id[:12]} {r.seconds:.1f} s{f' ({what})' if what else ''}")
        stats["stop_errors_tolerated"] += len(r.stop_errors)
        for err in r.stop_errors:
            print(f"{label} #{i}: a racing StopPodSandbox failed (tolerated, retried): {err}", file=sys.stderr)
        r.leftovers += stray_shims(ctd, self.cri)
        if r.leftovers:
            stats["leaks"] += 1
            print(f"{label} #{i}: pod {r.pod_id} left {r.leftovers}", file=sys.stderr)
        print(f"{label} #{i}: {r.pod_id[:12]} {r.seconds:.2f} s{f' ({what})' if what else ''} "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    def result(self) -> dict[str, Any]:
        self.cri.__exit__()
        times = self.times
        self.stats["median_s"] = round(statistics.median(times), 2) if times else None
        self.stats["mean_s"] = round(statistics.mean(times), 2) if times else None
        self.stats["slow_cycles"] = self.slow
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    # SIGTERM (and SIGINT, which a background job starts with ignored) ends the run with its cleanup:
    # its private containerd's pods removed, no shim or VM left behind
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", type=int, help="iterations per runtime")
    ap.add_argument("--runtime", choices=["pykata", "runc", "both"], default="both")
    ap.add_argument("--faults", type=int, default=0, metavar="K",
                    help="every K-th pykata iteration kills QEMU or the shim (0: none)")
    ap.add_argument("--pool", type=int, default=0, metavar="P",
                    help="also measure pykata with a warm pool of P CRI VMs (0: not)")
    ap.add_argument("--shared-fs", choices=["virtio-fs"], default="",
                    help="pykata pods ask for virtio-fs (cold boot, a virtiofsd each; faults kill it too)")
    ap.add_argument("--stop-mode", choices=STOP_MODES, default="stops",
                    help="how a pod ends: the seed's 3+1 StopPodSandbox, or stops racing RemovePodSandbox")
    ap.add_argument("--restart-containerd", type=int, default=0, metavar="K",
                    help="every K-th iteration restarts containerd between the exec and the stops (0: never)")
    ap.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT, metavar="S",
                    help=f"seconds each CRI call may take before it counts as a hang (default {CALL_TIMEOUT:g}; "
                         "kubelet's runtime-request-timeout is 120)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("n: must be at least 1")
    if args.faults < 0:
        ap.error("--faults: must be 0 or more")
    if args.call_timeout <= 0:
        ap.error("--call-timeout: must be more than 0")
    if args.restart_containerd < 0:
        ap.error("--restart-containerd: must be 0 or more")
    opts: dict[str, Any] = {"shared_fs": args.shared_fs, "stop_mode": args.stop_mode,
                            "restart_every": args.restart_containerd, "call_timeout": args.call_timeout}
    handlers = ["runc", "pykata"] if args.runtime == "both" else [args.runtime]
    load_at_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="pykata-churn-") as tmp, contextlib.ExitStack() as stack:
        ctd = CriContainerd(Path(tmp) / "ctd", extra_config=SHARED_FS_ALLOWED if args.shared_fs else "")
        stack.callback(ctd.stop)
        try:
            ctd.start()
            ctd.import_images(Path(tmp) / "cache")
            loops = [Churn(ctd, handler, args.n, args.faults, **opts) for handler in handlers]
            if args.pool > 0:
                pooled = stack.enter_context(pooled_containerd(Path(tmp), args.pool))
                loops.append(Churn(pooled, "pykata", args.n, args.faults, label="pykata+pool", **opts))
            try:
                for i in range(args.n):
                    for loop in loops:
                        loop.step(i)
            except KeyboardInterrupt as e:  # the iterations done so far are reported (the last one not)
                print(f"interrupted ({e}): reporting the iterations done", file=sys.stderr)
            results = [loop.result() for loop in loops]
        except Exception:
            traceback.print_exc()
            return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            for line in r["slow_cycles"]:
                print(f"{r['runtime']}: slow (> {SLOW_CYCLE:.0f} s) {line}")
        print(f"{'runtime':11} {'iter':>5} {'faults':>6} {'fail':>5} {'hangs':>5} {'leaks':>5} {'stop-err':>8} "
              f"{'slow':>5} {'median s':>9} {'mean s':>7}")
        for r in results:
            print(f"{r['runtime']:11} {r['done']:>5} {r['faults']:>6} {r['failures']:>5} {r['hangs']:>5} "
                  f"{r['leaks']:>5} {r['stop_errors_tolerated']:>8} {r['slow']:>5} {r['median_s']!s:>9} "
                  f"{r['mean_s']!s:>7}")
        print(f"load average (1, 5, 15 min) at the start: {' '.join(f'{x:.1f}' for x in load_at_start)}, "
              f"at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        runc = next((r["median_s"] for r in results if r["runtime"] == "runc"), None)
        for r in results:
            if runc and r["runtime"] != "runc" and r["median_s"]:
                print(f"{r['runtime']}/runc median time per iteration: {r['median_s'] / runc:.1f}x")
    return 0 if all(r["failures"] == 0 and r["leaks"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
