"""Sandbox: the blocking face of AsyncSandbox, for code without an event loop.

Every blocking sandbox of a process runs on one shared event loop thread (pykata.sdk.loop), so twenty
sandboxes cost twenty VMs, not twenty threads. Ctrl-C during any call cancels it and waits for its
cleanup: a boot interrupted by KeyboardInterrupt leaves no VM, no directory and no thread behind.
The methods mirror AsyncSandbox's; their docstrings say what they raise.
"""

from __future__ import annotations

import contextlib
import os
import signal as _signal
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Generic, Protocol, Self, TypeVar

from pykata.config import Config
from pykata.errors import PykataError
from pykata.sdk.core import (
    IDLE_COMMAND,
    AsyncPty,
    AsyncSandbox,
    Command,
    Env,
    Metrics,
    Network,
    SandboxInfo,
    SharedFsChoice,
    User,
)
from pykata.sdk.files import MAX_DOWNLOAD, MAX_READ, AsyncFiles, FileInfo, Progress
from pykata.sdk.loop import SHARED
from pykata.sdk.pool import AsyncPool
from pykata.sdk.process import AsyncProcess, AsyncStdin, ExecResult, StreamName

T = TypeVar("T")


def _run(aw: Awaitable[T]) -> T:
    return SHARED.run(aw)


