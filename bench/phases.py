#!/usr/bin/env python3
"""Where the wall time of one pod start and teardown goes, phase by phase, beside runc.

    .venv/bin/python bench/phases.py [-n 5] [--pool [--no-warm-up] [--no-prefill]] [--memory-limit MIB]
        [--cpus N] [--volume] [--json]

A private containerd (tests/shim/harness.py) runs `ctr run --rm <busybox> true` with runc and with
pykata, alternately, N times each (after one warm-up each). containerd gets PYKATA_TIMING_FILE in its
environment, which it passes to the shims: the shim's `start` and `delete` processes, the long-lived
shim and the sandbox then append CLOCK_MONOTONIC marks there (pykata.timing; nothing is written
without the variable). The bench marks the start and end of each `ctr` command on the same clock.
Prints the median of each phase over the N runs, its share of the median total, and runc's median
total from the same run (the machine is shared and loaded: compare ratios, not absolute figures).

Sequential phases add up to the total; phases marked `||` overlap others (they run in another process
or in the background) and are shown for what they cost, not added. The last line counts the runs whose
container needed the guest's mount of the shared directory (its root not on an image disk): the
others never mount it (agent protocol 10; an older agent mounts it in CreateSandbox).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from pykata.timing import ENV, mark  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402

# (label, from mark, to mark): the path of one `ctr run --rm ... true`, in order
SEQUENTIAL = [
    ("ctr + containerd until the shim is exec'd", "bench.begin", "start.exec"),
    ("shim start: python start-up + imports", "start.exec", "start.main"),
    ("shim start: config, socket, fork daemon", "start.main", "start.done"),
    ("containerd: shim answer -> Create RPC", "start.done", "rpc.create"),
    ("Create: config, cgroup, template lookup", "rpc.create", "vm.start"),
    ("Create: VM clone/restore (QEMU up)", "vm.start", "vm.started"),
    ("Create: agent ready", "vm.started", "agent.ready"),
    ("Create: clock sync (1st RPC after restore)", "agent.ready", "guest.clock"),
    ("Create: reseed, policy", "guest.clock", "guest.prepared"),
    ("Create: CreateSandbox (guest mounts)", "guest.prepared", "guest.sandbox"),
    ("Create: proxy, state, host rootfs mounts", "guest.sandbox", "rootfs.mounted"),
    ("Create: crun create in the guest", "rootfs.mounted", "guest.created"),
    ("Create: stdio, events, reply", "guest.created", "rpc.create.done"),
    ("containerd: Create reply -> Start RPC", "rpc.create.done", "rpc.start"),
    ("Start: crun start in the guest", "rpc.start", "rpc.start.done"),
    ("workload runs until its exit is seen", "rpc.start.done", "exit.seen"),
    ("containerd: exit -> Delete RPC", "exit.seen", "rpc.delete"),
    ("Delete RPC", "rpc.delete", "rpc.delete.done"),
    ("containerd after Delete (Shutdown, `delete`) -> ctr returns", "rpc.delete.done", "bench.end"),
]
PARALLEL = [
    ("|| daemon: fork + imports", "start.done", "daemon.imported"),
    ("|| daemon: logging, events, service, listen", "daemon.imported", "daemon.serving"),
    ("|| VM stop (after Delete's answer)", "vm.stop", "vm.stopped"),
    ("|| Shutdown RPC -> shim exit", "rpc.shutdown", "daemon.exit"),
    ("|| `delete` subcommand: python start-up + imports", "delete.exec", "delete.main"),
    ("|| `delete` subcommand: work", "delete.main", "delete.done"),
    ("|| ctr returns -> `delete` subcommand done", "bench.end", "delete.done"),
    ("|| ctr returns -> shim exit", "bench.end", "daemon.exit"),
    ("|| Create: pooled VM: the pod's host cgroup joined, its limits set", "vm.start", "vm.joined"),
    ("|| Create: pooled VM: hand-out after the cgroup (resume)", "vm.joined", "vm.started"),
    ("|| Create: host side until the image disk is known", "guest.sandbox", "rootfs.image"),
    ("|| Create: the image put in a slot (QMP; pooled VMs hold the warm-up's)", "rootfs.image", "rootfs.slot"),
]


def run_rm(ctd: Containerd, runtime: str, limits: tuple[str, ...] = ()) -> float:
    cid = f"ph-{uuid.uuid4().hex[:8]}"
    mark("bench.begin")
    start = time.perf_counter()
    p = ctd.ctr("run", "--rm", "--runtime", runtime, *limits, IMAGE, cid, "true", check=False)
    elapsed = time.perf_counter() - start
    mark("bench.end")
    if p.returncode != 0:
        raise SystemExit(f"ctr run --runtime {runtime} failed: {p.stderr.decode(errors='replace')}")
    return elapsed


def read_marks(path: Path) -> list[tuple[int, str]]:
    marks = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            marks.append((int(parts[0]), parts[2]))
    return sorted(marks)


def settle(path: Path, timeout: float = 8.0) -> None:
    """Wait until the last run's shim and `delete` subcommand have left their last marks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [n for _, n in read_marks(path)]
        tail = names[len(names) - names[::-1].index("bench.begin"):] if "bench.begin" in names else []
        if "daemon.exit" in tail and "delete.done" in tail:
            return
        time.sleep(0.1)


