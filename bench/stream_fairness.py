#!/usr/bin/env python3
"""A new exec in a pod whose other execs flood their output: how long until its output, and how fast
the flood flows meanwhile.

    .venv/bin/python bench/stream_fairness.py [--floods 11] [--execs 6]

One busybox container through ctr (private containerd, this checkout's shim); --floods execs of it
flood (the first 6 `cat /dev/zero` read by this process as fast as it can, the others
`cat /dev/zero >&2 & cat /dev/zero` never read, so their pipes fill); once every one of them started,
--execs `ctr task exec ... echo ok` one after the other. Prints each exec's wall seconds (ctr's), the
part until the shim had started it in the guest (ExecProcess answered, timing mark exec.started) and
the part after (its output), the flood's MB/s over the execs, and the load average. To compare two
versions, run it alternately from each checkout (the pod's output read budget: sandbox/process.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

MARKS = Path(tempfile.mkdtemp(prefix="fairness-marks-")) / "marks"
os.environ["PYKATA_TIMING_FILE"] = str(MARKS)  # containerd passes it to the shims

from tests.shim.harness import CTR, IMAGE, PYKATA_RUNTIME, Containerd, running_with_busybox  # noqa: E402


def _exec_argv(ctd: Containerd, cid: str, *cmd: str) -> list[str]:
    assert CTR is not None
    return [CTR, "-a", str(ctd.socket), "-n", ctd.namespace, "task", "exec", "--exec-id",
            f"f{uuid.uuid4().hex[:8]}", cid, *cmd]


def _marks_since(count: int) -> list[tuple[int, str]]:
    lines = MARKS.read_text().splitlines() if MARKS.exists() else []
    return [(int(ln.split()[0]), ln.split()[2]) for ln in lines[count:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floods", type=int, default=11)
    ap.add_argument("--execs", type=int, default=6)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fairness-"))
    with running_with_busybox(Containerd(base / "ctd"), base / "cache") as ctd:
        cid = f"fair-{uuid.uuid4().hex[:6]}"
        ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, IMAGE, cid, "sleep", "3600", timeout=180)
        procs: list[subprocess.Popen[bytes]] = []
        got = [0]

        def drain(p: subprocess.Popen[bytes]) -> None:
            assert p.stdout is not None
            while chunk := p.stdout.read1(1 << 16):
                got[0] += len(chunk)

        try:
            for i in range(args.floods):
                read = i < 6
                cmd = ("cat", "/dev/zero") if read else ("sh", "-c", "cat /dev/zero >&2 & cat /dev/zero")
                procs.append(subprocess.Popen(_exec_argv(ctd, cid, *cmd), env=ctd.env(), stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL if read else subprocess.PIPE))
                if read:
                    threading.Thread(target=drain, args=(procs[-1],), daemon=True).start()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and \
                    len(ctd.ctr("task", "ps", cid).stdout.decode().splitlines()) < 2 + len(procs):
                time.sleep(1)
            time.sleep(3)
            flowed, since = got[0], time.monotonic()
            for i in range(args.execs):
                before = len(MARKS.read_text().splitlines()) if MARKS.exists() else 0
                start = time.monotonic_ns()
                p = ctd.ctr("task", "exec", "--exec-id", f"n{i}", cid, "echo", "ok", timeout=300)
                wall = (time.monotonic_ns() - start) / 1e9
                started = [t for t, name in _marks_since(before) if name == "exec.started"]
                to_start = (started[-1] - start) / 1e9 if started else float("nan")
                print(f"exec {i}: {wall:.2f} s (started in the guest after {to_start:.2f} s, output "
                      f"{wall - to_start:.2f} s) {p.stdout!r} load {os.getloadavg()[0]:.1f}", flush=True)
                time.sleep(1)
            rate = (got[0] - flowed) / (time.monotonic() - since) / 1e6
            print(f"flood: {rate:.1f} MB/s over the execs ({args.floods} floods, 6 read)", flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            ctd.remove(cid)


if __name__ == "__main__":
    main()
