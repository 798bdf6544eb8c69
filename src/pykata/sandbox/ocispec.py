"""Build and rewrite OCI runtime specs (config.json) for containers pykata runs itself."""

from __future__ import annotations

import copy
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.errors import InvalidArgument, PykataError
from pykata.images.specshape import check_spec_shape

# Guest path where the sandbox's shared directory is mounted (the host's <sandbox>/shared).
GUEST_SHARED_DIR = "/run/pykata-agent/shared"
# Guest directory where the agent mounts per-container storages (pykata.agent.settings' storage_dir).
GUEST_STORAGE_DIR = "/run/pykata-agent/storage"
# The source of the mount that stands for the pod's /dev/shm in a guest spec: the agent binds the
# VM's own /dev/shm tmpfs there (pykata.agent.bundle.POD_SHM_SOURCE names the same).
POD_SHM_SOURCE = "pykata-pod-shm"
# `pykata run --init`: a mount the agent makes a read-only bind of the guest image's tini
# (pykata.agent.bundle.INIT_MOUNT_TYPE), run as the container's PID 1 from INIT_PATH
INIT_MOUNT_TYPE = "pykata-init"
INIT_PATH = "/sbin/docker-init"


def with_init(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` with a tiny init as PID 1 (docker's --init: tini, reaping orphaned children and forwarding
    signals to the process it starts): its process runs under INIT_PATH."""
    out = copy.deepcopy(spec)
    out.setdefault("mounts", []).append({"destination": INIT_PATH, "type": INIT_MOUNT_TYPE,
                                         "source": INIT_MOUNT_TYPE, "options": ["ro"]})
    proc = out.setdefault("process", {})
    proc["args"] = [INIT_PATH, "--", *(proc.get("args") or [])]
    return out
POD_SHM_OPTIONS = ("nosuid", "nodev", "noexec", "mode=1777", "size=65536k")
# the shims' fork server's socket directory (pykata.shim.handoff.HANDOFF_DIR; the shim is above us)
HANDOFF_DIR = "/run/pykata-handoff"

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]


class SpecError(PykataError):
    """A run option is invalid; `field` names it (e.g. "--volume", "--memory")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Volume:
    host: Path
    guest: str
    readonly: bool = False
    propagation: str = "rprivate"  # of the host-side bind: (r)private, (r)slave or (r)shared

    @classmethod
    def parse(cls, text: str, field: str = "--volume") -> Volume:
        """HOST:GUEST[:ro|rw]. Raises SpecError naming `field` (the CLI's option, or the SDK's volumes[i])."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise SpecError(field, f"{text!r} is not HOST:GUEST[:ro]")
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise SpecError(field, f"{text!r}: mode must be ro or rw, not {mode!r}")
        host = Path(parts[0]).absolute()
        if not host.exists():
            raise SpecError(field, f"host path {host} does not exist")
        if not parts[1].startswith("/"):
            raise SpecError(field, f"container path {parts[1]!r} must be absolute")
        return cls(host, parts[1], mode == "ro")


_PROPAGATION = ("private", "rprivate", "slave", "rslave", "shared", "rshared")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([bkmg]?)i?b?$", re.I)


def parse_size(text: str, field: str = "--memory") -> int:
    """'512m', '1g', '1048576' -> bytes. Raises SpecError."""
    m = _SIZE.match(text.strip())
    if not m:
        raise SpecError(field, f"{text!r} is not a size like 512m or 1g")
    mult = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    value = int(float(m.group(1)) * mult)
    if value < 4 << 20:
        raise SpecError(field, f"{text!r} is below the 4 MiB minimum")
    return value


def _user(user: tuple[int, int], groups: Sequence[int]) -> dict[str, Any]:
    """An OCI process.user: additionalGids only when there are some (runc's spec omits an empty list)."""
    out: dict[str, Any] = {"uid": user[0], "gid": user[1]}
    if groups:
        out["additionalGids"] = [int(g) for g in groups]
    return out


def check_cwd(cwd: str | None, field: str = "cwd") -> str | None:
    """`cwd` when it is None or an absolute path (checked on the host, before a VM boots). Raises
    SpecError naming `field`."""
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd):
        raise SpecError(field, f"{str(cwd)[:80]!r} is not an absolute path")
    return cwd


def parse_env(items: list[str], host_env: Mapping[str, str] | None = None) -> list[str]:
    """KEY=VALUE items as the container gets them. A bare KEY takes its value from `host_env` (docker's
    `-e KEY`: the CLI passes its own environment) and is left out when `host_env` has none; without
    `host_env` it is KEY=. Raises SpecError naming --env."""
    out = []
    for item in items:
        key = item.partition("=")[0]
        if not key or "\0" in item:
            raise SpecError("--env", f"{item!r} is not KEY=VALUE")
        if "=" in item:
            out.append(item)
        elif host_env is None:
            out.append(f"{item}=")
        elif key in host_env and "\0" not in host_env[key]:
            out.append(f"{key}={host_env[key]}")
    return out


def build_spec(
    args: list[str], *, env: list[str], cwd: str = "/", user: tuple[int, int] = (0, 0), terminal: bool = False,
    hostname: str = "pykata", readonly_rootfs: bool = False, memory_bytes: int | None = None,
    cpus: float | None = None, groups: Sequence[int] = (),
) -> dict[str, Any]:
    """A runtime-spec 1.0 config for a container with its own namespaces (as runc's `spec`); `groups`
    are the user's supplementary groups (additionalGids)."""
    if not args:
        raise SpecError("COMMAND", "no command given and the image has no default command")
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_bytes is not None:
        resources["memory"] = {"limit": memory_bytes}
    if cpus is not None:
        if cpus <= 0:
            raise SpecError("--cpus", f"{cpus} must be positive")
        resources["cpu"] = {"quota": int(cpus * 100_000), "period": 100_000}
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": _user(user, groups),
            "args": list(args),
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly_rootfs},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": resources,
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def is_host_bind(mount: dict[str, Any]) -> bool:
    opts = mount.get("options") or []
    return (mount.get("type") == "bind" or "bind" in opts or "rbind" in opts) and str(
        mount.get("source", "")).startswith("/")


# Mounts of the host kernel's own interfaces: a file there is a knob of the host (a sysctl such as
# kernel.core_pattern, another process's oom_score_adj, a cgroup's limits), not data. Shared writable
# with a VM, the guest's writes reach them through virtiofsd or the 9p helper, which run as root.
KERNEL_FS_TYPES = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "securityfs", "debugfs", "tracefs", "configfs", "bpf", "efivarfs",
    "pstore", "fusectl", "binfmt_misc", "selinuxfs", "nsfs", "mqueue", "rpc_pipefs", "nfsd", "autofs",
})


# Of those, the ones no share may reach even read-only: through a proc file system the file server
# (root, with a few capabilities) reads the environment, maps and memory (/proc/<pid>/mem) of every
# host process of its uid with no more capabilities than its own: other pods' file servers (virtiofsd
# maps its VM's whole RAM), daemons that dropped theirs. debugfs, tracefs and securityfs hold what
# only root may read of the host kernel (its page tables and addresses, trace buffers of every
# process, the IMA log), which the file server reads as root.
READ_REFUSED_FS_TYPES = frozenset({"proc", "debugfs", "tracefs", "securityfs"})


@dataclass(frozen=True)
class KernelMount:
    point: Path
    fstype: str


def kernel_interface_mounts(mountinfo: str | None = None) -> list[KernelMount]:
    """Mounts (of `mountinfo`'s text, default this process's) of the KERNEL_FS_TYPES."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return [KernelMount(Path("/proc"), "proc"), KernelMount(Path("/sys"), "sysfs")]
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) > sep + 1 and fields[sep + 1] in KERNEL_FS_TYPES:
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            out.append(KernelMount(Path(point.replace("\\134", "\\")), fields[sep + 1]))
    return out


def check_host_bind_sources(spec: dict[str, Any], protected: Sequence[Path], skip: Iterable[int] = (),
                            kernel_mounts: Sequence[KernelMount] | None = None) -> None:
    """Refuse a host bind mount (a hostPath, a --volume) that would hand the guest pykata's own files.

    A source that is one of `protected` (the runtime dir with every pod's state, sockets and shared
    directories, the cache, the template's memory file that every clone maps, the fork server's socket
    directory, the configuration) or lies below one is refused; so is a writable source above one
    (a read-only "/" of a node agent stays allowed). The source is resolved (a symlink to one of them
    counts as it) and the spec's source is replaced by that resolved path, which the host then binds
    without following any symlink (pykata.resources.mounts.bind, no_symlinks): a guest that owns a
    host directory on the way (another read-write volume) and swaps a component for a symlink between
    this check and the mount makes the mount fail instead of binding what the symlink names. The
    mounts at `skip` (moved into the guest: emptyDir, watched volumes) are not shared.

    A writable source on, below or above a mount of the host kernel's interfaces (`kernel_mounts`,
    default kernel_interface_mounts(): /proc, /sys, cgroups, ...) is refused too: the guest would set
    the host's sysctls and other processes' settings through it. For proc, debugfs, tracefs and
    securityfs a read-only one is refused as well, "/" included (READ_REFUSED_FS_TYPES: the guest would
    read host processes' memory, or what only the host's root may read); other read-only ones stay
    allowed (the bind is read-only all the way down).

    Raises:
        InvalidArgument: naming `mounts[i].source`.
    """
    skipped = set(skip)
    roots = [Path(os.path.realpath(p)) for p in protected]
    kernel: Sequence[KernelMount] | None = kernel_mounts
    for i, m in enumerate(spec.get("mounts") or []):
        if i in skipped or not isinstance(m, dict) or not is_host_bind(m):
            continue
        if posixpath.normpath(str(m.get("destination", ""))) == "/dev/shm":
            continue  # the pod's shm: becomes the VM's own (for_guest)
        source = Path(os.path.realpath(str(m["source"])))
        m["source"] = str(source)  # pinned: what is mounted is what is checked here
        writable = "ro" not in (m.get("options") or [])
        shown = repr(str(source)[:200])  # a pod spec's text
        for root in roots:
            if source == root or root in source.parents:
                raise InvalidArgument(f"mounts[{i}].source", f"{shown} is pykata's own {root}: a host "
                                                            "path shared with a VM may not reach it")
            if writable and source in root.parents:
                raise InvalidArgument(f"mounts[{i}].source", f"{shown} holds pykata's own {root}: share "
                                                            "it read-only, or a path beside it")
        if kernel is None:
            kernel = kernel_interface_mounts()
        for km in kernel:
            point = km.point
            if not (source == point or point in source.parents or source in point.parents):
                continue
            if km.fstype in READ_REFUSED_FS_TYPES:
                raise InvalidArgument(f"mounts[{i}].source", f"{shown} is or holds {point}, the host's {km.fstype}, "
                                                            "an interface of the host's kernel: through it the "
                                                            "guest would read host processes' memory or what "
                                                            "only the host's root may read")
            if writable:
                raise InvalidArgument(f"mounts[{i}].source", f"{shown} is or holds {point}, an interface of "
                                                            "the host's kernel: share it read-only")


# AppArmor profiles that ask nothing of the guest: none, and the one containerd's CRI gives every
# container on an AppArmor host unasked (Kubernetes' runtime/default), which protects the host from a
# runc container: here the VM is that boundary, as in Kata (which drops it likewise).
UNASKED_APPARMOR_PROFILES = frozenset({"", "unconfined", "cri-containerd.apparmor.d"})


def check_security_labels(process: Any, linux: Any = None, field: str = "process") -> None:
    """Refuse an SELinux label or an AppArmor profile the guest cannot apply: its kernel has neither
    LSM, so running the container would silently drop a confinement the user asked for (Kata's agent
    refuses an SELinux label the same way). `process` is an OCI process object, `linux` the spec's
    linux object (its mountLabel); `field` names the process object in the error.

    Raises:
        InvalidArgument: naming `{field}.selinuxLabel`, `{field}.apparmorProfile` or `linux.mountLabel`.
    """
    if isinstance(process, dict):
        label = process.get("selinuxLabel")
        if label:
            raise InvalidArgument(f"{field}.selinuxLabel", f"{str(label)[:200]!r}: SELinux is not enabled in the "
                                                           "guest kernel, so the label cannot be applied")
        profile = process.get("apparmorProfile")
        if profile and profile not in UNASKED_APPARMOR_PROFILES:
            raise InvalidArgument(f"{field}.apparmorProfile",
                                  f"{str(profile)[:200]!r}: AppArmor is not enabled in the guest kernel, so the "
                                  "profile cannot be applied (only 'unconfined' or containerd's default "
                                  "'cri-containerd.apparmor.d', which the VM stands in for)")
    if isinstance(linux, dict) and linux.get("mountLabel"):
        raise InvalidArgument("linux.mountLabel", f"{str(linux['mountLabel'])[:200]!r}: SELinux is not enabled in "
                                                  "the guest kernel, so the label cannot be applied")


def protected_host_dirs(runtime: Path, cache: Path, template: Path, config_dir: Path) -> list[Path]:
    """What check_host_bind_sources keeps from VMs on this host (see its docstring)."""
    import pykata

    return [runtime, cache, template, Path(HANDOFF_DIR), config_dir, Path(pykata.__file__).parent]


def add_volumes(spec: dict[str, Any], volumes: list[Volume]) -> dict[str, Any]:
    """The spec with `volumes` as bind mounts (host sources), like runc would take them."""
    out = copy.deepcopy(spec)
    for vol in volumes:
        out.setdefault("mounts", []).append({"destination": vol.guest, "type": "bind", "source": str(vol.host),
                                             "options": ["rbind", "ro" if vol.readonly else "rw"]})
    return out


def for_guest(spec: dict[str, Any], container_id: str, in_guest: Mapping[int, str] | None = None
              ) -> tuple[dict[str, Any], list[Volume]]:
    """The spec as the agent must see it, and the host paths to share for it.

    The root and every host bind mount move to their guest paths in the shared directory
    (<shared>/<container>/rootfs, <shared>/<container>/volumes/<n>); host-only parts (hooks, host
    namespace paths) are removed; an IPC or UTS namespace joined by path (the pod's) becomes the VM's
    own (_joins_the_vms). A host bind on /dev/shm (containerd's CRI binds the pod's shm
    tmpfs there in every container of the pod) becomes the pod's shm in the guest: the VM is the
    pod, and the shared file system would make it a network file system, where shared writable
    mmap (POSIX shared memory) does not work. An agent that does not know the marker mounts a tmpfs
    of the container's own. The mounts at the indices of `in_guest` (the pod's emptyDir volumes,
    pykata.resources.emptydir) become binds of the guest paths it maps them to.
    """
    out = copy.deepcopy(spec)
    base = f"{GUEST_SHARED_DIR}/{container_id}"
    out.setdefault("root", {})["path"] = f"{base}/rootfs"
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    namespaces = linux.get("namespaces")
    if isinstance(namespaces, list):
        linux["namespaces"] = [ns for ns in namespaces if not _joins_the_vms(ns, out)]
    for ns in linux.get("namespaces") or []:
        ns.pop("path", None)
    if out.get("hostname") and isinstance(linux.get("namespaces"), list) and not any(
            isinstance(ns, dict) and ns.get("type") == "uts" for ns in linux["namespaces"]):
        # the node's UTS namespace (hostNetwork: containerd sets the node's name and no UTS entry) is, in
        # the guest, a UTS namespace of the container's own with that name: crun refuses a host name
        # without one, and the VM's own is not the node's
        linux["namespaces"].append({"type": "uts"})
    shares: list[Volume] = []
    mounts = out.get("mounts") or []
    for i, m in enumerate(mounts):
        if in_guest and i in in_guest:
            m["source"] = in_guest[i]
            continue
        if not is_host_bind(m):
            continue
        opts = m.get("options") or []
        if posixpath.normpath(str(m.get("destination", ""))) == "/dev/shm":
            readonly = ("ro",) if "ro" in opts else ()
            mounts[i] = {"destination": "/dev/shm", "type": "tmpfs", "source": POD_SHM_SOURCE,
                         "options": [*POD_SHM_OPTIONS, *readonly]}
            continue
        propagation = next((o for o in opts if o in _PROPAGATION), "rprivate")
        shares.append(Volume(Path(m["source"]), m["destination"], "ro" in opts, propagation))
        m["source"] = f"{base}/volumes/{len(shares) - 1}"
    return out, shares


def _joins_the_vms(ns: Any, spec: dict[str, Any]) -> bool:
    """Whether a namespace entry joins the pod's IPC or UTS namespace (CRI gives it the path of the
    pause's): in the guest the pod's is the VM's own, which the container gets by having no entry.
    So the pod's containers share SysV IPC and POSIX message queues, and their host name, as under
    runc. A UTS entry stays when the spec sets a host name (which needs a namespace of its own)."""
    if not isinstance(ns, dict) or not ns.get("path"):
        return False
    return ns.get("type") == "ipc" or (ns.get("type") == "uts" and not spec.get("hostname"))


def bundle_spec_with(spec: dict[str, Any], args: list[str], env: list[str], cwd: str | None,
                     user: tuple[int, int] | None, terminal: bool, memory_bytes: int | None,
                     cpus: float | None, groups: Sequence[int] = ()) -> dict[str, Any]:
    """A bundle's own config.json with the run options that were given applied on top. Raises
    InvalidArgument for a malformed config.json (check_spec_shape), SpecError."""
    out = copy.deepcopy(check_spec_shape(spec))
    proc = out.setdefault("process", {})
    if args:
        proc["args"] = args
    if env:
        proc["env"] = [*(proc.get("env") or []), *env]
    if cwd:
        proc["cwd"] = cwd
    if user is not None:
        proc["user"] = _user(user, groups)
    if terminal:
        proc["terminal"] = True
    res = out.setdefault("linux", {}).setdefault("resources", {})
    if memory_bytes is not None:
        res["memory"] = {"limit": memory_bytes}
    if cpus is not None:
        res["cpu"] = {"quota": int(cpus * 100_000), "period": 100_000}
    if not proc.get("args"):
        raise SpecError("COMMAND", "no command given and the bundle has no process.args")
    return out
