"""Sandbox: the blocking face of AsyncSandbox, for code without an event loop.

Every blocking sandbox of a process runs on one shared event loop thread (pykata.sdk.loop), so twenty
sandboxes cost twenty VMs, not twenty threads. Ctrl-C during any call cancels it and waits for its
cleanup: a boot interrupted by KeyboardInterrupt leaves no VM, no directory and no thread behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from pykata.errors import PykataError
from pykata.sdk.core import AsyncSandbox, ExecResult
from pykata.sdk.loop import SHARED

T = TypeVar("T")


class Sandbox:
    """The same as AsyncSandbox for code without an event loop. Use `with`, or `start()` / `close()`."""

    def __init__(self, image: str = "busybox", **kwargs: Any) -> None:
        self._async = AsyncSandbox(image, **kwargs)
        self._token: int | None = None

    def _run(self, aw: Awaitable[T]) -> T:
        return SHARED.run(aw)

    @property
    def id(self) -> str:
        return self._async.id

    def start(self) -> Sandbox:
        """Boot the VM. Raises PykataError; KeyboardInterrupt cancels the boot and cleans up first."""
        if self._token is not None:
            return self
        self._token = SHARED.acquire(closer=self.close)
        try:
            self._run(self._async.start())
        except BaseException:
            self._release()
            raise
        return self

    def exec(self, cmd: Sequence[str], **kwargs: Any) -> ExecResult:
        """See AsyncSandbox.exec."""
        return self._run(self._async.exec(cmd, **kwargs))

    def stream(self, cmd: Sequence[str], **kwargs: Any) -> Iterator[tuple[str, bytes]]:
        """See AsyncSandbox.stream. Leaving the loop early (or dropping the iterator) kills the command."""
        agen = self._async.stream(cmd, **kwargs)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._token is not None:
                with contextlib.suppress(PykataError):
                    self._run(agen.aclose())

    def close(self) -> None:
        """Destroy the VM and everything it used. Idempotent."""
        if self._token is None:
            return
        try:
            self._run(self._async.close())
        finally:
            self._release()

    def _release(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            SHARED.release(token)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
