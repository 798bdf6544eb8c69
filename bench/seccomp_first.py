#!/usr/bin/env python3
"""The first container of a CRI pod with a seccomp profile: the one its VM's template compiled ahead
(containerd's RuntimeDefault, pykata.agent.seccompdefault) against one of the same size it did not.

    .venv/bin/python bench/seccomp_first.py [-n 8]

Each round runs two pykata pods (template clones) one after the other, alternating which goes first:
`default`, whose first container asks for RuntimeDefault (the agent loads the program its template
compiled), and `other`, whose first container asks for a Localhost profile that is RuntimeDefault with
two names of its first list swapped (the same filter, another digest: the agent compiles it, as every
first container did before the template compiled the default). Per variant, the median over N of:
StartContainer's wall time (containerd 1.6 creates the task there: the shim's Create and the agent's
CreateContainer), the pod's QEMU CPU seconds during that call, and the agent's own phases of that
CreateContainer (its `created container` console line: storages, bundle, crun create).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from cri_api.v1 import api_pb2  # noqa: E402

from pykata.agent.seccompdefault import CONTAINERD_1_6_RUNTIME_DEFAULT  # noqa: E402
from tests.cri.harness import BUSYBOX_IMAGE, KUBELET_NAMESPACES, Cri, running_cri_containerd  # noqa: E402

SP = api_pb2.SecurityProfile
LINE = re.compile(r"created container (\w+) .* in (\d+) ms: \d+ storages (\d+), bundle (\d+), crun create (\d+)"
                  r" \(seccomp (\w+)")


def qemu_cpu(pod_id: str) -> float:
    """CPU seconds of the QEMU whose command line names the pod (a template clone's -name)."""
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] == "qemu-system-x86_64" and pod_id in cmd:
            t = p.cpu_times()
            return float(t.user + t.system)
    raise RuntimeError(f"no QEMU for pod {pod_id}")


def one_pod(cri: Cri, name: str, profile: Any) -> dict[str, Any]:
    pod_id, pod_config = cri.run_pod(name, "pykata")
    try:
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="c0"), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
            command=["sleep", "1000"], linux=api_pb2.LinuxContainerConfig(
                security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=KUBELET_NAMESPACES,
                                                                       seccomp=profile)))
        cid = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout).container_id
        cpu0, t0 = qemu_cpu(pod_id), time.monotonic()
        cri.start_container(cid)
        wall, cpu = time.monotonic() - t0, qemu_cpu(pod_id) - cpu0
        text = "".join(p.read_text(errors="replace")
                       for p in sorted(Path("/run/pykata/sandboxes", pod_id).glob("vm/console.log*")))
        m = next((m for m in LINE.finditer(text) if m.group(1) == cid), None)
        if m is None:
            raise RuntimeError(f"no `created container` line for {cid} in the guest console")
        return {"start": wall, "qemu_cpu": cpu, "agent": int(m.group(2)), "storages": int(m.group(3)),
                "bundle": int(m.group(4)), "crun_create": int(m.group(5)), "seccomp": m.group(6)}
    finally:
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=8, help="pods per variant (default %(default)s)")
    args = ap.parse_args()
    other = copy.deepcopy(CONTAINERD_1_6_RUNTIME_DEFAULT)
    names = other["syscalls"][0]["names"]
    names[0], names[1] = names[1], names[0]
    results: dict[str, list[dict[str, Any]]] = {"default": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="seccomp-bench-") as d:
        localhost = Path(d) / "other.json"
        localhost.write_text(json.dumps(other))
        profiles = {"default": SP(profile_type=SP.RuntimeDefault),
                    "other": SP(profile_type=SP.Localhost, localhost_ref=str(localhost))}
        with running_cri_containerd(Path(d) / "ctd", Path(d) / "cache") as ctd, Cri(ctd.socket) as cri:
            one_pod(cri, "seccomp-bench-warm", profiles["other"])  # containerd's and the shim's first use
            for i in range(args.n):
                order = ("default", "other") if i % 2 == 0 else ("other", "default")
                for variant in order:
                    results[variant].append(one_pod(cri, f"seccomp-bench-{variant}-{i}", profiles[variant]))
    print(f"first CRI container's StartContainer, pykata pods from the template, n={args.n} per variant, "
          f"load {os.getloadavg()[0]:.1f} at the end")
    print(f"{'variant':8} {'seccomp':9} {'start s':>8} {'QEMU CPU s':>11} {'agent ms':>9} {'storages':>9} "
          f"{'bundle':>7} {'crun create':>12}")
    for variant, rows in results.items():
        kinds = "/".join(sorted({r["seccomp"] for r in rows}))

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(r[key] for r in rows))

        print(f"{variant:8} {kinds:9} {med('start'):8.3f} {med('qemu_cpu'):11.3f} {med('agent'):9.0f} "
              f"{med('storages'):9.0f} {med('bundle'):7.0f} {med('crun_create'):12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
