"""AsyncSandbox: one disposable VM sandbox for asyncio code (the blocking `Sandbox` wraps it).

Each sandbox is one VM running the image's container with a long-lived idle process; `exec` runs
commands in it. Leaving the `async with` block destroys the VM and everything it used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.config import Config, load_config
from pykata.errors import PykataError
from pykata.images import ImageStore
from pykata.sandbox import Sandbox, Volume, build_spec

IDLE_COMMAND = ("sleep", "2147483647")


class ExecTimeoutError(PykataError):
    """A command did not finish within its timeout (it was killed)."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class AsyncSandbox:
    """One VM sandbox for asyncio code. Use `async with`, or `await start()` / `await close()`."""

    def __init__(self, image: str = "busybox", *, cpus: int | None = None, memory_mib: int | None = None,
                 env: Sequence[str] = (), volumes: Sequence[str] = (), config: Config | None = None,
                 idle_command: Sequence[str] = IDLE_COMMAND) -> None:
        self.image_ref = image
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.env = list(env)
        self.volumes = list(volumes)
        self.config = config
        self.idle_command = list(idle_command)
        self._sandbox: Any = None
        self._container: Any = None

    @property
    def id(self) -> str:
        return str(self._sandbox.id) if self._sandbox else ""

    async def start(self) -> AsyncSandbox:
        """Boot the VM and start the container. Raises PykataError (ImageError, SandboxError, ...)."""
        config = self.config or load_config()
        image = ImageStore(Path(config.runtime.cache_dir)).resolve(self.image_ref)
        vols = [Volume.parse(v) for v in self.volumes]
        env = [*image.config.env, *self.env]
        spec = build_spec(self.idle_command, env=env, cwd=image.config.working_dir)
        self._env = env
        self._cwd = image.config.working_dir
        self._sandbox = await Sandbox.create(config=config, vcpus=self.cpus, memory_mib=self.memory_mib)
        try:
            self._container = await self._sandbox.create_container(
                self._sandbox.id, spec, image.rootfs, volumes=vols, image=self.image_ref)
            await self._container.start()
            await self._container.init.close_stdin()
        except BaseException:
            await self.close()
            raise
        return self

    async def exec(self, cmd: Sequence[str], *, stdin: bytes | None = None, env: Sequence[str] = (),
                   cwd: str | None = None, timeout: float | None = None) -> ExecResult:
        """Run `cmd` to completion and collect its output.

        Raises ExecTimeoutError after `timeout` seconds (the process is killed first), PykataError.
        """
        out: list[bytes] = []
        err: list[bytes] = []
        proc = await self._spawn(cmd, env, cwd)

        async def drain(stream: Any, sink: list[bytes]) -> None:
            async for chunk in proc.chunks(stream):
                sink.append(chunk)

        async def run() -> int:
            feeders = [drain("stdout", out), drain("stderr", err)]
            if stdin:
                await proc.write_stdin(stdin)
            await proc.close_stdin()
            await asyncio.gather(*feeders)
            return int(await proc.wait())

        try:
            code = await asyncio.wait_for(run(), timeout)
        except TimeoutError:
            await proc.signal(9)
            raise ExecTimeoutError(f"{list(cmd)} did not finish within {timeout}s") from None
        return ExecResult(code, b"".join(out), b"".join(err))

    async def stream(self, cmd: Sequence[str], *, env: Sequence[str] = (),
                     cwd: str | None = None) -> AsyncGenerator[tuple[str, bytes], None]:
        """Run `cmd` and yield ("stdout"|"stderr", chunk) as output arrives; the exit status is
        yielded last as ("exit", b"<code>")."""
        proc = await self._spawn(cmd, env, cwd)
        await proc.close_stdin()
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        async def drain(stream: Any) -> None:
            async for chunk in proc.chunks(stream):
                await queue.put((stream, chunk))
            await queue.put(None)

        tasks = [asyncio.ensure_future(drain("stdout")), asyncio.ensure_future(drain("stderr"))]
        finished = False
        try:
            ended = 0
            while ended < 2:
                item = await queue.get()
                if item is None:
                    ended += 1
                    continue
                yield item
            status = await proc.wait()
            finished = True
            yield ("exit", str(status).encode())
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not finished:  # abandoned (break, close, cancel): nobody reads it any more
                with contextlib.suppress(PykataError):
                    await proc.signal(9)

    async def _spawn(self, cmd: Sequence[str], env: Sequence[str], cwd: str | None) -> Any:
        if self._container is None:
            raise PykataError("the sandbox is not started")
        if not cmd:
            raise PykataError("exec: empty command")
        return await self._container.exec(list(cmd), env=[*self._env, *env], cwd=cwd or self._cwd)

    async def close(self) -> None:
        """Destroy the VM and everything it used. Idempotent."""
        if self._sandbox is not None:
            await self._sandbox.stop()

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
