"""passt: the user-mode network stack of an egress NIC in a process of its own beside QEMU
(hypervisor.qemu.user_network = "passt").

QEMU's `-netdev user` runs libslirp inside QEMU, so QEMU has to keep the host's network namespace: a
QEMU taken over by its guest (a device bug) can open any socket the host can. With passt, QEMU runs in
an empty network namespace and its NIC is a `-netdev stream` on a unix socket; passt (Debian 12's
0.0~git20230309) turns the guest's frames into host sockets. Both sides use the same framing: each
Ethernet frame preceded by its length as a 32-bit big-endian integer (QEMU 7.2 made `stream` for
passt; passt's qemu mode reads and writes exactly that).

The wiring: pykata binds a listening unix socket in the VM's directory and QEMU inherits it
(`server=on,addr.type=fd`); pykata connects to it and hands the connected end to passt (`--fd`), so
QEMU makes no file on the host and needs no right to reach passt. (QEMU takes the next connection in
the backlog when one ends.)

passt runs as a uid of its own (--runas, leased like QEMU's): the host's filter rules of the sandbox
match that uid (pykata.network.egress). It confines itself (user, mount, IPC, UTS namespaces,
seccomp, no capabilities), and pykata adds QEMU's Landlock scope (no abstract unix socket or signal
out of it: it keeps the host's network namespace). It ends when QEMU closes the socket (--fd implies
--one-off); under a lifeline when its owner must take it along.

The guest's network is libslirp's: 10.0.2.0/24, the guest at .15, the gateway at .2, IPv4 only, no
DHCP (the agent configures the address), no DNS address served or forwarded. As under libslirp the
gateway stands for the host's loopback, which the host's rules for passt's uid reject.

Measured limits of this passt: no forwarded port reaches the guest (passt ignores the guest's SYN-ACK
to a forwarded connection, with or without port remapping), and a server's FIN is lost when the
guest's FIN came before the server's data was relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.fsutil import listen_unix
from pykata.hypervisor import scope
from pykata.hypervisor.jail import lifeline_prefix
from pykata.hypervisor.process import ChildProcess, describe_exit
from pykata.hypervisor.readiness import log_tail

PASST = "passt"
GUEST_NETWORK = "10.0.2.0/24"
GUEST_ADDRESS = "10.0.2.15"
GUEST_GATEWAY = "10.0.2.2"
# its output kept on the host (passt.log + .1)
LOG_MAX_BYTES = 64 << 10
STOP_GRACE = 1.0


def passt_argv(binary: str, fd: int, uid: int, *, verbose: bool = False) -> list[str]:
    """passt's command line for the guest network above, on the connected socket `fd`. `verbose`
    (hypervisor.qemu.enable_debug): its informational messages too, its default level, instead of
    --quiet. Never --debug (nor --trace, which implies it): Debian 12's passt (0.0~git20230309) dies
    of SIGSEGV at the guest's first TCP connection with it, in its own debug message of the
    connection's flags (strlen of a bad string pointer under vfprintf, "TCP: index %li: %s"); plain
    passt does, without pykata's Landlock scope or lifeline (tests/hypervisor/qemu/test_passt.py)."""
    return [binary, "--foreground", *([] if verbose else ["--quiet"]), "--runas", f"{uid}:{uid}", "--fd", str(fd),
            "--ipv4-only", "--address", GUEST_ADDRESS, "--netmask", GUEST_NETWORK.rsplit("/", 1)[1],
            "--gateway", GUEST_GATEWAY, "--dns", "none", "--search", "none",
            "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
            "--tcp-ports", "none", "--udp-ports", "none"]


class Passt:
    """The user network behind one NIC. `listener_fd` (QEMU's listening socket) after open(); the
    stack runs after start(), as `uid`. With `uid` None (a template being made: nothing may leave it)
    no passt runs: the socket is connected and held, so the NIC is saved with its link up. `verbose`:
    passt_argv's."""

    def __init__(self, socket_path: Path, uid: int | None, *, binary: str = PASST,
                 die_with_owner: bool = False, verbose: bool = False) -> None:
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        self.uid = uid
        self.binary = binary
        self.die_with_owner = die_with_owner
        self.verbose = verbose
        self.child: ChildProcess | None = None
        self._listener: socket.socket | None = None
        self._held: socket.socket | None = None
        self._lock = asyncio.Lock()

    @property
    def listener_fd(self) -> int | None:
        return self._listener.fileno() if self._listener is not None else None

    def open(self) -> None:
        """Bind QEMU's listening socket (0600). Raises HypervisorError."""
        try:
            self._listener = listen_unix(self.socket_path, backlog=2)
        except OSError as exc:
            raise HypervisorError(f"user network: cannot listen on {self.socket_path}: {exc.strerror}") from None

    def close_listener(self) -> None:
        """pykata's copy of QEMU's listening socket (QEMU inherited it; the path stays for start())."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def start(self) -> None:
        """Connect and start passt (or hold the connection). Raises HypervisorError."""
        async with self._lock:
            if self.uid is None:
                self._held = self._connect()
                return
            self.child = await self._spawn()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))  # lands in the listener's backlog: QEMU accepts it when free
        except OSError as exc:
            sock.close()
            raise HypervisorError(f"user network: cannot connect to {self.socket_path}: {exc.strerror}") from None
        return sock

    async def _spawn(self) -> ChildProcess:
        assert self.uid is not None
        binary = shutil.which(self.binary)
        if binary is None:
            raise HypervisorError(f"user network: {self.binary} is not installed (Debian's passt package; "
                                  "needed by network='egress')")
        conn = self._connect()
        try:
            # its own log, bounded by passt (what it prints before that goes to <name>.out)
            argv = [*passt_argv(binary, conn.fileno(), self.uid, verbose=self.verbose),
                    "--log-file", str(self.log_path), "--log-size", str(LOG_MAX_BYTES)]
            argv = (lifeline_prefix() if self.die_with_owner else []) + argv
            try:
                # in the host's network namespace, as QEMU on libslirp: the host's abstract unix sockets
                # and signals stay out of reach of a passt the guest took over (pykata.hypervisor.scope)
                child = await ChildProcess.spawn(argv, name="passt", log_path=self.log_path.with_suffix(".out"),
                                                 pass_fds=(conn.fileno(),), die_with_parent=self.die_with_owner,
                                                 preexec=scope.confine if scope.supported() else None)
            except OSError as exc:
                raise HypervisorError(f"user network: cannot run {binary}: {exc.strerror}") from None
        finally:
            conn.close()  # passt holds it
        return child  # one that fails on its options has exited once QEMU answers (check_running)

    def check_running(self) -> None:
        """Raise HypervisorError when passt has exited."""
        if self.child is not None and not self.child.running:
            raise HypervisorError(f"user network: passt {describe_exit(self.child.returncode or 0)}: "
                                  f"{log_tail(self.log_path, 600)} {log_tail(self.log_path.with_suffix('.out'), 600)}")

    async def stop(self) -> None:
        """Stop passt (it also ends when QEMU closes the socket). Idempotent."""
        async with self._lock:
            self.close_listener()
            if self._held is not None:
                self._held.close()
                self._held = None
            if self.child is not None:
                await _stop(self.child)
            with contextlib.suppress(OSError):
                self.socket_path.unlink()


async def _stop(child: ChildProcess) -> None:
    """SIGTERM (passt ends at once), SIGKILL after STOP_GRACE. A lifeline's outer unshare blocks
    SIGTERM; its SIGKILL takes the namespace along."""
    if child.running:
        await child.terminate(STOP_GRACE)