def phases_of(marks: list[tuple[int, str]]) -> dict[str, float]:
    """Seconds per phase for one run (marks from its bench.begin on); first occurrence of each mark."""
    first: dict[str, int] = {}
    for ts, name in marks:
        first.setdefault(name, ts)
    out: dict[str, float] = {}
    for label, a, b in SEQUENTIAL + PARALLEL:
        if a in first and b in first:
            out[label] = (first[b] - first[a]) / 1e9
    out["total"] = (first["bench.end"] - first["bench.begin"]) / 1e9
    # 1 when the container's CreateContainer carried the guest's mount of the shared directory
    out["share"] = float("guest.share" in first)
    return out


def pool_config(directory: Path, warm_up: bool = True, prefill: bool = True) -> Path:
    """A copy of the configuration in force with factory.pool_size = 1 (pool_warm_up off unless
    `warm_up`, pool_prefill_image off unless `prefill`) and a runtime_dir of its own (so the pool,
    and its `destroy` at the end, are this run's only; containerd and so its shims get PYKATA_CONFIG)."""
    from pykata.config.load import find_config_path, packaged_default_text

    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    text = re.sub(r"(?m)^runtime_dir\s*=.*$", f'runtime_dir = "{directory / "run"}"', text)
    text = text.replace("\npool_size = 0\n", "\npool_size = 1\n")
    if not warm_up:
        text = text.replace("\npool_warm_up = true\n", "\npool_warm_up = false\n")
    if not prefill:
        text = text.replace("\npool_prefill_image = true\n", "\npool_prefill_image = false\n")
    path = directory / "configuration.toml"
    path.write_text(text)
    return path


