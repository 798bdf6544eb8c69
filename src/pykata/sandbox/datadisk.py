"""Bulk file transfers through the VM's data disk (hypervisor: attach_data_disk; agent: diskfile).

For one transfer the host makes an unnamed file (O_TMPFILE in the sandbox's directory, 0600, exactly
the disk's size) and puts it behind the disk; each piece of the file moves in one agent call that
copies between the disk's first bytes and the container's file, as a process of the container. The
host never mounts or parses what the guest writes: it reads the bytes the guest's answer says it
copied, after checking that against what it asked. The file has no name, so nothing of it is left
behind on any path out (a crash included); the disk is emptied again when the transfer ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pykata.agentapi.client import Agent
from pykata.agentapi.replies import DiskFile as DiskFile  # re-exported: what a copy found
from pykata.hypervisor.base import Hypervisor
from pykata.hypervisor.devices import DATA_DISK_SERIAL
from pykata.protocols.agent import agent_pb2

COPY_TIMEOUT_PER_MIB = 2.0  # seconds per MiB of a piece, on top of a base: a loaded TCG guest is slow
COPY_TIMEOUT_BASE = 60.0


def copy_timeout(length: int) -> float:
    return COPY_TIMEOUT_BASE + COPY_TIMEOUT_PER_MIB * (length >> 20)


@dataclass
class DiskSession:
    """The data disk for one transfer: `fd` is the host file behind it (`size` bytes)."""

    agent: Agent
    container_id: str
    process: agent_pb2.Process
    fd: int
    size: int

    async def write_file(self, path: str, data: bytes | memoryview, *, offset: int, create: bool,
                         mode: int | None = None, owner: tuple[int, int] | None = None) -> DiskFile:
        """`data` (at most `size` bytes) into the container's `path` at `offset`. Raises AgentError."""
        if len(data) > self.size:
            raise ValueError(f"{len(data)} bytes do not fit the data disk ({self.size})")
        await asyncio.to_thread(_pwrite_all, self.fd, data)
        return await self.agent.write_file_from_disk(
            self.container_id, self.process, path, DATA_DISK_SERIAL, offset=offset, length=len(data),
            create=create, mode=mode, owner=owner, timeout=copy_timeout(len(data)))

    async def read_file(self, path: str, *, offset: int, length: int) -> tuple[DiskFile, bytes]:
        """At most `length` (<= `size`) bytes of the container's `path` from `offset`, and what the copy
        found. Raises AgentError (AgentReplyError: the answer claims more than was asked)."""
        if length > self.size:
            raise ValueError(f"{length} bytes do not fit the data disk ({self.size})")
        info = await self.agent.read_file_to_disk(self.container_id, self.process, path, DATA_DISK_SERIAL,
                                                  offset=offset, length=length, timeout=copy_timeout(length))
        return info, await asyncio.to_thread(os.pread, self.fd, info.length, 0)


def _pwrite_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)


@contextlib.asynccontextmanager
async def session(vm: Hypervisor, agent: Agent, directory: Path, container_id: str,
                  process: agent_pb2.Process) -> AsyncIterator[DiskSession]:
    """The data disk with a fresh host file behind it, emptied again on the way out (a cancelled
    transfer included). Raises HypervisorError, OSError."""
    size = vm.data_disk_size
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        await vm.attach_data_disk(fd)
        try:
            yield DiskSession(agent, container_id, process, fd, size)
        finally:
            # shielded: a second Ctrl-C must not leave the file behind the disk
            await asyncio.shield(vm.detach_data_disk())
    finally:
        os.close(fd)
