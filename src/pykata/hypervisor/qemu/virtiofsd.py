"""virtiofsd: the vhost-user daemon that serves a host directory to the guest over virtio-fs.

pykata binds the listening socket itself and hands it over with `--fd`, so QEMU can connect the moment
the daemon runs (no polling for a socket file), and the socket's path and mode are pykata's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.fsutil import listen_unix
from pykata.hypervisor.console import ConsoleDrain
from pykata.hypervisor.jail import namespace_prefix
from pykata.hypervisor.process import ChildProcess, describe_exit
from pykata.hypervisor.readiness import log_tail

# Capabilities virtiofsd gives up (it keeps chown, dac_override, fowner, fsetid, setgid, setuid, mknod
# and setfcap by default): pykata.hypervisor.fileguard takes them out of its bounding set, and
# virtiofsd fails to start if it then still asks for them.
DROPPED_CAPS = ("mknod", "fsetid", "setfcap")
# its output kept on the host (virtiofsd.log + .1)
HELPER_LOG_MAX_BYTES = 256 << 10
# what a failed start's error quotes of that log
LOG_TAIL_CHARS = 2000


def virtiofsd_argv(binary: str, fd: int, shared_dir: Path, cache: str, extra: Sequence[str] = ()) -> list[str]:
    """Command line of QEMU 7.2's C virtiofsd serving `shared_dir` on the inherited socket `fd`."""
    return [
        binary, f"--fd={fd}", "-f",
        "-o", f"source={shared_dir}", "-o", f"cache={cache}",
        "-o", "modcaps=" + ":".join(f"-{c}" for c in DROPPED_CAPS),
        # user.* extended attributes as a bind mount has them; off by default in this virtiofsd
        # (POSIX ACLs stay off: no posix_acl). It keeps no CAP_SYS_ADMIN, so the host kernel refuses
        # trusted.* and security.* other than capability, and the dropped CAP_SETFCAP refuses that.
        "-o", "xattr",
        *extra,
    ]


class Virtiofsd:
    """One virtiofsd for one VM."""

    def __init__(self, binary: str, socket_path: Path, shared_dir: Path, log_path: Path, *,
                 cache: str = "auto", extra_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.log_path = log_path
        self.cache = cache
        self.extra_args = tuple(extra_args)
        self.child: ChildProcess | None = None
        self._log: ConsoleDrain | None = None

    async def start(self) -> None:
        """Bind the socket and start the daemon.

        Raises:
            HypervisorError: the shared dir is missing, the binary cannot run, or it exits at once.
        """
        if not self.shared_dir.is_dir():
            raise HypervisorError(f"virtiofsd: shared directory {self.shared_dir} does not exist")
        try:
            sock = listen_unix(self.socket_path, backlog=1)
        except OSError as exc:
            raise HypervisorError(f"virtiofsd: cannot listen on {self.socket_path}: {exc.strerror}") from None
        try:
            fd = sock.fileno()
            # its own sandbox has mount, PID and network namespaces; an IPC one of its own too (uid 0
            # may remove the host's root-owned SysV IPC objects)
            argv = namespace_prefix(False, ipc_namespace=True) + \
                virtiofsd_argv(self.binary, fd, self.shared_dir, self.cache, self.extra_args)
            # a hostile guest kernel can make virtiofsd print (an error line per malformed request):
            # its output goes through a socket drained into a bounded log, as QEMU's does
            self._log = ConsoleDrain(self.log_path, max_bytes=HELPER_LOG_MAX_BYTES)
            try:
                self.child = await ChildProcess.spawn(argv, name="virtiofsd", log_path=self.log_path,
                                                      log_fd=self._log.guest_fd, pass_fds=(fd,),
                                                      serves_guest_files=True)
            except OSError as exc:
                self._log.close()
                raise HypervisorError(f"virtiofsd: cannot run {self.binary}: {exc.strerror}") from None
            self._log.release_guest_end()
            self._log.start()
        finally:
            # The daemon holds its own copy of the listening socket now.
            sock.close()
        await self.child.wait(0.02)
        self.check_running()

    def check_running(self) -> None:
        """Raise HypervisorError when the daemon has exited (one that fails on its options does so
        within milliseconds; its owner asks again once QEMU answers, as for the 9p helper). The log's
        tail is quoted as the guest console's (readiness.log_tail: bounded, escaped): the daemon prints
        what a hostile guest kernel or a compromised QEMU makes it print, and its errors name host paths
        whose names the guest chose (files of the shared directory)."""
        if self.child is not None and not self.child.running:
            if self._log is not None:
                self._log.flush()
            raise HypervisorError(f"virtiofsd {describe_exit(self.child.returncode or 0)} at start: "
                                  f"{log_tail(self.log_path, LOG_TAIL_CHARS)}")

    async def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after 1 s) and remove its socket. Idempotent."""
        if self.child is not None:
            await self.child.terminate(1.0)
        if self._log is not None:
            self._log.close()
        self.socket_path.unlink(missing_ok=True)