def wait_for_pool(timeout: float = 120.0) -> None:
    from pykata.factory import pool

    config = load_config()
    deadline = time.monotonic() + timeout
    mine = pool.fingerprint(config)
    pool.fill(config, pool.entry_argv())
    # one of this configuration's (a pool of another run's may still be ending)
    while not any(e.ready and e.alive and e.fingerprint == mine for e in pool.list_entries(config)):
        if time.monotonic() > deadline:
            raise SystemExit("the warm pool did not fill")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pool", action="store_true",
                    help="with a warm pool of 1 (factory.pool_size): each pykata run starts once a "
                         "pooled VM is ready (the wait is not counted)")
    ap.add_argument("--memory-limit", type=int, default=0, metavar="MIB",
                    help="the container's memory limit (ctr run --memory-limit): a pod of another size than "
                         "the configured VM's, sized after the clone's restore (or the pooled VM's hand-out)")
    ap.add_argument("--cpus", type=float, default=0, help="the container's CPU limit (ctr run --cpus)")
    ap.add_argument("--volume", action="store_true",
                    help="the container gets a read-only host volume (ctr run --mount of a temp directory), "
                         "so the guest mounts the shared directory")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="with --pool: pooled VMs skip the throwaway container (factory.pool_warm_up = false)")
    ap.add_argument("--no-prefill", action="store_true",
                    help="with --pool: pooled VMs leave their free image slots empty "
                         "(factory.pool_prefill_image = false)")
    args = ap.parse_args()
    limits = ((("--memory-limit", str(args.memory_limit << 20)) if args.memory_limit else ())
              + (("--cpus", str(args.cpus)) if args.cpus else ()))
    pool_dir = Path(tempfile.mkdtemp(prefix="phases-pool-")) if args.pool else None
    if pool_dir is not None:
        os.environ["PYKATA_CONFIG"] = str(pool_config(pool_dir, warm_up=not args.no_warm_up,
                                                      prefill=not args.no_prefill))

    tmp = Path(tempfile.mkdtemp(prefix="phases-bench-"))
    if args.volume:
        (tmp / "vol").mkdir()
        limits += ("--mount", f"type=bind,src={tmp / 'vol'},dst=/vol,options=rbind:ro")
    timing = tmp / "timing"
    os.environ[ENV] = str(timing)  # containerd and every shim it runs inherit it
    ctd = Containerd(tmp / "ctd")
    runs: list[dict[str, float]] = []
    runc: list[float] = []
    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
                str(export_oci_archive(image, tmp / "busybox.tar", IMAGE)))
        run_rm(ctd, RUNC_RUNTIME, limits)
        run_rm(ctd, PYKATA_RUNTIME, limits)  # warm-up: caches, and the VM template on a first run
        settle(timing)
        for _ in range(args.runs):
            runc.append(run_rm(ctd, RUNC_RUNTIME, limits))
            if args.pool:
                wait_for_pool()
            timing.write_bytes(b"")
            run_rm(ctd, PYKATA_RUNTIME, limits)
            settle(timing)
            runs.append(phases_of(read_marks(timing)))
    finally:
        ctd.stop()
        os.environ.pop(ENV, None)
        if args.pool:
            from pykata.factory import pool

            pool.destroy(load_config())
        # what the run made (6.5 MiB each: containerd's root and the image): every run left its two
        for d in (tmp, pool_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    labels = [label for label, _, _ in SEQUENTIAL + PARALLEL if any(label in r for r in runs)]
    med = {label: statistics.median([r[label] for r in runs if label in r]) for label in [*labels, "total"]}
    runc_med = statistics.median(runc)
    result: dict[str, Any] = {"runs": args.runs, "runc_total_s": round(runc_med, 3),
                              "pykata_total_s": round(med["total"], 3),
                              "ratio": round(med["total"] / runc_med, 1),
                              "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
                              "phases_s": {k: round(v, 4) for k, v in med.items() if k != "total"},
                              "share_mounted_by_container": int(sum(r["share"] for r in runs))}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mode = (" (pool" + (", no warm-up" if args.no_warm_up else "") + (", no prefill" if args.no_prefill else "")
            + ")") if args.pool else ""
    print(f"ctr run --rm {' '.join(limits)}{' ' if limits else ''}busybox true{mode}, "
          f"median of {args.runs}: runc {runc_med:.3f} s, "
          f"pykata {med['total']:.3f} s, ratio {result['ratio']}x; load average {result['load']}")
    print(f"{'phase':<62} {'ms':>7} {'share':>6}")
    for label in labels:
        share = "" if label.startswith("||") else f"{100 * med[label] / med['total']:5.1f}%"
        print(f"{label:<62} {1000 * med[label]:7.1f} {share:>6}")
    seq = sum(med[label] for label, _, _ in SEQUENTIAL if label in med)
    print(f"{'(sum of sequential phases)':<62} {1000 * seq:7.1f}")
    print(f"runs whose container asked the guest to mount the shared directory: "
          f"{result['share_mounted_by_container']} of {args.runs}")


if __name__ == "__main__":
    main()
