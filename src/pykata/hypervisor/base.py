"""The hypervisor interface the sandbox layer drives. QEMU is the one implementation today."""

from __future__ import annotations

import abc
import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pykata.config.schema import SharedFs
from pykata.hypervisor.devices import Device
from pykata.hypervisor.errors import NotSupportedError


@dataclass(frozen=True)
class VmExit:
    """How a VM's process ended. `code` is the exit status (negative: killed by that signal); `reason`
    says why in words (guest shutdown, guest panic, killed by SIGKILL, stopped by pykata)."""

    code: int
    reason: str
    # True when pykata's stop() ended it; False when it died on its own or was killed from outside.
    requested: bool


@dataclass(frozen=True)
class AgentEndpoint:
    """Where the host reaches the guest agent: a unix socket backed by a virtio-serial port, or vsock."""

    kind: Literal["virtio-serial", "vsock"]
    socket: Path | None = None
    vsock_cid: int | None = None
    vsock_port: int = 1024


@dataclass(frozen=True)
class RestoreSource:
    """A saved VM to start from instead of booting (a template, made by pykata.factory): guest RAM in
    `memory` (mapped privately, copy-on-write), device state in `state`, and the kernel, initrd and
    image the saved guest booted, which the new VM must name the same way. `memory` None: `state` is a
    snapshot's stream, which carries the RAM too (see Hypervisor.snapshot)."""

    memory: Path | None
    state: Path
    kernel: Path
    initrd: Path | None = None
    image: Path | None = None
    # (slot, image file): what the saved VM's image slots held, filled again before the guest runs
    root_slots: tuple[tuple[int, Path], ...] = ()


# Returns once the guest is ready; wait_ready() cancels it on timeout or when the VM exits first.
ReadinessProbe = Callable[["Hypervisor"], Awaitable[None]]


