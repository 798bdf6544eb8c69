"""The debug console: processes in the guest itself, outside every container (`pykata sandbox exec`).

Off unless the host turned it on in CreateSandbox (`debug_console`, from the host's configuration file;
no annotation reaches it), and only CreateSandbox can. Once on, it gives whoever can call the agent a
root shell in the guest: nothing a compromised guest does not already have, since the agent itself runs
there as root. What the host sends in is bounded and fixed: the command line, a terminal type, a window
size; never the admin's environment, files or descriptors.

A console process is a `Process` like a container's exec, addressed by the stdio, signal and wait RPCs
with container_id "" and its exec_id.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from pykata.agent.processes import Process
from pykata.agent.reaper import Reaper
from pykata.agent.stdio import DEFAULT_BUFFER_LIMIT, set_window_size
from pykata.agent.validation import check_exec_id
from pykata.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from pykata.protocols.agent import agent_pb2

SHELL = "/bin/sh"
MAX_CONSOLES = 16          # processes kept (running or not yet waited for)
MAX_ARGS = 256
MAX_ARGS_BYTES = 64 << 10
TERM_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class DebugConsole:
    def __init__(self, reaper: Reaper, *, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self.reaper = reaper
        self.buffer_limit = buffer_limit
        self.enabled = False
        self.processes: dict[str, Process] = {}

    def enable(self) -> None:
        self.enabled = True

    def get(self, exec_id: str) -> Process:
        """Raises NotFound (also when the console is off: nothing of it exists then)."""
        proc = self.processes.get(exec_id)
        if proc is None:
            raise NotFound(f"debug console has no process {exec_id!r}")
        return proc

    def _prune(self) -> None:
        for eid, p in list(self.processes.items()):
            if p.finished:
                p.close()
                del self.processes[eid]

    async def start(self, req: agent_pb2.DebugConsoleRequest) -> int:
        """Start a process in the guest; its pid. Raises PermissionDenied when the console is off,
        InvalidArgument, AlreadyExists, ResourceExhausted, OSError (cannot start)."""
        if not self.enabled:
            raise PermissionDenied("debug console is disabled: the host's configuration enables it "
                                   "(agent.pykata.debug_console_enabled)")
        eid = check_exec_id("exec_id", req.exec_id, allow_empty=False)
        args = list(req.args) or [SHELL]
        if len(args) > MAX_ARGS or sum(len(a) for a in args) > MAX_ARGS_BYTES or any("\0" in a for a in args):
            raise InvalidArgument("args", f"at most {MAX_ARGS} arguments, {MAX_ARGS_BYTES} bytes, no NUL")
        if req.term and not TERM_RE.match(req.term):
            raise InvalidArgument("term", "letters, digits and ._+- only, at most 64")
        for name, value in (("rows", req.rows), ("columns", req.columns)):
            if value > 0xFFFF:
                raise InvalidArgument(name, f"{value} is larger than 65535")
        self._prune()
        if eid in self.processes:
            raise AlreadyExists(f"debug console already has a process {eid!r}")
        if len(self.processes) >= MAX_CONSOLES:
            raise ResourceExhausted(f"debug console has {MAX_CONSOLES} processes; wait for some")
        argv0 = _which(args[0])
        env = {"PATH": PATH, "HOME": "/root", "TERM": req.term or "dumb"}
        proc = Process("", eid, tty=req.terminal, buffer_limit=self.buffer_limit)
        try:
            if req.terminal:
                pid = self._spawn_pty(proc, argv0, args, env, req.rows, req.columns)
            else:
                pid = self._spawn_pipes(proc, argv0, args, env)
        except BaseException:
            proc.close()
            raise
        self.processes[eid] = proc
        return pid

    def _spawn_pty(self, proc: Process, argv0: str, args: list[str], env: dict[str, str],
                   rows: int, columns: int) -> int:
        master, slave = os.openpty()
        try:
            os.set_inheritable(master, False)
            if rows and columns:
                set_window_size(master, rows, columns)
            slave_path = os.ttyname(slave)
            generation = self.reaper.generation
            # setsid (POSIX_SPAWN_SETSID) comes before the file actions, so opening the pty there (without
            # O_NOCTTY) makes it the shell's controlling terminal: ^C and job control work.
            pid = os.posix_spawn(argv0, args, env, setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                                 setsigmask=(), file_actions=[
                                     (os.POSIX_SPAWN_OPEN, 0, slave_path, os.O_RDWR, 0),
                                     (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        proc.attach_console(master)
        proc.started(pid, self.reaper.watch(pid, since=generation))
        return pid

    def _spawn_pipes(self, proc: Process, argv0: str, args: list[str], env: dict[str, str]) -> int:
        in_r, out_w, err_w = proc.child_stdio()
        generation = self.reaper.generation
        try:
            pid = os.posix_spawn(argv0, args, env, setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                                 setsigmask=(), file_actions=[
                                     (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                                     (os.POSIX_SPAWN_DUP2, err_w, 2)])
        finally:
            proc.close_child_stdio()
        proc.started(pid, self.reaper.watch(pid, since=generation))
        return pid

    def close(self) -> None:
        for p in self.processes.values():
            if p.running:
                p.signal(signal.SIGKILL)
            p.close()
        self.processes.clear()


def _which(name: str) -> str:
    """Raises InvalidArgument naming args when the program is not found."""
    if "/" in name:
        if os.access(name, os.X_OK):
            return name
    else:
        for d in PATH.split(":"):
            p = Path(d) / name
            if os.access(p, os.X_OK) and p.is_file():
                return str(p)
    raise InvalidArgument("args", f"{name!r}: no such program in the guest")
