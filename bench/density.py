#!/usr/bin/env python3
"""How many idle busybox pods fit: start pykata containers one at a time until starting one takes twice
as long as at the beginning, the host has less than --min-free-mib available, or --max is reached.

    .venv/bin/python bench/density.py [--max 40] [--min-free-mib 2048] [--json]

A private containerd (tests/shim/harness.py) runs `ctr run -d <busybox> sleep` with pykata, one after the
other; runc starts a container beside each (removed at once), so every pykata start time has a runc figure
taken at the same moment. "Twice as long" compares the median of the last 3 pykata starts with the median
of the first 3. The loop is bounded by --max (this machine has 2 cores shared by several engineers: say
the cap when you report). Every container is removed at the end, whatever stopped the loop.
Prints the stop reason, the number of pods running at that point, start times (first, last, runc), the
PSS per pod (shim + QEMU + a share of the shims' fork server, from /proc/<pid>/smaps_rollup), host
memory available and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.ctr_bench import container_processes, mem_available_mib, pss_kib  # noqa: E402
from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402


def start(ctd: Containerd, runtime: str, cid: str) -> float:
    t = time.perf_counter()
    ctd.ctr("run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "1000000", timeout=300)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=int, default=40, help="pods at most (the loop's bound)")
    ap.add_argument("--min-free-mib", type=int, default=2048)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="density-bench-"))
    ctd = Containerd(tmp / "ctd")
    ids: list[str] = []
    rows: list[dict[str, Any]] = []
    reason = f"reached --max {a.max}"
    result: dict[str, Any] = {}
    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
                str(export_oci_archive(image, tmp / "busybox.tar", IMAGE)))
        start(ctd, RUNC_RUNTIME, "warm-runc")
        ctd.remove("warm-runc")
        while len(ids) < a.max:
            free = mem_available_mib()
            if free < a.min_free_mib:
                reason = f"host memory available {free} MiB < {a.min_free_mib} MiB"
                break
            runc_id = f"d-runc-{uuid.uuid4().hex[:6]}"
            runc_s = start(ctd, RUNC_RUNTIME, runc_id)
            ctd.remove(runc_id)
            cid = f"d-{uuid.uuid4().hex[:8]}"
            ids.append(cid)
            s = start(ctd, PYKATA_RUNTIME, cid)
            rows.append({"pods": len(ids), "start_s": round(s, 3), "runc_s": round(runc_s, 3),
                         "mem_available_mib": free, "load1": round(os.getloadavg()[0], 1)})
            if not a.json:
                print(rows[-1], flush=True)
            if len(rows) >= 6:
                first = statistics.median(r["start_s"] for r in rows[:3])
                last = statistics.median(r["start_s"] for r in rows[-3:])
                if last >= 2 * first:
                    reason = f"start time doubled: last 3 median {last:.2f} s vs first 3 median {first:.2f} s"
                    break
        time.sleep(3)
        pss = 0
        for cid in ids:
            pss += sum(pss_kib(p) for pids in container_processes(ctd, cid).values() for p in pids)
        server = ctd.fork_server_pid()  # the shims' fork server (runtime.shim_fork_server): shared by all
        if server is not None:
            pss += pss_kib(server)
        result = {"stopped_because": reason, "pods_running": len(ids), "cap": a.max,
                  "first_start_s": rows[0]["start_s"] if rows else None,
                  "last_start_s": rows[-1]["start_s"] if rows else None,
                  "runc_start_median_s": round(statistics.median(r["runc_s"] for r in rows), 3) if rows else None,
                  "pss_mib_per_pod": round(pss / max(1, len(ids)) / 1024, 1),
                  "mem_available_mib": mem_available_mib(), "loadavg": os.getloadavg(), "starts": rows}
    finally:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(ctd.remove, ids))
        ctd.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # containerd's root, the image archive
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"stopped: {result['stopped_because']}; {result['pods_running']} idle pods running "
          f"(cap {a.max}); start {result['first_start_s']} s first, {result['last_start_s']} s last, "
          f"runc {result['runc_start_median_s']} s; {result['pss_mib_per_pod']} MiB PSS per pod; "
          f"host available {result['mem_available_mib']} MiB; load {result['loadavg']}")


if __name__ == "__main__":
    main()
