"""WarmUp: run a container's paths once in a VM that will soon start one (a warm-pool clone).

Under TCG a VM restored from a template starts with an empty translation cache: every guest
instruction is translated again the first time it runs, in the kernel and in crun alike, so the
first `crun create` of a clone costs 2-3x later ones (guest, Nov 2026). A pooled VM waits paused
for its pod; the warm pool calls this before pausing it, so the pod's first container runs code
QEMU has already translated (crun and its libraries are file pages of the guest's root, shared by
every process that maps them: their translations serve the next crun too).

The throwaway container is made the way CreateContainer makes one, from nothing the host sends:
a tmpfs, an overlay on it as the root (empty), containerd's default spec (namespaces, kernel
mounts, masked and read-only paths, capabilities), the agent's cgroup parent, `crun create`, then
`crun delete --force`, and everything is unmounted and removed. It runs before SetPolicy and
CreateSandbox, so nothing of a pod exists yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pykata.agent import bundle
from pykata.agent.crun import Crun, CrunError, Stdio
from pykata.agent.settings import AgentSettings
from pykata.agent.sysmount import MS_NODEV, MS_NOSUID, mount, umount

log = logging.getLogger("pykata.agent.warmup")

CONTAINER_ID = "pykata-warmup"
_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
         "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
         "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def default_spec(root: Path, cgroups_path: str, container_id: str = CONTAINER_ID) -> dict[str, Any]:
    """containerd's default Linux spec (oci.WithDefaultSpec, what `ctr run` sends) for `root`."""
    def tmpfs(dest: str, *opts: str) -> dict[str, Any]:
        return {"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": list(opts)}

    return {
        "ociVersion": "1.0.2",
        "root": {"path": str(root)},
        "process": {"args": ["/pykata-warmup"], "cwd": "/", "env": ["PATH=/bin"],
                    "user": {"uid": 0, "gid": 0}, "noNewPrivileges": True,
                    "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
        "hostname": container_id.strip("_"),
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            tmpfs("/dev", "nosuid", "strictatime", "mode=755", "size=65536k"),
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            tmpfs("/dev/shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            tmpfs("/run", "nosuid", "strictatime", "mode=755", "size=65536k"),
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


async def warm_up(crun: Crun, settings: AgentSettings, extra_mounts: list[dict[str, Any]], *,
                  container_id: str = CONTAINER_ID, seccomp: dict[str, Any] | None = None,
                  created: Callable[[dict[str, Any], Path], None] | None = None, nice: int = 0) -> None:
    """Create and delete one throwaway container `container_id`, with `seccomp` as its linux.seccomp
    when given; `created(config, crun_state_dir)` runs between the create and the delete; `nice`: the
    niceness of its `crun create`. Raises CrunError or OSError; leaves nothing behind either way (its
    mounts, bundle, crun state and cgroup are removed)."""
    base = settings.storage_dir / container_id
    bundle_dir = settings.bundles / container_id
    scratch, root = base / "scratch", base / "root"
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        async with contextlib.AsyncExitStack() as undo:
            undo.callback(shutil.rmtree, base, True)
            undo.callback(shutil.rmtree, bundle_dir, True)
            for d in (scratch, root, bundle_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            mount("tmpfs", str(scratch), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            undo.callback(umount, str(scratch))
            for layer in ("lower", "upper", "work"):
                (scratch / layer).mkdir(mode=0o755)
            # crun create checks that the process's executable exists; it is never run
            (scratch / "lower/pykata-warmup").touch(mode=0o755)
            mount("overlay", str(root), "overlay", MS_NOSUID | MS_NODEV,
                  f"lowerdir={scratch}/lower,upperdir={scratch}/upper,workdir={scratch}/work")
            undo.callback(umount, str(root))
            spec = default_spec(root, settings.cgroups_path(container_id), container_id)
            if seccomp is not None:
                spec["linux"]["seccomp"] = seccomp
            config = bundle.rewrite_spec(spec, roots=[base], cgroups_path=spec["linux"]["cgroupsPath"],
                                         extra_mounts=extra_mounts)
            (bundle_dir / "config.json").write_text(json.dumps(config))
            undo.push_async_callback(_delete, crun, container_id)
            await crun.create(container_id, bundle_dir, bundle_dir / "init.pid", Stdio(devnull, devnull, devnull),
                              nice=nice)
            if created is not None:
                created(config, crun.root / container_id)
    finally:
        os.close(devnull)


async def _delete(crun: Crun, container_id: str) -> None:
    # after a failed create there may be nothing to delete; the create's error is the one to report
    try:
        await crun.delete(container_id)
    except CrunError as exc:
        log.warning("warm-up: %s", exc)
