"""Driving crun: create/start/exec/kill/delete/update/pause/resume/state, errors from its log.

Every call runs `crun --root <state>/crun --log=file:<one-off log> --log-format=json ...`, so
crun's own complaints never mix with a container's stderr (crun create and exec hand their
stdio to the container) and can be quoted in the RPC error.

crun runs from a sealed memfd copy of its binary that the agent makes once (`SealedBinary`).
A crun started from its file on disk protects itself against a container overwriting it through
/proc/<pid>/exe (CVE-2019-5736) by making such a copy itself on every call: bind-mount, remount
read-only, lazy unmount and re-exec, whose unmount waits for an RCU grace period. Under TCG that
dance was most of every crun call (guest, Nov 2026: `crun --version` 156-224 ms from disk, 40-74
ms from the sealed copy). crun accepts a binary whose seals forbid writing as already cloned, so
the protection is the same and is paid once per agent instead of once per call.

When the image has crun's libsystemd stand-in (pykata.guestimage.crunlib: crun without systemd's
libraries, which it uses only for the systemd cgroup manager, journald and NOTIFY_SOCKET, none of
which the agent uses), crun runs with LD_LIBRARY_PATH naming its directory. Only crun gets it: a
container's processes get the environment of their spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

from pykata.agent import command
from pykata.agent.reaper import ExitStatus, Reaper
from pykata.errors import Code, PykataError
from pykata.record import Record

log = logging.getLogger("pykata.agent.crun")

CREATE_TIMEOUT = 60.0   # crun create sets up mounts and cgroups; slow under TCG
DEFAULT_TIMEOUT = 30.0
_MAX_ERROR = 2048
# pykata.guestimage.crunlib.LIB_DIR in the guest
CRUN_LIB_DIR = "/usr/lib/pykata-crun"


class CrunError(PykataError):
    """crun failed; `rpc_code` (chosen from crun's message) is what the RPC answers."""

    def __init__(self, action: str, container_id: str, message: str, rpc_code: Code = Code.INTERNAL) -> None:
        super().__init__(f"crun {action} {container_id}: {message}")
        self.action = action
        self.container_id = container_id
        self.rpc_code = rpc_code


class Stdio(Record):
    __slots__ = ("stderr", "stdin", "stdout")
    __match_args__ = ("stdin", "stdout", "stderr")

    def __init__(self, stdin: int | None = None, stdout: int | None = None, stderr: int | None = None) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr


def find_crun(name: str = "crun") -> str:
    """Absolute path of crun. Raises FileNotFoundError when it is not installed."""
    found = name if os.path.isabs(name) else shutil.which(name, path=command.DEFAULT_ENV["PATH"])
    if not found or not os.access(found, os.X_OK):
        raise FileNotFoundError(f"crun not found ({name})")
    return found


# The seals crun (like runc) requires of a memfd copy of itself to skip re-cloning.
_CLONED_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class SealedBinary:
    """A read-only, sealed in-memory copy of an executable, run through /proc/self/fd/N.

    The descriptor is close-on-exec: posix_spawn's child still has it while the kernel resolves
    the path, and no program the agent runs inherits it.
    """

    def __init__(self, path: str) -> None:
        """Raises OSError when the copy cannot be made."""
        fd = os.memfd_create(os.path.basename(path), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                offset = 0
                while offset < size:
                    sent = os.sendfile(fd, src.fileno(), offset, size - offset)
                    if sent == 0:
                        raise OSError(f"{path} shrank while being copied")
                    offset += sent
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _CLONED_SEALS)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = f"/proc/self/fd/{fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Crun:
    """crun with the agent's state root."""

    def __init__(self, reaper: Reaper, binary: str, root: Path, log_dir: Path) -> None:
        self.reaper = reaper
        self.binary = binary
        # What is executed: the sealed copy when it can be made, else the file (crun then clones
        # itself on every call, slower but as safe).
        self.executable = binary
        self._sealed: SealedBinary | None = None
        try:
            self._sealed = SealedBinary(binary)
            self.executable = self._sealed.path
        except OSError as exc:
            log.warning("cannot make a sealed copy of %s (each call will copy it): %s", binary, exc)
        self.root = root
        self.log_dir = log_dir
        self.env = dict(command.DEFAULT_ENV)
        if os.path.exists(os.path.join(CRUN_LIB_DIR, "libsystemd.so.0")):
            self.env["LD_LIBRARY_PATH"] = CRUN_LIB_DIR
        self._seq = itertools.count()
        # pivot_root(2) fails (EINVAL) when the guest's / is the initramfs: crun must then move
        # the container root over / and chroot instead.
        self.no_pivot = root_is_initramfs()

    def _argv(self, log: Path, *args: str) -> list[str]:
        return [self.binary, f"--root={self.root}", f"--log=file:{log}", "--log-format=json", *args]

    async def _call(self, action: str, cid: str, args: list[str], *, stdio: Stdio | None = None,
                    timeout: float = DEFAULT_TIMEOUT, nice: int = 0) -> bytes:
        """Run one crun command; returns its stdout. Raises CrunError."""
        log = self.log_dir / f"{action}-{next(self._seq)}.log"
        argv = self._argv(log, *args)
        # crun at fixed addresses reuses what QEMU translated for the last call (command.fixed_layout),
        # but not for exec: nothing there resets the persona before the process's own exec (create's
        # does, through the linux.personality the agent sets)
        fixed = action != "exec"
        try:
            if stdio is None:
                result = await command.run(self.reaper, argv, timeout=timeout, executable=self.executable,
                                           fixed=fixed, env=self.env)
                ok, stdout, stderr = result.ok, result.stdout, result.stderr
                raw = result.status
            else:
                child = command.spawn(self.reaper, argv, stdin=stdio.stdin, stdout=stdio.stdout,
                                      stderr=stdio.stderr, executable=self.executable, fixed=fixed, env=self.env)
                if nice:  # work no request waits for: what is left of a CPU once requests had theirs
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, child.pid, nice)
                raw = await _wait(child, timeout)
                ok, stdout, stderr = os.WIFEXITED(raw.raw) and os.WEXITSTATUS(raw.raw) == 0, b"", b""
            if not ok:
                message = _log_message(log) or stderr.decode(errors="replace").strip()
                raise CrunError(action, cid, (message or f"exit status {raw.code}")[:_MAX_ERROR],
                                _code_for(message))
            return stdout
        except command.CommandTimeout as exc:
            raise CrunError(action, cid, str(exc), Code.DEADLINE_EXCEEDED) from None
        except OSError as exc:
            raise CrunError(action, cid, f"cannot run {self.binary}: {exc}", Code.INTERNAL) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                log.unlink()

    async def create(self, cid: str, bundle: Path, pid_file: Path, stdio: Stdio,
                     console_socket: str | None = None, *, nice: int = 0) -> None:
        args = ["create", f"--bundle={bundle}", f"--pid-file={pid_file}"]
        if self.no_pivot:
            args.append("--no-pivot")
        if console_socket:
            args.append(f"--console-socket={console_socket}")
        await self._call("create", cid, [*args, cid], stdio=stdio, timeout=CREATE_TIMEOUT, nice=nice)

    async def start(self, cid: str) -> None:
        if not self.release(cid):
            await self._call("start", cid, ["start", cid])

    def release(self, cid: str) -> bool:
        """What `crun start` does for a container without poststart hooks (the agent drops every
        hook from the spec): open the exec fifo the created init waits on, unlink it (crun then
        reports the container as running) and write the byte that lets the init exec the
        workload. Under TCG this saves starting crun (~130 ms in the guest).

        False when no init waits on the fifo (gone, or already started): the caller then runs
        `crun start` for crun's own answer.
        """
        fifo = self.root / cid / "exec.fifo"
        try:
            # Non-blocking: with no reader, open fails (ENXIO) instead of hanging the agent.
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
            os.unlink(fifo)
            os.write(fd, b"\0")
        except OSError as exc:
            log.warning("releasing %s through its exec fifo: %s", cid, exc)
            return False
        finally:
            os.close(fd)
        return True

    async def exec(self, cid: str, process_file: Path, pid_file: Path, stdio: Stdio,
                   console_socket: str | None = None) -> None:
        # --detach: crun exits once the process runs; the process re-parents to the agent (a
        # subreaper), whose reaper then sees its real wait status.
        args = ["exec", "--detach", f"--process={process_file}", f"--pid-file={pid_file}"]
        if console_socket:
            args.append(f"--console-socket={console_socket}")
        await self._call("exec", cid, [*args, cid], stdio=stdio, timeout=CREATE_TIMEOUT)

    async def kill(self, cid: str, signum: int, *, all_processes: bool = False) -> None:
        await self._call("kill", cid, ["kill", *(["--all"] if all_processes else []), cid, str(signum)])

    async def delete(self, cid: str, *, force: bool = True) -> None:
        await self._call("delete", cid, ["delete", *(["--force"] if force else []), cid])

    async def update(self, cid: str, resources_file: Path) -> None:
        await self._call("update", cid, ["update", f"--resources={resources_file}", cid])

    async def pause(self, cid: str) -> None:
        await self._call("pause", cid, ["pause", cid])

    async def resume(self, cid: str) -> None:
        await self._call("resume", cid, ["resume", cid])

    async def state(self, cid: str) -> dict[str, Any]:
        """crun's state document ({"status": "running", "pid": ..., ...})."""
        out = await self._call("state", cid, ["state", cid])
        try:
            doc = json.loads(out)
        except ValueError:
            raise CrunError("state", cid, "unparsable state output") from None
        if not isinstance(doc, dict):
            raise CrunError("state", cid, "unexpected state output")
        return doc

    def close(self) -> None:
        if self._sealed is not None:
            self._sealed.close()
            self._sealed = None
        self.executable = self.binary

    def exists(self, cid: str) -> bool:
        return (self.root / cid).is_dir()

    def list_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())


async def _wait(child: command.Child, timeout: float) -> ExitStatus:
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(child.exited)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        raise command.CommandTimeout(f"crun did not finish within {timeout}s") from None


def root_is_initramfs(mounts: Path = Path("/proc/self/mounts")) -> bool:
    """True when / is the kernel's initramfs (file system type "rootfs")."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    types = [ln.split()[2] for ln in lines if len(ln.split()) > 2 and ln.split()[1] == "/"]
    return bool(types) and types[-1] == "rootfs"


def _log_message(log: Path) -> str:
    """The error lines of a crun JSON log, joined."""
    try:
        text = log.read_text(errors="replace")[-16384:]
    except OSError:
        return ""
    messages = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if line.strip():
                messages.append(line.strip())
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", None):
            messages.append(str(entry.get("msg", "")).strip())
    return "; ".join(m for m in messages if m)


def _code_for(message: str) -> Code:
    low = message.lower()
    if "does not exist" in low or "not found in $path" in low or ("no such file" in low and "container" in low):
        return Code.NOT_FOUND
    if "not running" in low or "is paused" in low or "not paused" in low or "already" in low:
        return Code.FAILED_PRECONDITION
    return Code.INTERNAL
