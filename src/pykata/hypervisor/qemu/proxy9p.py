"""virtfs-proxy-helper: serves a 9p share for a jailed QEMU.

A QEMU that runs as an unprivileged uid cannot open the pod's files (owned by root and the images'
users) through its own 9p server. QEMU 7.2's `-fsdev proxy` hands every file operation over a socket
to this helper, which runs as root with only its file capabilities, chrooted into the shared
directory, in mount, network and PID namespaces of its own: the same split as QEMU + virtiofsd for
virtio-fs. Its mount namespace's root holds only /usr and the share (pykata.hypervisor.helperroot): the
helper hands QEMU a descriptor of every directory the guest opens, and `..` from it must not lead out.
pykata makes the socket pair: QEMU inherits one end, the helper the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.fsutil import descendants
from pykata.hypervisor import fileguard, helperroot
from pykata.hypervisor.console import ConsoleDrain
from pykata.hypervisor.jail import namespace_prefix
from pykata.hypervisor.process import ChildProcess, close_fd, describe_exit
from pykata.hypervisor.readiness import log_tail

PROXY_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
# its output kept on the host (proxy9p.log + .1)
HELPER_LOG_MAX_BYTES = 256 << 10
# how long stop() lets a helper whose QEMU has quit end by itself before it is killed
STOP_GRACE = 0.5


def proxy_helper_argv(binary: str, fd: int, shared_dir: Path) -> list[str]:
    # -u/-g: the owner of the helper's socket when it makes one; ours is inherited, so they only
    # have to be valid. -n: stay in the foreground (pykata owns and reaps it).
    return [binary, "-n", "-f", str(fd), "-p", str(shared_dir), "-u", "0", "-g", "0"]


class Proxy9p:
    """One virtfs-proxy-helper for one VM. `qemu_fd` is QEMU's end of the socket after start()."""

    def __init__(self, shared_dir: Path, log_path: Path, *, binary: str = PROXY_HELPER,
                 mount_namespace: bool = True) -> None:
        self.binary = binary
        self.shared_dir = shared_dir
        self.log_path = log_path
        # where the helper's root (a tmpfs of its mount namespace only) is mounted: an empty directory
        self.root_dir = log_path.parent / "proxy9p-root"
        self.mount_namespace = mount_namespace
        self.qemu_fd: int | None = None
        self.child: ChildProcess | None = None
        self._log: ConsoleDrain | None = None

    async def start(self) -> None:
        """Make the socket pair and start the helper.

        Raises:
            HypervisorError: the shared dir or the helper is missing, or the helper exits at once.
        """
        if not self.shared_dir.is_dir():
            raise HypervisorError(f"9p proxy: shared directory {self.shared_dir} does not exist")
        if not Path(self.binary).is_file():
            raise HypervisorError(f"9p proxy: {self.binary} not found (it ships with qemu-system-x86 7.2; "
                                  "or set hypervisor.qemu.jail_user = false)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # root with file capabilities: no network either (it serves an inherited socket), and a
            # PID namespace of its own: a helper taken over through QEMU's requests sees no host
            # process to signal, renice, trace or probe (on top of fileguard's filter). Its mount
            # namespace is made by helperroot's step, not by unshare.
            argv = namespace_prefix(False, no_new_privs=True, network_namespace=True, pid_namespace=True,
                                    ipc_namespace=True)
            enter_root = None
            if self.mount_namespace:
                try:
                    self.root_dir.mkdir(mode=0o700, exist_ok=True)
                except OSError as exc:
                    raise HypervisorError(f"9p proxy: cannot create {self.root_dir}: {exc.strerror}") from None
                enter_root = helperroot.enter_step(self.root_dir, self.shared_dir, self.binary)
            argv += proxy_helper_argv(self.binary, theirs.fileno(), self.shared_dir)
            # its output through a socket drained into a bounded log (as QEMU's and virtiofsd's)
            self._log = ConsoleDrain(self.log_path, max_bytes=HELPER_LOG_MAX_BYTES)
            try:
                # the guest's writes are the helper's: no setuid files, no device nodes
                self.child = await ChildProcess.spawn(argv, name="virtfs-proxy-helper", log_path=self.log_path,
                                                      log_fd=self._log.guest_fd, pass_fds=(theirs.fileno(),),
                                                      preexec=_then_filter(enter_root))
            except OSError as exc:
                self._log.close()
                raise HypervisorError(f"9p proxy: cannot run {self.binary}: {exc.strerror}") from None
            self._log.release_guest_end()
            self._log.start()
            self.qemu_fd = ours.detach()
        finally:
            ours.close()
            theirs.close()

    def check_running(self) -> None:
        """Raise HypervisorError when the helper has exited (one that fails at start, e.g. on a bad
        shared directory, does so within milliseconds: QEMU's start-up is longer, so its owner asks
        once QEMU answers, instead of waiting for the helper before QEMU starts)."""
        if self.child is not None and not self.child.running:
            if self._log is not None:
                self._log.flush()
            raise HypervisorError(f"9p proxy helper {describe_exit(self.child.returncode or 0)} at start: "
                                  f"{log_tail(self.log_path, 800)}")

    def close_qemu_end(self) -> None:
        """Close pykata's copy of QEMU's end (once QEMU inherited it)."""
        close_fd(self.qemu_fd)
        self.qemu_fd = None

    async def stop(self) -> None:
        """Stop the helper (it also ends when QEMU closes its end). Idempotent.

        The child is the PID namespace's outer `unshare`, which blocks SIGTERM: once QEMU is gone the
        helper ends by itself at once; otherwise SIGKILL (it keeps no state: every request's syscalls
        are done when it answers) ends the namespace and the helper with it."""
        self.close_qemu_end()
        if self.child is not None and await self.child.wait(STOP_GRACE) is None:
            # the namespace's init and the helper are not our children: held by pidfds taken
            # before the kill, so stop() returns once they are gone, not only their wrapper
            inside = _pidfds(descendants(self.child.pid))
            try:
                await self.child.kill()
                await _until_exited(inside, STOP_GRACE * 4)
            finally:
                for fd in inside:
                    close_fd(fd)
        if self._log is not None:
            self._log.close()


def _then_filter(first: Callable[[], None] | None) -> Callable[[], None]:
    """`first` (the helper's own root), then fileguard's filter for a server that sets its own
    capabilities (ChildProcess.spawn's serves_guest_files="filter")."""
    def step() -> None:
        if first is not None:
            first()
        fileguard.filter_child()
    return step


def _pidfds(pids: list[int]) -> list[int]:
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile
            fds.append(os.pidfd_open(pid))
    return fds


async def _until_exited(pidfds: list[int], timeout: float) -> None:
    """Wait until every process of `pidfds` has exited (a pidfd polls readable then), at most `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        if len(poller.poll(0)) == len(pidfds):
            return
        await asyncio.sleep(0.01)
