"""What runs beside one QEMU and is owned with it: virtiofsd (virtio-fs), virtfs-proxy-helper (9p for a
jailed QEMU), passt (the user-mode network of an egress NIC), and the log drains (the guest console,
and QEMU's own output, through sockets into bounded logs: the guest can make QEMU print too, e.g. an
error line per bad virtio-serial control message)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from pykata import fsutil
from pykata.config.schema import QemuConfig
from pykata.errors import HypervisorError
from pykata.hypervisor.console import ConsoleDrain
from pykata.hypervisor.devices import NetDevice
from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths
from pykata.hypervisor.qemu.passt import Passt
from pykata.hypervisor.qemu.proxy9p import Proxy9p
from pykata.hypervisor.qemu.virtiofsd import Virtiofsd

# QEMU's own output kept on the host (qemu.log + qemu.log.1).
QEMU_LOG_MAX_BYTES = 256 << 10


class Sidecars:
    """Started before QEMU (start()), their QEMU ends handed over at spawn (spawned()), stopped after
    QEMU (stop(), idempotent, also after a failed start)."""

    def __init__(self, config: QemuConfig, paths: VmPaths) -> None:
        self._q = config
        self._paths = paths
        self.virtiofsd: Virtiofsd | None = None
        self.proxy9p: Proxy9p | None = None
        self.passt: Passt | None = None
        self.console: ConsoleDrain | None = None
        self.qemu_log: ConsoleDrain | None = None
        self.listeners: list[socket.socket] = []

    async def start_virtiofsd(self, spec: LaunchSpec) -> None:
        """virtiofsd for the shared directory, when the VM uses virtio-fs. Raises HypervisorError."""
        if spec.shared_dir is not None and self._q.shared_fs == "virtio-fs":
            self.virtiofsd = Virtiofsd(self._q.virtio_fs_daemon, self._paths.virtiofsd_socket, spec.shared_dir,
                                       self._paths.virtiofsd_log, cache=self._q.virtio_fs_cache,
                                       extra_args=self._q.virtio_fs_extra_args)
            await self.virtiofsd.start()

    async def start_fd_helpers(self, spec: LaunchSpec, fds: list[int], *, user_net_uid: int | None = None,
                               die_with_owner: bool = False) -> LaunchSpec:
        """The 9p proxy (jailed 9p), passt for a user-mode network NIC with user_network = "passt" (as
        `user_net_uid`; None: no stack, the NIC's socket is only held: a template being made) and the
        console drain; returns
        `spec` with their fds, which are appended to `fds` (QEMU inherits them). Raises HypervisorError."""
        jail = spec.jail
        if self._q.user_network == "passt" and any(isinstance(d, NetDevice) and d.user_net for d in spec.devices):
            self.passt = Passt(self._paths.dir / "net0.sock", user_net_uid, die_with_owner=die_with_owner,
                               verbose=self._q.enable_debug)
            self.passt.open()
            await self.passt.start()  # its connection waits in the backlog until QEMU takes it
            assert self.passt.listener_fd is not None
            fds.append(self.passt.listener_fd)
            spec = dataclasses.replace(spec, user_net_fd=self.passt.listener_fd)
        if spec.shared_dir is not None and self._q.shared_fs == "virtio-9p" and jail is not None \
                and jail.unprivileged:
            self.proxy9p = Proxy9p(spec.shared_dir, self._paths.proxy9p_log, mount_namespace=jail.mount_namespace)
            await self.proxy9p.start()
            assert self.proxy9p.qemu_fd is not None
            fds.append(self.proxy9p.qemu_fd)
            spec = dataclasses.replace(spec, proxy_9p_fd=self.proxy9p.qemu_fd)
        # The guest may print forever into a log on host RAM (/run): the console goes through a
        # socket this process drains into a file of bounded size.
        self.console = ConsoleDrain(self._paths.console_log, max_bytes=self._q.console_log_max_kib * 1024)
        fds.append(self.console.guest_fd)
        self.qemu_log = ConsoleDrain(self._paths.qemu_log, max_bytes=QEMU_LOG_MAX_BYTES)
        # QEMU's QMP and agent sockets are bound here (0600) and passed in: a jailed QEMU makes no
        # file on the host.
        self.listeners.append(listen_unix(self._paths.qmp_socket))
        qmp_fd = self.listeners[-1].fileno()
        agent_fd = None
        if spec.agent_channel == "virtio-serial":
            self.listeners.append(listen_unix(self._paths.agent_socket))
            agent_fd = self.listeners[-1].fileno()
        fds += [s.fileno() for s in self.listeners]
        return dataclasses.replace(spec, console_fd=self.console.guest_fd, qmp_fd=qmp_fd, agent_fd=agent_fd)

    def spawned(self, ok: bool) -> None:
        """QEMU was spawned (`ok`) or failed to: close this process's copies of QEMU's ends."""
        for drain in (self.console, self.qemu_log):
            if drain is not None:
                drain.release_guest_end()
                if ok:
                    drain.start()
        if self.proxy9p is not None:
            self.proxy9p.close_qemu_end()
        if self.passt is not None:
            self.passt.close_listener()
        self._close_listeners()

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()  # QEMU holds its own copies
        self.listeners.clear()

    def check_running(self) -> None:
        """Raise HypervisorError when a helper QEMU relies on has exited (see Proxy9p.check_running)."""
        if self.virtiofsd is not None:
            self.virtiofsd.check_running()
        if self.proxy9p is not None:
            self.proxy9p.check_running()
        if self.passt is not None:
            self.passt.check_running()

    def flush(self) -> None:
        """QEMU ended (or failed): get its last output into the logs."""
        for drain in (self.console, self.qemu_log):
            if drain is not None:
                drain.flush()

    async def stop(self) -> None:
        self._close_listeners()
        if self.virtiofsd is not None:
            await self.virtiofsd.stop()
        for drain in (self.console, self.qemu_log):
            if drain is not None:
                drain.close()
        if self.proxy9p is not None:
            await self.proxy9p.stop()
        if self.passt is not None:
            await self.passt.stop()


def listen_unix(path: Path) -> socket.socket:
    """A listening unix socket at `path` (fsutil.listen_unix: a stale one replaced, mode 0600), to pass
    to QEMU.

    Raises:
        HypervisorError: it cannot be made.
    """
    try:
        return fsutil.listen_unix(path, backlog=8)
    except OSError as exc:
        raise HypervisorError(f"cannot listen on {path}: {exc.strerror}") from None