class Hypervisor(abc.ABC):
    """One VM. Lifecycle: prepare() -> start() -> wait_ready() -> ... -> stop().

    stop() may be called any number of times, concurrently, in any state; it always returns once
    everything the VM owned is gone. `exited` resolves when the VM process ends for any reason.
    """

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Resolve assets and the accelerator, create the VM directory, build the command line.

        Raises:
            HypervisorError: a kernel/initrd is missing, the accelerator cannot be used, ...
        """

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the VM (and its helper daemons) and connect its control channel.

        Raises:
            HypervisorError: the VMM failed to start; everything started so far is stopped again.
        """

    @abc.abstractmethod
    async def wait_ready(self, timeout: float | None = None, probe: ReadinessProbe | None = None) -> None:
        """Return once the guest is ready (per `probe`, else the one given at construction).

        Raises:
            HypervisorError: the VM exited first or `timeout` passed; the message has the console tail.
        """

    def take_agent_connection(self) -> socket.socket | None:
        """A connection to the agent's port that the VM opened itself (a template clone's, made before
        its state was loaded), handed over once to the readiness probe; None when there is none. The
        probe takes it before its first await, or wait_ready() closes it then (the port takes one host
        at a time: a probe that connects anew waits for it to close)."""
        return None

    @abc.abstractmethod
    async def stop(self) -> VmExit | None:
        """Stop the VM and remove everything it owned. Idempotent; bounded in time.

        Returns how the VM ended (None if it never started).
        """

    @abc.abstractmethod
    async def add_device(self, device: Device) -> None:
        """Attach a device: on the command line before start(), hot-plugged after.

        Raises:
            HypervisorError: the device is invalid, its id is taken, or hotplug is not possible.
        """

    @abc.abstractmethod
    async def remove_device(self, device_id: str) -> None:
        """Detach a device added with add_device().

        Raises:
            HypervisorError: no such device, or the guest did not release it in time.
        """

    @abc.abstractmethod
    async def resize_memory(self, memory_mib: int) -> int:
        """Grow guest memory to `memory_mib`; return the memory now plugged (MiB).

        Raises:
            HypervisorError: not possible for this machine, or beyond the maximum.
        """

    @abc.abstractmethod
    async def resize_vcpus(self, vcpus: int) -> int:
        """Set the number of vCPUs the VM is sized to; return it. On q35 vCPUs are hot-plugged; on
        microvm all are present from the start and the guest onlines as many (the owner asks the
        agent: OnlineCPUMem), so this only checks and records the size.

        Raises:
            HypervisorError: not possible for this machine, or beyond the maximum.
        """

    @property
    @abc.abstractmethod
    def memory_mib(self) -> int:
        """The memory the VM is sized to now (MiB)."""

    @property
    @abc.abstractmethod
    def memory_ceiling_mib(self) -> int:
        """The most memory resize_memory() can give this VM (MiB)."""

    @property
    @abc.abstractmethod
    def vcpus(self) -> int:
        """The vCPUs the VM is sized to now."""

    @property
    @abc.abstractmethod
    def max_vcpus(self) -> int:
        """The most vCPUs resize_vcpus() can give this VM."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs (the VM uses no CPU; memory and devices are kept). Idempotent.

        Raises:
            HypervisorError: the VM is not running.
        """

    @abc.abstractmethod
    async def resume(self) -> None:
        """Run the vCPUs of a paused VM again. Idempotent.

        Raises:
            HypervisorError: the VM is not running.
        """

    @abc.abstractmethod
    async def save(self, path: Path) -> None:
        """Save the VM state to `path` (for templating / checkpoints).

        Raises:
            HypervisorError: not supported yet (NotSupportedError) or failed.
        """

    async def snapshot(self, fd: int) -> None:
        """Pause the guest and write its whole state, RAM included, to the open file `fd`; the VM
        stays paused (resume() runs it again). A VM started with RestoreSource(memory=None, state=<that
        file>) continues from there.

        Raises:
            NotSupportedError: this hypervisor or VM cannot be snapshotted.
            HypervisorError: the save failed.
        """
        raise NotSupportedError(f"{type(self).__name__} cannot snapshot a VM")

    @abc.abstractmethod
    async def restore(self, path: Path) -> None:
        """Restore state saved with save().

        Raises:
            HypervisorError: not supported yet (NotSupportedError) or failed.
        """

    @property
    def root_slots(self) -> int:
        """How many read-only image slots the VM has (disks whose content is given at run time:
        container images as ext4, pykata.resources.rootimage); 0 when it has none."""
        return 0

    async def fill_root_slot(self, slot: int, image: Path) -> None:
        """Give image slot `slot` the content of `image` (a file exactly the slot's size), read-only.

        Raises:
            HypervisorError: no such slot, unreadable file, or the VMM refused (NotSupportedError here).
        """
        raise NotSupportedError(f"this hypervisor has no image slots (slot {slot}, {image})")

    async def empty_root_slot(self, slot: int) -> None:
        """Give image slot `slot` its empty content again. Idempotent.

        Raises:
            HypervisorError: no such slot or the VMM refused (NotSupportedError here).
        """
        raise NotSupportedError(f"this hypervisor has no image slots (slot {slot})")

    @property
    def data_disk_size(self) -> int:
        """Bytes of the VM's data disk (a writable disk for bulk file transfers whose content the host
        gives for one transfer at a time); 0 when it has none."""
        return 0

    async def attach_data_disk(self, fd: int) -> None:
        """Put the file open read-write at `fd` (exactly `data_disk_size` bytes) behind the data disk.

        Raises:
            HypervisorError: no data disk, one attached already, or the VMM refused (NotSupportedError here).
        """
        raise NotSupportedError("this hypervisor has no data disk")

    async def detach_data_disk(self) -> None:
        """Give the data disk its empty content again; the VMM no longer holds the file. Idempotent.

        Raises:
            HypervisorError: the VMM refused.
        """
        return None

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The VMM process id while it runs, else None."""

    @property
    @abc.abstractmethod
    def exited(self) -> asyncio.Future[VmExit]:
        """Resolves with a VmExit when the VM process ends, whoever ended it."""

    @property
    @abc.abstractmethod
    def agent_endpoint(self) -> AgentEndpoint:
        """How to reach the agent (after prepare()).

        Raises:
            HypervisorError: not prepared yet.
        """

    @property
    @abc.abstractmethod
    def console_log(self) -> Path:
        """The file the guest console is written to."""

    @property
    @abc.abstractmethod
    def shared_fs(self) -> SharedFs:
        """How the shared directory reaches the guest (what the agent must mount)."""

    @property
    @abc.abstractmethod
    def restore_source(self) -> RestoreSource | None:
        """The saved VM this one was started from, else None (it booted). A restored guest wakes up
        with the saved guest's wall clock, which its owner must set."""

    @property
    def jail_uid(self) -> int | None:
        """The host uid the VMM runs as when it has one of its own (known from `prepare()` on), else
        None."""
        return None

    @property
    def user_net_uid(self) -> int | None:
        """The host uid of the process that opens the host sockets of the VM's user-mode network NIC
        (known from `prepare()` on; None without one, or without a uid of its own). Host rules that
        must apply to this VM's traffic alone (an egress policy) match it."""
        return None

    async def forward_port(self, device_id: str, host_address: str, host_port: int, guest_port: int,
                           protocol: str = "tcp") -> None:
        """Forward `protocol` ("tcp" or "udp") `host_address:host_port` on the host to `guest_port` of the
        guest on NIC `device_id` (a user-mode network NIC).

        Raises:
            NotSupportedError: this hypervisor or NIC cannot.
            HypervisorError: the host port is taken, or the VMM refused.
        """
        raise NotSupportedError(f"forward_port is not supported by {type(self).__name__}")
