"""The one place the agent waits for children: a SIGCHLD-driven reaper with per-pid futures.

The agent is PID 1 of the guest or a child subreaper (PR_SET_CHILD_SUBREAPER), so container
processes become its children once crun exits. Exactly one piece of code may call waitpid(): this
one. (asyncio's child watchers and subprocess.wait() would race it and lose exit statuses; the
agent spawns with os.posix_spawn and never uses create_subprocess_exec.)

A status that arrives before anyone asked for its pid is kept (bounded, oldest dropped first), so
"spawn, then read the pid file, then watch the pid" loses nothing. To not hand a stale status of
an earlier process with a reused pid to a new watcher, each kept status carries the reaper's
generation; `watch(pid, since=gen)` ignores statuses reaped before `gen`, taken before the spawn.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from pykata.record import Record

log = logging.getLogger("pykata.agent.reaper")

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(on: bool = True) -> bool:
    """Make orphaned descendants re-parent to this process (or stop); False when the kernel refuses."""
    if os.getpid() == 1:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0


def exited_children() -> Iterator[tuple[int, int]]:
    """(pid, raw wait status) of each child that has ended, until none is left; never blocks. The one
    waitpid loop: the agent's Reaper and the exec spawner (a process of its own) both reap with it."""
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        yield pid, raw


class ExitStatus(Record):
    """A reaped process: the raw wait status and when it was reaped (epoch seconds)."""

    __slots__ = ("at", "pid", "raw")
    __match_args__ = ("pid", "raw", "at")

    def __init__(self, pid: int, raw: int, at: float) -> None:
        self.pid = pid
        self.raw = raw
        self.at = at

    @property
    def code(self) -> int:
        """The exit code, or 128 + signal number when a signal killed it (as shells and containerd say)."""
        if os.WIFSIGNALED(self.raw):
            return 128 + os.WTERMSIG(self.raw)
        if os.WIFEXITED(self.raw):
            return os.WEXITSTATUS(self.raw)
        return 255


class Reaper:
    """Reaps every child of the process and hands statuses to whoever watches the pid."""

    def __init__(self, keep: int = 4096) -> None:
        self._keep = keep
        self._watchers: dict[int, list[asyncio.Future[ExitStatus]]] = {}
        self._unclaimed: OrderedDict[int, tuple[int, ExitStatus]] = OrderedDict()
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[Callable[[ExitStatus], None]] = []
        self.subreaper = False

    def start(self, *, subreaper: bool = True) -> None:
        """Install the SIGCHLD handler on the running loop and reap what already exited; with
        `subreaper`, also adopt orphaned descendants (what the agent needs)."""
        self._loop = asyncio.get_running_loop()
        self.subreaper = set_child_subreaper() if subreaper else False
        if subreaper and not self.subreaper:
            log.warning("cannot become a child subreaper: container exit statuses may be lost")
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def close(self) -> None:
        """Remove the SIGCHLD handler and stop being a subreaper (an agent run in-process by a
        test must not leave its host process adopting orphans)."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None
        if self.subreaper:
            set_child_subreaper(False)
            self.subreaper = False

    @property
    def generation(self) -> int:
        """Take this before spawning; pass it to `watch(since=...)`."""
        return self._generation

    def add_listener(self, fn: Callable[[ExitStatus], None]) -> None:
        """Call `fn` for every reaped child (after its watchers are resolved)."""
        self._listeners.append(fn)

    def watch(self, pid: int, since: int = 0) -> asyncio.Future[ExitStatus]:
        """A future that gets `pid`'s exit status; resolved at once if it was already reaped
        (at a generation after `since`)."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[ExitStatus] = loop.create_future()
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and kept[0] > since:
            fut.set_result(kept[1])
            return fut
        self._watchers.setdefault(pid, []).append(fut)
        # SIGCHLD may be pending in the loop's queue; reaping now closes that gap cheaply.
        self.reap()
        return fut

    def reap(self) -> None:
        """Collect every exited child (SIGCHLD coalesces: loop until there is none)."""
        for pid, raw in exited_children():
            self._generation += 1
            status = ExitStatus(pid, raw, time.time())
            watchers = self._watchers.pop(pid, None)
            if watchers:
                for fut in watchers:
                    if not fut.done():
                        fut.set_result(status)
            else:
                self._unclaimed[pid] = (self._generation, status)
                while len(self._unclaimed) > self._keep:
                    self._unclaimed.popitem(last=False)
            for fn in self._listeners:
                try:
                    fn(status)
                except Exception:
                    log.exception("reaper listener failed")
