"""Wall time of `containerd-shim-pykata-v2 delete` after an orderly shim exit (what containerd runs
once per task at every teardown), against the interpreter's own start-up measured in the same run.

    .venv/bin/python bench/shim_delete_bench.py -n 30
    PYTHONPATH=/path/to/other/src .venv/bin/python bench/shim_delete_bench.py -n 30   # another tree

Each run gets a bundle as the shim leaves it (config.json, address, shim.pid of a process that is gone,
init.pid) with and without the configuration record `start` writes (pykata.shim.configrecord); the
sandbox directory is already gone, as after a Delete RPC. Nothing outside a temp dir is touched: the
recorded runtime_dir is a fresh empty directory. Prints the median and quartiles per case and the
ratio of the median to `python -c pass`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIM = Path(sys.executable).parent / "containerd-shim-pykata-v2"


def _bundle(root: Path, name: str, runtime_dir: Path, config: Path, recorded: bool) -> Path:
    b = root / name
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
    (b / "address").write_text(f"unix://{runtime_dir}/s/{'0' * 64}")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (b / "shim.pid").write_text(str(gone.pid))
    (b / "init.pid").write_text(str(gone.pid))
    if recorded:
        import hashlib

        body = {"config": str(config), "sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
                "runtime_dir": str(runtime_dir), "pool": False}
        (b / "pykata-config.json").write_text(json.dumps(body))
        (b / "pykata-config.json").chmod(0o600)
    return b


def _time(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=30, help="runs per case (interleaved)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="delbench-") as tmp:
        root = Path(tmp)
        runtime_dir = root / "run"
        runtime_dir.mkdir()
        from pykata.config.load import find_config_path, packaged_default_text

        found = find_config_path()
        text = found.read_text() if found is not None else packaged_default_text()
        config = root / "configuration.toml"
        config.write_text(text.replace('\nruntime_dir = "/run/pykata"\n', f'\nruntime_dir = "{runtime_dir}"\n'))
        env = {**os.environ, "PYKATA_CONFIG": str(config)}
        env.pop("PYKATA_TIMING_FILE", None)
        cases = {
            "python -c pass": ([sys.executable, "-c", "pass"], root),
            "delete, recorded": ([str(SHIM), "-namespace", "bench", "-address", str(root / "c.sock"), "-id", "a",
                                  "delete"], _bundle(root, "a", runtime_dir, config, True)),
            "delete, no record": ([str(SHIM), "-namespace", "bench", "-address", str(root / "c.sock"), "-id", "b",
                                   "delete"], _bundle(root, "b", runtime_dir, config, False)),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for argv, cwd in cases.values():  # warm the page cache
            _time(argv, cwd, env)
        for _ in range(args.n):
            for name, (argv, cwd) in cases.items():
                times[name].append(_time(argv, cwd, env))
    base = statistics.median(times["python -c pass"])
    print(f"n={args.n}, load {Path('/proc/loadavg').read_text().split()[0]}, pykata from "
          f"{__import__('pykata').__file__.rsplit('/', 2)[0]}")
    print(f"{'case':<22}{'median ms':>10}{'q1':>8}{'q3':>8}{'x python':>10}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        print(f"{name:<22}{statistics.median(ts) * 1e3:>10.1f}{q[0] * 1e3:>8.1f}{q[2] * 1e3:>8.1f}"
              f"{statistics.median(ts) / base:>10.2f}")


if __name__ == "__main__":
    main()
