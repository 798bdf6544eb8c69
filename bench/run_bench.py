#!/usr/bin/env python3
"""`pykata run --rm` against `runc run` of the same bundle, measured in one run.

    .venv/bin/python bench/run_bench.py [-n 5] [--mib 100] [--json]

Prints the median wall time per run of `true` for both and the ratio, then the stdout throughput of
a container writing --mib MiB (pykata's VM + agent + ttrpc path vs runc's direct pipe).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.sandbox import build_spec  # noqa: E402

PYKATA = str(ROOT / ".venv/bin/pykata")


def make_bundle(tmp: Path, args: list[str]) -> Path:
    rootfs = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox").rootfs
    bundle = tmp / f"bundle-{uuid.uuid4().hex[:6]}"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    spec = build_spec(args, env=["PATH=/bin:/usr/bin"])
    spec["linux"]["resources"] = {}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def timed(argv: list[str], cwd: Path) -> tuple[float, int]:
    """Seconds and bytes of stdout of one run (fails loudly on a non-zero exit)."""
    start = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd)
    assert p.stdout is not None
    n = 0
    while chunk := p.stdout.read(1 << 20):
        n += len(chunk)
    if p.wait() != 0:
        raise SystemExit(f"{argv} exited {p.returncode}")
    return time.perf_counter() - start, n


def runc(bundle: Path) -> list[str]:
    return ["runc", "run", "--bundle", str(bundle), f"bench-{uuid.uuid4().hex[:8]}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        true_bundle = make_bundle(tmp, ["true"])
        big_bundle = make_bundle(tmp, ["sh", "-c", f"head -c {a.mib << 20} /dev/zero"])
        timed([PYKATA, "run", "--rm", str(true_bundle)], tmp)  # warm caches (image, accel verdict)
        k = [timed([PYKATA, "run", "--rm", str(true_bundle)], tmp)[0] for _ in range(a.n)]
        r = [timed(runc(true_bundle), tmp)[0] for _ in range(a.n)]
        kt, kn = timed([PYKATA, "run", "--rm", str(big_bundle)], tmp)
        rt, rn = timed(runc(big_bundle), tmp)
    assert kn == rn == a.mib << 20, (kn, rn)
    res = {"runs": a.n, "pykata_run_s": round(statistics.median(k), 3), "runc_run_s": round(statistics.median(r), 3),
           "ratio": round(statistics.median(k) / statistics.median(r), 1),
           "pykata_stdout_mib_s": round(a.mib / kt, 1), "runc_stdout_mib_s": round(a.mib / rt, 1),
           "note": "pykata stdout time includes the VM boot"}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"run --rm true  pykata {res['pykata_run_s']:.3f}s  runc {res['runc_run_s']:.3f}s  "
          f"ratio {res['ratio']}x  (median of {a.n})")
    print(f"stdout {a.mib} MiB  pykata {res['pykata_stdout_mib_s']} MiB/s  runc {res['runc_stdout_mib_s']} MiB/s "
          f"(pykata's figure includes its VM boot)")


if __name__ == "__main__":
    main()
