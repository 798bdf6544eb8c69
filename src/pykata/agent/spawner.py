"""A small process that forks the agent's exec children (nsexec), so the agent itself never forks.

Under TCG a fork of the agent (protobuf, asyncio, every module of the agent: tens of MiB mapped) costs
10-20 ms in the agent (page tables copied while its event loop waits), and then each side pays a
copy-on-write fault for every page it writes until the child has exec'd: the child's first steps and
the agent's own next steps took 40+ ms more (exec_bench's in-guest table). The spawner is started once
with the agent (before the VM template is saved, so every clone has it), imports only what the child
runs, and forks that child on request: its address space is a fraction of the agent's. Its loop is
nsexec.serve_spawner (`python -m pykata.agent.nsexec`), next to the child's code; this module is the
agent's end.

What runs in the child is nsexec._child, unchanged: the same plan, the same descriptors (the
container's init pidfd, its cgroup.procs, the stdio pipes, the report pipe, all passed over a
SOCK_SEQPACKET socketpair with SCM_RIGHTS), the same report to the agent. The spawner is the agent's
child, in the guest's own namespaces and cgroup, root with the agent's capabilities, rlimits and
umask, as the agent is: what the child starts from is what the agent would have given it. The
program the child spawns re-parents to the agent (PID 1 or a subreaper; the spawner is neither), so
the agent's reaper sees its exit as before. The spawner answers each request with the child's pid and
a pidfd of it (the agent can then kill a child that hangs without racing a reused pid) and reaps its
children itself. It ends when the agent closes the socket, or dies with it (PDEATHSIG).

Only the agent talks to it, over an unnamed socketpair: the request is a pickle of the plan's fields
(both ends are the agent's own code; nothing from the host or a container reaches it unparsed: the
plan was built and checked by nsexec.plan in the agent).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from pykata.agent.reaper import ExitStatus, Reaper

REQUEST_FDS = 6  # init pidfd, cgroup.procs, stdin, stdout, stderr, report pipe
MAX_REQUEST = 1 << 20


class SpawnerGone(OSError):
    """The request did not reach the spawner: nothing was forked (the caller may fork itself)."""


class Spawner:
    """The agent's end: start the spawner process, ask it to fork an exec child."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._sock: socket.socket | None = None
        self._exited: asyncio.Future[ExitStatus] | None = None
        self._lock = asyncio.Lock()
        self.pid = 0

    @property
    def running(self) -> bool:
        return self._sock is not None and self._exited is not None and not self._exited.done()

    def start(self) -> None:
        """Start the spawner process. Raises OSError."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            generation = self._reaper.generation
            # the package as this process found it (the guest's PYTHONPATH; a checkout on a test host)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
                os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                os.environ.get("PYTHONPATH"))))}
            self.pid = os.posix_spawn(sys.executable, [sys.executable, "-s", "-S", "-m", "pykata.agent.nsexec",
                                                       "3", str(os.getpid())], env,
                                      file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._exited = self._reaper.watch(self.pid, since=generation)
        ours.setblocking(False)
        self._sock = ours

    async def fork(self, fields: dict[str, Any], fds: Sequence[int]) -> tuple[int, int]:
        """Fork an exec child running nsexec._child with `fds` (REQUEST_FDS of them); its pid and a
        pidfd of it (the caller closes it). Raises OSError when the spawner cannot."""
        import pickle  # here: the spawner is off by default, and the agent's start-up need not load it

        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._sock is None:
                raise SpawnerGone(errno.ESRCH, "no spawner")
            sock = self._sock
            payload = pickle.dumps(fields)
            while True:
                try:
                    socket.send_fds(sock, [payload], list(fds))
                    break
                except BlockingIOError:
                    await _wait(loop, sock, write=True)
                except OSError as exc:  # it is gone: the request never reached it
                    self.close()
                    raise SpawnerGone(exc.errno, f"the spawner is gone: {exc.strerror}") from None
            while True:
                try:
                    msg, got, _flags, _addr = socket.recv_fds(sock, 4096, 1)
                    break
                except BlockingIOError:
                    await _wait(loop, sock, write=False)
        if not msg:
            self.close()
            raise OSError(errno.EPIPE, "the spawner ended")
        if msg.startswith(b"P") and msg[1:].isdigit() and len(got) == 1:
            return int(msg[1:]), got[0]
        for fd in got:
            os.close(fd)
        raise OSError(errno.EIO, f"spawner: {msg[1:].decode(errors='replace')}")

    def close(self) -> None:
        """End the spawner (it exits when its socket closes). Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def _wait(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(sock.fileno(), wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(sock.fileno())
