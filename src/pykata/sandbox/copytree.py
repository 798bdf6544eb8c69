"""Copy a host directory tree into the guest over the agent's CopyFile (no shared file system).

A sandbox made for snapshots never mounts the shared directory in the guest (QEMU refuses to migrate
a VM with a 9p share mounted), so its container roots are copied in: directories, regular files
(in chunks) and symlinks, with their modes (permission bits) and owners. The copy lives in guest
RAM (/run is a tmpfs there); the agent refuses a file that does not fit.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from pykata.agentapi import Agent
from pykata.errors import SandboxError

CHUNK = 1 << 20  # the agent's MAX_COPY_CHUNK
PARALLEL = 16  # CopyFile calls in flight (the agent serves each in a thread)
MAX_ENTRIES = 100_000


async def copy_tree(agent: Agent, source: Path, guest_path: str) -> int:
    """Copy the tree at `source` (a trusted host directory: an image's root) to `guest_path`; return
    the bytes copied. Devices, sockets and FIFOs are skipped (an image has none that work in a VM).

    Raises:
        SandboxError: the tree has more than MAX_ENTRIES entries.
        AgentError: the agent refused a part (no room, bad path).
    """
    entries: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            entries.append((os.path.relpath(full, source), os.lstat(full)))
        if len(entries) > MAX_ENTRIES:
            raise SandboxError("", f"{source}: more than {MAX_ENTRIES} files to copy into the guest")
    root = os.stat(source)
    await agent.copy_file(guest_path, b"", file_mode=stat.S_IFDIR | stat.S_IMODE(root.st_mode) & 0o777,
                          uid=root.st_uid, gid=root.st_gid)
    gate = asyncio.Semaphore(PARALLEL)
    total = 0

    async def one(rel: str, st: os.stat_result) -> None:
        nonlocal total
        dest = f"{guest_path}/{rel}"
        perm = stat.S_IMODE(st.st_mode) & 0o777
        async with gate:
            if stat.S_ISDIR(st.st_mode):
                await agent.copy_file(dest, b"", file_mode=stat.S_IFDIR | perm, uid=st.st_uid, gid=st.st_gid)
            elif stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(source / rel))
                await agent.copy_file(dest, target, file_mode=stat.S_IFLNK | 0o777, uid=st.st_uid, gid=st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                with open(source / rel, "rb") as f:
                    offset = 0
                    while True:
                        data = f.read(CHUNK)
                        await agent.copy_file(dest, data, offset=offset, file_size=st.st_size, file_mode=perm,
                                              uid=st.st_uid, gid=st.st_gid)
                        offset += len(data)
                        if offset >= st.st_size or not data:
                            break
                total += st.st_size

    # directories first (their modes are set before anything is put in them), then the rest
    dirs = [(r, st) for r, st in entries if stat.S_ISDIR(st.st_mode)]
    await asyncio.gather(*(one(r, st) for r, st in dirs))
    await asyncio.gather(*(one(r, st) for r, st in entries if not stat.S_ISDIR(st.st_mode)))
    return total
