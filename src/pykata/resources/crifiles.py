"""The files containerd's CRI binds into every container of a pod (/etc/hosts, /etc/hostname and
/etc/resolv.conf, written once in the pod's sandbox directory when the pod starts), copied into the
guest instead of shared from the host.

Shared, they made every CRI pod mount the host's shared directory in its guest, even a pod whose roots
come on image disks and that has no host volume, and a sandbox whose guest mounted the share cannot be
snapshotted. Copied, they are one small pod volume (SyncVolume, as kubelet's configmaps:
pykata.resources.watchable) that the pod's containers bind, read-write as containerd binds them: a write
is seen by the pod's other containers, as under runc, but not by the host (nothing on the host reads
these files back; containerd never rewrites them after the pod started).

Only a bind of this very pod's file at its usual place is copied: `<containerd root>/
io.containerd.grpc.v1.cri/sandboxes/<pod sandbox id>/<name>` on `/etc/<name>`. Any other bind (a
hostPath volume on /etc/hosts, another pod's file) is shared from the host as before.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from typing import Any

from pykata.protocols.agent import agent_pb2

# containerd's file name in the pod's sandbox directory -> where it binds it in each container
CRI_FILES = {"hosts": "/etc/hosts", "hostname": "/etc/hostname", "resolv.conf": "/etc/resolv.conf"}
CRI_SANDBOXES = ("io.containerd.grpc.v1.cri", "sandboxes")
# the copy's bound: a hosts file with many hostAliases is the largest, and a few KiB in practice
MAX_FILE_BYTES = 64 << 10
TMPFS_BYTES = 1 << 20  # the pod volume holding them (the agent's least)


class Unsuitable(Exception):
    """The pod's files cannot be copied (missing, not a regular file, too large): they are shared."""


def volume_name(sandbox_id: str) -> str:
    """The pod volume (agent SyncVolume) that holds the copies: a DNS-1123 label that no pod's own
    volume is given in practice (it is made of the sandbox id containerd chooses as the pod starts)."""
    return "cri-files-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:20]


def cri_file(mount: Any, sandbox_id: str) -> str | None:
    """The name (a key of CRI_FILES) when `mount` is containerd's bind of pod `sandbox_id`'s file at its
    usual destination, else None."""
    if not isinstance(mount, dict) or mount.get("type") not in ("bind", None):
        return None
    source, destination = mount.get("source"), mount.get("destination")
    if not isinstance(source, str) or not isinstance(destination, str) or not source.startswith("/"):
        return None
    parts = source.split("/")
    if (len(parts) < 5 or tuple(parts[-4:-2]) != CRI_SANDBOXES or parts[-2] != sandbox_id
            or posixpath.normpath(source) != source):
        return None
    name = parts[-1]
    return name if CRI_FILES.get(name) == posixpath.normpath(destination) else None


def entries(sandbox_dir: str) -> list[agent_pb2.VolumeEntry]:
    """The pod's CRI files found in `sandbox_dir` (containerd's directory of the pod) as the tree of
    a SyncVolume: a root directory and each file, its mode, owner and contents. Symlinks are not
    followed. Raises Unsuitable naming the file."""
    out = [agent_pb2.VolumeEntry(path="", mode=stat.S_IFDIR | 0o755, uid=0, gid=0)]
    for name in sorted(CRI_FILES):
        path = posixpath.join(sandbox_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise Unsuitable(f"{path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Unsuitable(f"{path}: not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise Unsuitable(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            data = b""
            while chunk := os.read(fd, MAX_FILE_BYTES + 1 - len(data)):
                data += chunk
                if len(data) > MAX_FILE_BYTES:
                    raise Unsuitable(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        finally:
            os.close(fd)
        out.append(agent_pb2.VolumeEntry(path=name, mode=stat.S_IFREG | stat.S_IMODE(st.st_mode) & 0o777,
                                         uid=st.st_uid, gid=st.st_gid, data=data, mtime_ns=st.st_mtime_ns))
    return out
