#!/usr/bin/env python3
"""What a guest emptyDir costs the host's memory: a CRI pod (private containerd, tests/cri/harness.py)
whose container mounts a disk-backed emptyDir (made in the guest: pykata.resources.emptydir), N MiB
written into it and then removed.

    .venv/bin/python bench/emptydir_bench.py [--mib 64]

Prints, for the pod's QEMU (its RSS from /proc/<pid>/status) and the guest (Shmem in /proc/meminfo,
what tmpfs holds): idle with the volume empty, after `dd` of N MiB into the volume, after `rm` of the
file (QEMU's share once the guest's free-page reporting handed the pages back, waited for up to 20 s),
and the volume's tmpfs size as the container sees it (df). The host directory is checked empty.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cri_api.v1 import api_pb2  # noqa: E402

from pykata.resources.emptydir import EMPTY_DIR_PLUGIN  # noqa: E402
from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd  # noqa: E402


def _sh(cri: Cri, cid: str, script: str) -> str:
    reply = cri.exec_sync(cid, ["sh", "-c", script], timeout=120)
    if reply.exit_code:
        raise SystemExit(f"{script!r}: {reply.stderr.decode()}")
    return str(reply.stdout.decode())


def _qemu_rss_mib(pod_id: str) -> float:
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] and p.info["name"].startswith("qemu-system") and pod_id in cmd:
            status = Path(f"/proc/{p.pid}/status").read_text()
            m = re.search(r"VmRSS:\s+(\d+) kB", status)
            return int(m.group(1)) / 1024 if m else float("nan")
    raise SystemExit(f"no QEMU for pod {pod_id}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="emptydir-bench-") as d:
        tmp = Path(d)
        kubelet = tmp / "kubelet"
        ctd = CriContainerd(tmp / "ctd", runtime_config={"kubelet_root_dir": f'"{kubelet}"'})
        try:
            ctd.start()
            ctd.import_images(tmp / "cache")
            name = f"edbench-{uuid.uuid4().hex[:6]}"
            uid = f"uid-{name}"
            volume = kubelet / "pods" / uid / "volumes" / EMPTY_DIR_PLUGIN / "scratch"
            volume.mkdir(parents=True)
            volume.chmod(0o777)
            config = api_pb2.PodSandboxConfig(
                metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace="pykata-bench", attempt=0),
                hostname=name, linux=api_pb2.LinuxPodSandboxConfig())
            with Cri(ctd.socket) as cri:
                pod_id = str(cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(
                    config=config, runtime_handler="pykata"), timeout=cri.timeout).pod_sandbox_id)
                try:
                    cconf = api_pb2.ContainerConfig(
                        metadata=api_pb2.ContainerMetadata(name="c0"), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
                        command=["sleep", "3600"], linux=api_pb2.LinuxContainerConfig(),
                        mounts=[api_pb2.Mount(container_path="/scratch", host_path=str(volume))])
                    cid = str(cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pod_id, config=cconf, sandbox_config=config), timeout=cri.timeout).container_id)
                    cri.start_container(cid)
                    shmem = "awk '/^Shmem:/ {print $2}' /proc/meminfo"
                    rows = []

                    def sample(label: str) -> None:
                        rows.append((label, _qemu_rss_mib(pod_id), int(_sh(cri, cid, shmem)) / 1024))

                    time.sleep(2)
                    sample("idle, volume empty")
                    _sh(cri, cid, f"dd if=/dev/zero of=/scratch/f bs=1M count={args.mib} 2>/dev/null")
                    sample(f"{args.mib} MiB written")
                    _sh(cri, cid, "rm /scratch/f")
                    before = rows[-1][1]
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline and _qemu_rss_mib(pod_id) > before - args.mib * 0.8:
                        time.sleep(0.5)
                    sample("removed (free-page reporting)")
                    size = _sh(cri, cid, "df -m /scratch | tail -1").split()[1]
                    host_files = list(volume.iterdir())
                finally:
                    cri.stop_pod(pod_id)
                    cri.remove_pod(pod_id)
        finally:
            ctd.stop()
    print(f"{'state':<32}{'QEMU RSS MiB':>14}{'guest Shmem MiB':>17}")
    for label, rss, shm in rows:
        print(f"{label:<32}{rss:>14.1f}{shm:>17.1f}")
    print(f"volume tmpfs size as seen in the container: {size} MiB; host directory entries: {len(host_files)}")
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
