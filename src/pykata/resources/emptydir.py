"""A pod's emptyDir volumes made in the guest (Kata's "ephemeral"/"local" storages) instead of shared
from the host's kubelet directory over 9p / virtio-fs.

kubelet makes an emptyDir as the directory <kubelet root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/
<volume name> (for `medium: Memory`, a tmpfs mounted there) and every container of the pod that mounts
the volume gets a bind mount of it. Under pykata such a bind becomes a tmpfs in the guest at
<agent state>/emptydir/<volume name>, made when the pod's first container that mounts it is created,
shared by the pod's other containers that mount it, and gone with the sandbox. The host directory is
never written (it stays empty); the guest never sees it.

The rule (`classify`), for a bind mount `mounts[i]` of a container of a pod whose uid U is known (the
CRI annotation io.kubernetes.cri.sandbox-uid; ctr and `pykata run` have none, so no emptyDir there):
  * its source, taken as written, is under <kubelet root>/pods/U/volumes/kubernetes.io~empty-dir/:
    it must be exactly that directory plus one volume name, a DNS-1123 label as Kubernetes requires
    (no `..`, no `//`, no deeper path), and on the host a real directory (not a symlink); anything else
    there is refused naming `mounts[i].source`: kubelet never makes it, so it is crafted;
  * a well-formed path whose host directory is not empty when the pod first mounts the volume is not
    taken into the guest: it is shared from the host like any hostPath, so files that someone put there
    are seen and kept (never hidden behind an empty guest tmpfs); the same for every later container;
  * a path merely containing `kubernetes.io~empty-dir` anywhere else (another pod's uid, another root,
    another directory depth) is an ordinary host bind, shared as before;
  * `medium: Memory`: the host directory is the root of a tmpfs mount; its size bounds the guest's
    (the root of any other mount, kubelet's hugetlbfs for `medium: HugePages`, stays on the host);
  * a subPath of the volume (kubelet's <kubelet root>/pods/U/volume-subpaths/<name>/...) is a host
    directory: a volume that one of the pod's containers mounts by subPath is shared from the host
    for all of them if that came first, and a subPath of a volume already in the guest is refused
    naming the mount (its files would be split between host and guest).
The guest tmpfs takes the host directory's mode, owner and group (kubelet's 0777, or fsGroup's setgid
group), and is at most `runtime.emptydir_size` MiB of the VM's memory (0: as a container's writable
layer, `runtime.rootfs_upper_size`, or half the VM's memory when it is made), so a pod filling it fills
only its own VM's share.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Any

from pykata.errors import InvalidArgument

EMPTY_DIR_PLUGIN = "kubernetes.io~empty-dir"
# the pod's uid as CRI passes it to containerd, which writes it into each container's spec
SANDBOX_UID_ANNOTATION = "io.kubernetes.cri.sandbox-uid"
# where the agent mounts the pod's volumes (pykata.agent.settings' pod_volume_dir)
GUEST_POD_VOLUME_DIR = "/run/pykata-agent/emptydir"
# a Kubernetes volume name (DNS-1123 label); the agent checks the same
VOLUME_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# kubelet's pod directories are named by the pod's uid (a UUID); CRI clients may pass other strings
POD_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TMPFS_MAGIC = 0x01021994


@dataclass(frozen=True)
class EmptyDir:
    """One emptyDir volume as the guest makes it."""

    name: str
    memory: bool  # medium: Memory (the host source is a tmpfs mount)
    mode: int
    uid: int
    gid: int
    host_size_mib: int  # the host tmpfs's size (Memory), else 0

    @property
    def guest_path(self) -> str:
        return f"{GUEST_POD_VOLUME_DIR}/{self.name}"

    def tmpfs_options(self, cap_mib: int) -> list[str]:
        """The guest tmpfs's options: the host directory's mode and owners, and its size: at most
        `cap_mib`, and for Memory at most the host tmpfs's size."""
        size = min(cap_mib, self.host_size_mib) if self.memory and self.host_size_mib else cap_mib
        return [f"mode={self.mode:o}", f"uid={self.uid}", f"gid={self.gid}", f"size={max(size, 1)}m"]


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("f_blocks", ctypes.c_ulong),
                ("f_bfree", ctypes.c_ulong), ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2), ("f_namelen", ctypes.c_long),
                ("f_frsize", ctypes.c_long), ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]


def _fstatfs(fd: int) -> _Statfs:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf


def pod_uid(spec: dict[str, Any]) -> str | None:
    """The pod uid a container's spec carries (CRI), or None."""
    notes = spec.get("annotations")
    uid = notes.get(SANDBOX_UID_ANNOTATION) if isinstance(notes, dict) else None
    return uid if isinstance(uid, str) and POD_UID_RE.match(uid) else None


def volume_name(source: str, field: str, kubelet_root: str, uid: str) -> str | None:
    """The emptyDir volume name `source` names for pod `uid`, None when it is not under the pod's
    emptyDir directory. Raises InvalidArgument naming `field` for a crafted path there."""
    parent = posixpath.join(kubelet_root.rstrip("/") or "/", "pods", uid, "volumes", EMPTY_DIR_PLUGIN)
    if source != parent and not source.startswith(parent + "/"):
        # a `..` can reach the directory from elsewhere: normalised, it must not land there either
        norm = posixpath.normpath(source)
        if EMPTY_DIR_PLUGIN in source and (norm == parent or norm.startswith(parent + "/")):
            raise InvalidArgument(field, f"{source!r} reaches the pod's emptyDir directory through '..'")
        return None
    name = source[len(parent) + 1:]
    if not VOLUME_NAME_RE.match(name):
        raise InvalidArgument(field, f"{source!r}: {name[:80]!r} is not an emptyDir volume name "
                                     "(a DNS-1123 label: lower-case letters, digits, '-', at most 63)")
    return name


def subpath_volume(source: str, kubelet_root: str, uid: str) -> str | None:
    """The volume whose subPath `source` is (kubelet binds <root>/pods/<uid>/volume-subpaths/<volume>/
    <container>/<index> for a volumeMount with subPath), or None."""
    parent = posixpath.join(kubelet_root.rstrip("/") or "/", "pods", uid, "volume-subpaths") + "/"
    if not source.startswith(parent):
        return None
    name = source[len(parent):].split("/", 1)[0]
    return name if VOLUME_NAME_RE.match(name) else None


def inspect(source: str, name: str, field: str) -> EmptyDir | None:
    """The host directory of emptyDir `name`: None when it holds files, or is a mount of another file
    system than tmpfs (`medium: HugePages`): it is then shared from the host, as a hostPath would be.
    Raises InvalidArgument naming `field` when it is not a directory (a symlink, a file, missing)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(field, f"emptyDir {name!r}: {source}: {exc.strerror} (kubelet makes a "
                                     "directory there)") from None
    try:
        st = os.fstat(fd)
        if os.listdir(fd):
            return None
        fs = _fstatfs(fd)
        mounted = st.st_dev != os.stat(os.path.dirname(source)).st_dev
        if mounted and fs.f_type != TMPFS_MAGIC:
            return None  # another medium (kubelet's hugetlbfs for `medium: HugePages`): not a tmpfs's job
        memory = mounted
        size = fs.f_blocks * fs.f_frsize >> 20 if memory else 0
        return EmptyDir(name, memory, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size)
    finally:
        os.close(fd)
