"""The VMM's jail: what confines QEMU (and the file servers next to it) on the host.

Layers, each switched by a `hypervisor.qemu.jail_*` key and on by default:
  * seccomp: QEMU's own filter (`-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny`), under
    pykata's (pykata.hypervisor.fileguard, set before exec): no io_uring, no setuid/setgid modes;
  * user: a uid/gid of its own per VM, taken from a configured range and held (flock) while the VM
    runs, so two VMs never share one; QEMU opens its files as root and then drops to it (`-runas`),
    which leaves it no capabilities (and libseccomp's filter sets PR_SET_NO_NEW_PRIVS);
  * chroot: an empty, root-owned directory (`-chroot`);
  * mount namespace: QEMU starts under `unshare --mount --propagation slave`, so mounts it could make or
    see are its own, while the pod's shared directory still receives the host's later mounts.
The tap, the template's saved state and the 9p proxy socket are opened by pykata and passed in.

virtiofsd confines itself (seccomp, mount/pid/net namespaces with pivot_root into the shared dir, a
reduced capability set); virtfs-proxy-helper (9p for a jailed QEMU) chroots into the shared dir and
keeps only its file capabilities (an empty bounding set); pykata adds a mount namespace and NO_NEW_PRIVS
to both, and to the helper (uid 0) an empty network namespace, a PID namespace of its own and a seccomp
filter against reaching other processes (pykata.hypervisor.fileguard).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from pykata.config.schema import QemuConfig
from pykata.errors import HypervisorError
from pykata.fsutil import descendants

UNSHARE = "unshare"
SETPRIV = "setpriv"
# Tries at random uids before scanning the range in order.
_RANDOM_TRIES = 16


@dataclass(frozen=True)
class JailSpec:
    """How one QEMU is confined (resolved: a uid, not a range)."""

    seccomp: bool
    uid: int | None
    gid: int | None
    chroot: Path | None
    mount_namespace: bool

    @property
    def unprivileged(self) -> bool:
        return self.uid is not None


class UidLease:
    """One uid from the configured range, held by an flock on <runtime>/jail/uids/<uid> for as long as
    this object is open (a crashed holder frees it: the kernel drops the lock)."""

    def __init__(self, uid: int, fd: int, path: Path) -> None:
        self.uid = uid
        self._fd: int | None = fd
        self._path = path

    @classmethod
    def acquire(cls, q: QemuConfig, runtime_dir: Path) -> UidLease:
        """Take a free uid from [jail_uid_base, jail_uid_base + jail_uid_count).

        Raises:
            HypervisorError: every uid of the range is in use, or the lease directory cannot be made.
        """
        directory = runtime_dir / "jail" / "uids"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise HypervisorError(f"jail: cannot create {directory}: {exc.strerror}") from None
        count = q.jail_uid_count
        randoms = [q.jail_uid_base + secrets.randbelow(count) for _ in range(min(_RANDOM_TRIES, count))]
        for uid in itertools.chain(randoms, range(q.jail_uid_base, q.jail_uid_base + count)):
            lease = cls._try(uid, directory / str(uid))
            if lease is not None:
                return lease
        raise HypervisorError(f"jail: all {count} uids from hypervisor.qemu.jail_uid_base = {q.jail_uid_base} "
                              "are in use (raise jail_uid_count)")

    @classmethod
    def _try(cls, uid: int, path: Path) -> UidLease | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(uid, fd, path)

    def release(self) -> None:
        """Give the uid back. Idempotent."""
        if self._fd is None:
            return
        # Unlink while still holding the lock: nobody can hold a lock on a file name we then remove.
        with contextlib.suppress(OSError):
            self._path.unlink()
        os.close(self._fd)
        self._fd = None


def make_chroot(path: Path) -> Path:
    """An empty directory for QEMU's -chroot: root-owned, not writable by the jailed uid.

    Raises:
        HypervisorError: it cannot be created.
    """
    try:
        path.mkdir(mode=0o555)
    except OSError as exc:
        raise HypervisorError(f"jail: cannot create {path}: {exc.strerror}") from None
    return path


def jail_spec(q: QemuConfig, *, uid: int | None, chroot: Path | None) -> JailSpec:
    return JailSpec(seccomp=q.jail_seccomp, uid=uid if q.jail_user else None,
                    gid=uid if q.jail_user else None, chroot=chroot if q.jail_chroot else None,
                    mount_namespace=q.jail_mount_namespace)


def namespace_prefix(mount_namespace: bool, no_new_privs: bool = False, *,
                     network_namespace: bool = False, pid_namespace: bool = False,
                     ipc_namespace: bool = False) -> list[str]:
    """The argv prefix that starts a program in a private (slave) mount namespace, an empty network
    namespace (only a loopback that is down: no socket reaches the host's network, its localhost
    services or a cloud's metadata address), a PID namespace of its own, an IPC namespace of its own
    (the host's SysV shared memory, semaphores and message queues and its POSIX message queues are out
    of reach, and what the program makes there ends with it instead of outliving it on the host)
    and/or with NO_NEW_PRIVS.

    Without `pid_namespace`, `unshare` execs the program: its pid is the program's. With it, the
    program is the child of the namespace's init (as under lifeline_prefix(), so a program that
    changes its credentials, which clears a parent-death signal, still dies with the namespace):
    the spawned pid is the outer `unshare`, and SIGKILL to it ends the init and with it, by the
    kernel, everything in the namespace. SIGTERM does not pass (unshare blocks it while it waits).

    Raises:
        HypervisorError: util-linux's unshare/setpriv is not installed.
    """
    prefix: list[str] = []
    if mount_namespace or network_namespace or pid_namespace or ipc_namespace:
        prefix += [_tool(UNSHARE)]
        if pid_namespace:
            prefix += ["--pid", "--fork", "--kill-child=SIGKILL"]
        if mount_namespace:
            prefix += ["--mount", "--propagation", "slave"]
        if network_namespace:
            prefix += ["--net"]
        if ipc_namespace:
            prefix += ["--ipc"]
        prefix += ["--"]
        if pid_namespace:
            prefix += [_tool(UNSHARE), "--fork", "--"]
    if no_new_privs:
        prefix += [_tool(SETPRIV), "--no-new-privs", "--"]
    return prefix


def lifeline_prefix() -> list[str]:
    """The argv prefix that ties a program's life to its parent's, whatever the program does to its
    own credentials (QEMU's -runas clears a parent-death signal set on QEMU itself).

    The outer `unshare` (started with a parent-death SIGKILL: ChildProcess.spawn's die_with_parent)
    makes a PID namespace whose init, a shell, is killed when the outer one dies; the kernel then kills
    everything in that namespace, the program included. The program is the shell's child, so its exit
    status comes back through both, a death by signal N as 128 + N (`lifeline_exit`). The init was an
    `unshare --fork`, which passes a signal on by raising it on itself, and a namespace's init cannot
    kill itself: it exited 1 ("child exit failed"), so a QEMU killed by SIGKILL read as "exited with
    code 1". Raises HypervisorError without util-linux.
    """
    return [_tool(UNSHARE), "--pid", "--fork", "--kill-child=SIGKILL", "--", _tool("sh"), "-c", '"$@"; exit $?',
            "lifeline"]


def lifeline_exit(code: int) -> int:
    """A lifeline_prefix() wrapper's exit status as the program's: 128 + N (a shell's way of saying
    killed by signal N) is -N, as subprocess says it."""
    return -(code - 128) if 128 < code <= 128 + 64 else code


def lifeline_target(wrapper_pid: int, binary: str) -> int | None:
    """The pid of `binary` started under lifeline_prefix() by the process `wrapper_pid` (the outer
    `unshare`): what reads the VMM's memory and CPU time must read it, not the wrapper's. None when it
    is not (or no longer) running. Reads /proc/<pid>/task/*/children, a few files deep."""
    for child in descendants(wrapper_pid):  # parents first: the wrappers, then the program
        try:
            argv0 = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0 == os.fsencode(binary):
            return child
    return None


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None:
        raise HypervisorError(f"jail: {name} (util-linux) not found")
    return found


@dataclass(frozen=True)
class ProcessConfinement:
    """What confines a running process, read from /proc (tests, `pykata check`)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    cap_effective: int
    cap_permitted: int
    cap_bounding: int
    no_new_privs: bool
    seccomp_mode: int
    own_mount_namespace: bool
    root: str
    own_network_namespace: bool = False
    # descriptors of io_uring instances it holds (QEMU makes them at start unless refused)
    io_urings: int = 0

    @property
    def seccomp(self) -> bool:
        return self.seccomp_mode == 2

    def layers(self) -> dict[str, bool]:
        return {"seccomp": self.seccomp, "unprivileged": self.uid != 0 and self.gid != 0,
                "no-capabilities": self.cap_effective == 0 and self.cap_permitted == 0,
                "no-new-privs": self.no_new_privs, "mount-namespace": self.own_mount_namespace,
                "chroot": self.root != "/", "no-io-uring": self.io_urings == 0}


def inspect_process(pid: int) -> ProcessConfinement:
    """Read the confinement of `pid` from /proc.

    Raises:
        HypervisorError: the process is gone or /proc cannot be read.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        mnt = os.readlink(f"/proc/{pid}/ns/mnt")
        net = os.readlink(f"/proc/{pid}/ns/net")
        root = os.readlink(f"/proc/{pid}/root")
    except OSError as exc:
        raise HypervisorError(f"jail: cannot inspect pid {pid}: {exc.strerror}") from None
    fields: dict[str, str] = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcessConfinement(
        pid=pid, uid=int(fields["Uid"].split()[1]), gid=int(fields["Gid"].split()[1]),
        groups=tuple(int(g) for g in fields.get("Groups", "").split()),
        cap_effective=int(fields["CapEff"], 16), cap_permitted=int(fields["CapPrm"], 16),
        cap_bounding=int(fields["CapBnd"], 16), no_new_privs=fields.get("NoNewPrivs") == "1",
        seccomp_mode=int(fields.get("Seccomp", "0")), own_mount_namespace=mnt != os.readlink("/proc/self/ns/mnt"),
        root=root, own_network_namespace=net != os.readlink("/proc/self/ns/net"), io_urings=_io_urings(pid))


def _io_urings(pid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[io_uring]"
    return count


def configured_layers(q: QemuConfig) -> dict[str, bool]:
    """The jail layers `q` asks for (what `pykata check` reports)."""
    return {"seccomp": q.jail_seccomp, "unprivileged-uid": q.jail_user, "no-capabilities": q.jail_user,
            "no-new-privs": q.jail_seccomp, "chroot": q.jail_chroot, "mount-namespace": q.jail_mount_namespace,
            "no-io-uring": q.jail_seccomp}