def _iterate(agen: AsyncGenerator[T, None], close: Callable[[], bool] = lambda: True) -> Iterator[T]:
    """An async generator on the shared loop as a plain iterator; leaving it early closes the generator
    (when `close()` says the loop is still there to run that)."""
    try:
        while True:
            try:
                yield _run(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        if close():
            with contextlib.suppress(PykataError):
                _run(agen.aclose())


class Stdin:
    """The standard input of a spawned process (opened with `stdin=True`)."""

    def __init__(self, inner: AsyncStdin) -> None:
        self._inner = inner

    def write(self, data: bytes | str) -> None:
        _run(self._inner.write(data))

    def close(self) -> None:
        _run(self._inner.close())


class Proc:
    """A background process (from `Sandbox.spawn`): `for stream, chunk in proc` yields its output."""

    def __init__(self, inner: AsyncProcess) -> None:
        self._inner = inner
        self.stdin = Stdin(inner.stdin)

    @property
    def pid(self) -> int:
        return self._inner.pid

    @property
    def cmd(self) -> list[str]:
        return self._inner.cmd

    @property
    def exit_code(self) -> int | None:
        return self._inner.exit_code

    @property
    def running(self) -> bool:
        return self._inner.running

    def wait(self, timeout: float | None = None) -> int:
        return _run(self._inner.wait(timeout))

    def kill(self, signal: int = _signal.SIGKILL) -> None:
        _run(self._inner.kill(signal))

    def result(self, timeout: float | None = None, *, max_output: int | None = None) -> ExecResult:
        return _run(self._inner.result(timeout, max_output=max_output))

    def output(self) -> Iterator[tuple[StreamName, bytes]]:
        """As AsyncProcess.output: leaving early keeps what was not read."""
        return _iterate(self._inner.output())

    def __iter__(self) -> Iterator[tuple[StreamName, bytes]]:
        return self.output()


class Pty:
    """A terminal session (from `Sandbox.pty`)."""

    def __init__(self, inner: AsyncPty) -> None:
        self._inner = inner
        self.process = Proc(inner.process)

    def write(self, data: bytes | str) -> None:
        _run(self._inner.write(data))

    def read(self) -> bytes | None:
        return _run(self._inner.read())

    def resize(self, cols: int, rows: int) -> None:
        _run(self._inner.resize(cols, rows))

    def wait(self, timeout: float | None = None) -> int:
        return _run(self._inner.wait(timeout))

    def kill(self) -> None:
        _run(self._inner.kill())

    def close(self) -> None:
        _run(self._inner.close())


class Files:
    """The files API of a blocking sandbox (see AsyncFiles)."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._inner = inner

    def read(self, path: str | os.PathLike[str], *, encoding: str = "utf-8", max_bytes: int = MAX_READ) -> str:
        return _run(self._inner.read(path, encoding=encoding, max_bytes=max_bytes))

    def read_bytes(self, path: str | os.PathLike[str], *, max_bytes: int = MAX_READ) -> bytes:
        return _run(self._inner.read_bytes(path, max_bytes=max_bytes))

    def write(self, path: str | os.PathLike[str], data: bytes | str | IO[bytes], *, mode: int | None = None,
              progress: Progress | None = None) -> None:
        _run(self._inner.write(path, data, mode=mode, progress=progress))

    def list(self, path: str | os.PathLike[str] = ".") -> list[FileInfo]:
        return _run(self._inner.list(path))

    def stat(self, path: str | os.PathLike[str]) -> FileInfo:
        return _run(self._inner.stat(path))

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return _run(self._inner.exists(path))

    def remove(self, path: str | os.PathLike[str], *, recursive: bool = False) -> None:
        _run(self._inner.remove(path, recursive=recursive))

    def mkdir(self, path: str | os.PathLike[str], *, parents: bool = True, mode: int | None = None) -> None:
        _run(self._inner.mkdir(path, parents=parents, mode=mode))

    def upload(self, local: str | os.PathLike[str], remote: str | os.PathLike[str], *,
               progress: Progress | None = None, preserve_owner: bool = False) -> None:
        _run(self._inner.upload(local, remote, progress=progress, preserve_owner=preserve_owner))

    def download(self, remote: str | os.PathLike[str], local: str | os.PathLike[str], *,
                 progress: Progress | None = None, preserve_owner: bool = False,
                 max_bytes: int = MAX_DOWNLOAD) -> None:
        _run(self._inner.download(remote, local, progress=progress, preserve_owner=preserve_owner,
                                  max_bytes=max_bytes))


class _Startable(Protocol):
    async def start(self) -> Any: ...

    async def close(self) -> None: ...


_A = TypeVar("_A", bound=_Startable)


class _OnSharedLoop(Generic[_A]):
    """The blocking face of an async object with start() and close(): it keeps the shared loop (a token of
    SHARED) from start() to close()."""

    _async: _A
    _token: int | None

    def start(self) -> Self:
        """Start it (a Sandbox: boot the VM). Raises PykataError; KeyboardInterrupt cancels the start and
        cleans up first."""
        if self._token is None:
            self._token = SHARED.acquire(closer=self.close)
            try:
                _run(self._async.start())
            except BaseException:
                self._release()
                raise
        return self

    def close(self) -> None:
        """Destroy it and everything it used (a Sandbox: the VM; a Pool: its sandboxes). Idempotent."""
        if self._token is None:
            return
        try:
            _run(self._async.close())
        finally:
            self._release()

    def _release(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            SHARED.release(token)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox(_OnSharedLoop[AsyncSandbox]):
    """The same as AsyncSandbox for code without an event loop. Use `with`, or `start()` / `close()`."""

    def __init__(self, image: str = "busybox", *, cpus: int | None = None, memory_mib: int | None = None,
                 disk_mib: int | None = None, env: Env | None = None, volumes: Sequence[str] = (),
                 config: Config | None = None, timeout: float | None = None, cwd: str | None = None,
                 user: User | None = None, name: str = "", idle_command: Sequence[str] = IDLE_COMMAND,
                 snapshots: bool = False, network: Network | None = None, allow: Sequence[str] | None = None,
                 deny: Sequence[str] = (), dns: Sequence[str] = (), shared_fs: SharedFsChoice | None = None) -> None:
        self._async = AsyncSandbox(image, cpus=cpus, memory_mib=memory_mib, disk_mib=disk_mib, env=env,
                                   volumes=volumes, config=config, timeout=timeout, cwd=cwd, user=user, name=name,
                                   idle_command=idle_command, snapshots=snapshots, network=network, allow=allow,
                                   deny=deny, dns=dns, shared_fs=shared_fs)
        self.files = Files(self._async.files)
        self._token: int | None = None

    @classmethod
    def _wrap(cls, inner: AsyncSandbox, token: int) -> Sandbox:
        sb = cls.__new__(cls)
        sb._async, sb.files, sb._token = inner, Files(inner.files), token
        return sb

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def cwd(self) -> str:
        return self._async.cwd

    @property
    def paused(self) -> bool:
        return self._async.paused

    @property
    def deadline(self) -> float | None:
        return self._async.deadline

    def run(self, cmd: Command, *, env: Env | None = None, cwd: str | None = None, user: User | None = None,
            timeout: float | None = None, stdin: bytes | str | None = None,
            max_output: int | None = None) -> ExecResult:
        """See AsyncSandbox.run."""
        kw: dict[str, Any] = {} if max_output is None else {"max_output": max_output}
        return _run(self._async.run(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin, **kw))

    def exec(self, cmd: Command, *, stdin: bytes | None = None, env: Env | None = None, cwd: str | None = None,
             timeout: float | None = None) -> ExecResult:
        """See AsyncSandbox.exec (= run)."""
        return _run(self._async.exec(cmd, stdin=stdin, env=env, cwd=cwd, timeout=timeout))

    def spawn(self, cmd: Command, *, env: Env | None = None, cwd: str | None = None, user: User | None = None,
              stdin: bytes | str | bool = False) -> Proc:
        """See AsyncSandbox.spawn."""
        return Proc(_run(self._async.spawn(cmd, env=env, cwd=cwd, user=user, stdin=stdin)))

    def processes(self) -> list[Proc]:
        return [Proc(p) for p in self._async.processes()]

    def pty(self, cmd: Command = "sh", *, cols: int = 80, rows: int = 24, env: Env | None = None,
            cwd: str | None = None, user: User | None = None) -> Pty:
        """See AsyncSandbox.pty."""
        return Pty(_run(self._async.pty(cmd, cols=cols, rows=rows, env=env, cwd=cwd, user=user)))

    def stream(self, cmd: Command, *, env: Env | None = None, cwd: str | None = None) -> Iterator[tuple[str, bytes]]:
        """See AsyncSandbox.stream. Leaving the loop early (or dropping the iterator) kills the command."""
        return _iterate(self._async.stream(cmd, env=env, cwd=cwd), lambda: self._token is not None)

    def set_timeout(self, seconds: float | None) -> None:
        _run(self._async.set_timeout(seconds))

    def pause(self) -> None:
        _run(self._async.pause())

    def resume(self) -> None:
        _run(self._async.resume())

    def resize(self, *, memory_mib: int | None = None, cpus: int | None = None) -> tuple[int, int]:
        """See AsyncSandbox.resize."""
        return _run(self._async.resize(memory_mib=memory_mib, cpus=cpus))

    def metrics(self) -> Metrics:
        return _run(self._async.metrics())

    def snapshot(self, path: str | os.PathLike[str], *, close: bool = False) -> Path:
        """See AsyncSandbox.snapshot."""
        return _run(self._async.snapshot(path, close=close))

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, config: Config | None = None, timeout: float | None = None,
                name: str = "") -> Sandbox:
        """See AsyncSandbox.restore: a new sandbox from a snapshot, in this process."""
        return cls._adopt(AsyncSandbox.restore(path, config=config, timeout=timeout, name=name))
    def expose(self, port: int, *, host_port: int = 0, host: str = "127.0.0.1") -> int:
        """Forward a host port to `port` in the sandbox (see AsyncSandbox.expose); returns the host port."""
        return _run(self._async.expose(port, host_port=host_port, host=host))

    @staticmethod
    def list(config: Config | None = None) -> list[SandboxInfo]:
        return AsyncSandbox.list(config)

    @classmethod
    def connect(cls, sandbox: str, *, config: Config | None = None) -> Sandbox:
        """See AsyncSandbox.connect: `close()` disconnects, the owner keeps the sandbox."""
        return cls._adopt(AsyncSandbox.connect(sandbox, config=config))

    @classmethod
    def _adopt(cls, make: Awaitable[AsyncSandbox]) -> Sandbox:
        """Run `make` on the shared loop and wrap the sandbox it gives; the loop stays up until it closes."""
        token = SHARED.acquire()
        try:
            inner = _run(make)
        except BaseException:
            SHARED.release(token)
            raise
        sb = cls._wrap(inner, token)
        SHARED.set_closer(token, sb.close)
        return sb



class Pool(_OnSharedLoop[AsyncPool]):
    """The blocking face of AsyncPool: `with Pool(size=4) as pool: with pool.acquire() as sb: ...`."""

    def __init__(self, size: int = 2, image: str = "busybox", *, max_starting: int = 2, pause_idle: bool = False,
                 **sandbox_options: Any) -> None:
        self._async = AsyncPool(size, image, max_starting=max_starting, pause_idle=pause_idle, **sandbox_options)
        self._token: int | None = None

    @property
    def ready(self) -> int:
        return self._async.ready

    def wait_ready(self, count: int | None = None, timeout: float | None = None) -> None:
        self.start()
        _run(self._async.wait_ready(count, timeout))

    def acquire(self, timeout: float | None = None) -> Sandbox:
        """A started sandbox that is now yours (see AsyncPool.acquire); `with` it to close it."""
        self.start()
        return Sandbox._adopt(self._async.acquire(timeout))

