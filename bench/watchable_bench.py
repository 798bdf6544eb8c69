#!/usr/bin/env python3
"""Reading a configmap volume in a CRI pod: runc, pykata's copy in the guest (pykata.resources.watchable,
the default) and the host-shared way (runtime.watchable_max_files = 0: 9p in a templated VM), in one
private CRI containerd, alternately; and how long a kubelet update takes to show in the guest.

    .venv/bin/python bench/watchable_bench.py [-n 3] [--keys 20] [--loops 50]

Each round makes, per runtime, a pod whose container mounts a configmap volume of --keys keys of 1 KiB
(written as kubelet's AtomicWriter does, under a temp kubelet root the configuration names), then times
in the container (busybox `time`) one `cat` of every key --loops times over (each open goes through the
key's symlink and `..data`, as a program reading its configuration does) and one `ls -lL` of them
(a stat of each), then
(pykata) rewrites the volume on the host and polls until the container reads the new value. Prints
medians over -n rounds (a first round warms caches and is not counted), ratios to runc, the load.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from cri_api.v1 import api_pb2  # noqa: E402

from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd  # noqa: E402
from tests.kubeletvolume import write_volume  # noqa: E402

CONFIG_PATH = "io.katacontainers.config_path"
TIME_RE = re.compile(r"real\s+(\d+)m\s*([\d.]+)s")


def _seconds(stderr: bytes) -> float:
    m = TIME_RE.search(stderr.decode())
    assert m, stderr
    return int(m.group(1)) * 60 + float(m.group(2))


def one_pod(cri: Cri, kubelet: Path, handler: str, name: str, keys: int, loops: int, scale: int,
            annotations: dict[str, str]) -> dict[str, float]:
    uid = f"uid-{name}"
    volume = kubelet / "pods" / uid / "volumes" / "kubernetes.io~configmap" / "cfg"
    write_volume(volume, {f"key{i}": b"v0" + b"x" * 1022 for i in range(keys)})
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace="pykata-test", attempt=0),
        hostname=name[:63], annotations=annotations)
    pod_id = str(cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                      timeout=cri.timeout).pod_sandbox_id)
    out: dict[str, float] = {}
    try:
        cconfig = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="c0"), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
            command=["sleep", "3600"], mounts=[api_pb2.Mount(container_path="/cfg", host_path=str(volume),
                                                             readonly=True)])
        cid = str(cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=cconfig, sandbox_config=config), timeout=cri.timeout).container_id)
        cri.start_container(cid)
        # one process each: the files named --loops times over (what is timed is the reads, not forks)
        # (busybox `time` counts in 10 ms: the fast columns read `scale` times as much, divided back)
        names = " ".join(["/cfg/*"] * loops * scale)
        for label, op in (("cat", f"cat {names} > /dev/null"), ("ls -lL", f"ls -lL {names} > /dev/null")):
            reply = cri.exec_sync(cid, ["time", "sh", "-c", op], timeout=600)
            assert reply.exit_code == 0, reply
            out[label] = _seconds(reply.stderr) / scale
        write_volume(volume, {f"key{i}": b"v1" + b"x" * 1022 for i in range(keys)})
        t0 = time.monotonic()
        while cri.exec_sync(cid, ["head", "-c", "2", "/cfg/key0"]).stdout != b"v1":
            assert time.monotonic() - t0 < 60, "the update never showed"
            time.sleep(0.1)
        out["update seen"] = time.monotonic() - t0
    finally:
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)
        shutil.rmtree(kubelet / "pods" / uid, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=20)
    ap.add_argument("--loops", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="watchable-bench-"))
    kubelet = tmp / "kubelet"
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    loads = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        ctd = CriContainerd(tmp / "ctd", runtime_config={"kubelet_root_dir": f'"{kubelet}"'})
        stack.callback(ctd.stop)
        ctd.start()
        ctd.import_images(tmp / "cache")
        shared = ctd.pod_configs / "shared.toml"
        text = (ctd.dir / "pykata.toml").read_text()
        shared.write_text(re.sub(r"(?m)^watchable_max_files = .*$", "watchable_max_files = 0", text))
        cri = stack.enter_context(Cri(ctd.socket))
        cri.timeout = 600
        runs = [("runc", "runc", 20, {}), ("pykata", "pykata", 20, {}),
                ("pykata-host-shared", "pykata", 1, {CONFIG_PATH: str(shared)})]
        for i in range(args.rounds + 1):
            for label, handler, scale, notes in runs:
                got = one_pod(cri, kubelet, handler, f"wb-{i}-{label[-6:]}", args.keys, args.loops, scale, notes)
                if i:  # round 0 warms caches
                    results[label].append(got)
                loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
    print(f"a configmap volume of {args.keys} keys, {args.loops} passes (wall s, median of {args.rounds}; "
          f"ratio to runc); load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    cols = ["cat", "ls -lL", "update seen"]
    print(f"{'':20}" + "".join(f"{c:>20}" for c in cols))
    base = {c: statistics.median(r[c] for r in results["runc"]) for c in cols}
    for label, rows in results.items():
        cells = []
        for c in cols:
            med = statistics.median(r[c] for r in rows)
            ratio = f" ({med / base[c]:.1f}x)" if c != "update seen" and base[c] > 0 else ""
            cells.append(f"{med:.4f}{ratio}")
        print(f"{label:20}" + "".join(f"{c:>20}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
