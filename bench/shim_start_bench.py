"""Wall and CPU time of `containerd-shim-pykata-v2 start` (what containerd runs once per container) with
the shims' fork server running, against the interpreter's own start-up measured in the same run.

    .venv/bin/python bench/shim_start_bench.py -n 20
    .venv/bin/python bench/shim_start_bench.py -n 20 --shim base=/other/tree/.venv/bin/containerd-shim-pykata-v2

Each run makes a bundle (config.json with no annotations: a pod's first container), runs `start` in it
as containerd would (-namespace, -address of a socket this bench listens on, -id), and then the
`delete` subcommand, which asks the new shim (no containers) to shut down. Nothing outside a temp dir is
touched: the configuration is the host's with runtime_dir in the temp dir and no warm pool. The first
run of each shim launches its fork server and is not counted. Installations given with --shim are
measured interleaved with this one (each has its own fork server).

Printed per case (median, quartiles over n): `start`'s wall time; its CPU (the `start` process only);
the CPU of everything a start costs: `start`, the fork server's and the new shim's CPU (read when the
shim is serving, before `delete`); and `delete`'s wall time. Ratios are to `python -c pass`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SHIM = Path(sys.executable).parent / "containerd-shim-pykata-v2"


def _cpu(pid: int) -> float:
    """CPU seconds of `pid` (0 when gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _servers(address: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "fork-server" in cmd and address in cmd:
            out.append(p.pid)
    return out


def _env(shim: Path, config: Path, runtime_dir: Path) -> dict[str, str]:
    """The environment to run `shim` with: the host's configuration as that installation reads it (its
    own packaged default if the host has none), with runtime_dir in the temp dir and no warm pool."""
    script = ("from pykata.config.load import find_config_path, packaged_default_text\n"
              "found = find_config_path()\n"
              "print(found.read_text() if found is not None else packaged_default_text(), end='')")
    text = subprocess.run([str(shim.parent / "python"), "-c", script], capture_output=True, text=True,
                          check=True).stdout
    text = text.replace('\nruntime_dir = "/run/pykata"\n', f'\nruntime_dir = "{runtime_dir}"\n')
    text = text.replace("\npool_size = ", "\n# pool_size = ")  # no warm pool: every `start` makes a shim
    config.write_text(text.replace("[factory]\n", "[factory]\npool_size = 0\n", 1))
    env = {**os.environ, "PYKATA_CONFIG": str(config)}
    env.pop("PYKATA_TIMING_FILE", None)
    env.pop("TTRPC_ADDRESS", None)
    return env


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _one(shim: Path, root: Path, name: str, address: str, env: dict[str, str]) -> dict[str, float]:
    bundle = root / name
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
    argv = [str(shim), "-namespace", "bench", "-address", address, "-id", name]
    servers = {p: _cpu(p) for p in _servers(address)}
    cpu0 = _child_cpu()
    t = time.perf_counter()
    out = subprocess.run([*argv, "start"], cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    wall = time.perf_counter() - t
    cpu = _child_cpu() - cpu0
    if out.returncode != 0 or not out.stdout.startswith(b"unix://"):
        raise SystemExit(f"{shim} start failed ({out.returncode}): {out.stderr.decode(errors='replace')}")
    sock = out.stdout.decode().removeprefix("unix://")
    pid = int((bundle / "shim.pid").read_text())
    deadline = time.monotonic() + 10  # the shim serves once it accepted and answered a connection
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(sock)
                break
            except OSError:
                time.sleep(0.01)
    time.sleep(0.2)  # its first steps after `serving` (logging, events) are part of its start
    total = cpu + _cpu(pid) + sum(_cpu(p) - c for p, c in servers.items())
    t = time.perf_counter()
    subprocess.run([*argv, "delete"], cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    deleted = time.perf_counter() - t
    deadline = time.monotonic() + 10
    while _alive(pid):
        if time.monotonic() > deadline:
            raise SystemExit(f"shim {pid} did not exit after delete")
        time.sleep(0.02)
    return {"wall": wall, "cpu": cpu, "total_cpu": total, "delete": deleted}


def _q(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0] * 1000:7.1f}"
    q = statistics.quantiles(xs, n=4)
    return f"{statistics.median(xs) * 1000:7.1f} ({q[0] * 1000:.0f}-{q[2] * 1000:.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="runs per case (interleaved)")
    ap.add_argument("--shim", action="append", default=[], metavar="NAME=PATH",
                    help="another installation's containerd-shim-pykata-v2 to measure beside this one")
    args = ap.parse_args()
    shims = {"this": SHIM} | {k: Path(v) for k, v in (s.split("=", 1) for s in args.shim)}
    load = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="startbench-") as tmp:
        root = Path(tmp)
        runtime_dir = root / "run"
        runtime_dir.mkdir()
        envs = {name: _env(shim, root / f"{name}.toml", runtime_dir) for name, shim in shims.items()}
        address = str(root / "containerd.sock")  # the fork servers live while it exists
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen(8)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in shims}
        python: list[float] = []
        try:
            for name, shim in shims.items():  # launches each installation's fork server
                _one(shim, root, f"warm-{name}", address, envs[name])
            for i in range(args.n):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                python.append(time.perf_counter() - t)
                for name, shim in shims.items():
                    results[name].append(_one(shim, root, f"{name}-{i}", address, envs[name]))
        finally:
            listener.close()
            for pid in _servers(address):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).terminate()
    base = statistics.median(python)
    print(f"shim start, n={args.n}, load before {' '.join(load)}, after {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"python -c pass: {_q(python)} ms")
    print(f"{'case':<10} {'start wall ms':>22} {'x python':>8} {'start CPU ms':>22} {'CPU all ms':>22} "
          f"{'delete wall ms':>22}")
    for name, rs in results.items():
        wall = [r["wall"] for r in rs]
        print(f"{name:<10} {_q(wall):>22} {statistics.median(wall) / base:8.1f} {_q([r['cpu'] for r in rs]):>22} "
              f"{_q([r['total_cpu'] for r in rs]):>22} {_q([r['delete'] for r in rs]):>22}")


if __name__ == "__main__":
    main()
