"""Disposable VM sandboxes from Python code: run untrusted code with a VM's isolation.

    import pykata
    with pykata.Sandbox(image="busybox", timeout=300) as sb:
        r = sb.run("echo hi; exit 3")                   # str: /bin/sh -c; a list: argv
        print(r.exit_code, r.stdout)                    # 3 b'hi\\n'
        sb.files.write("/work/in.txt", "data")
        proc = sb.spawn(["sh", "-c", "while :; do date; sleep 1; done"])
        for stream, chunk in proc: ...                  # output as it comes
        proc.kill()

    async with pykata.AsyncSandbox(image="busybox") as sb:   # the same surface for asyncio
        r = await sb.run(["echo", "hi"], timeout=10)

Each sandbox is one VM running the image's container with a long-lived idle process; commands and
file operations run in that container. Leaving the `with` block destroys the VM and everything it used.
Errors: pykata.sdk.errors (all are pykata.PykataError).
"""

from pykata.sandbox.snapshot import SnapshotError
from pykata.sdk.blocking import Files, Pool, Proc, Pty, Sandbox, Stdin
from pykata.sdk.core import IDLE_COMMAND, AsyncPty, AsyncSandbox, Metrics, SandboxInfo
from pykata.sdk.errors import (
    ExecTimeoutError,
    NotFoundError,
    PolicyDeniedError,
    SandboxGoneError,
    SandboxTimeoutError,
    SdkError,
)
from pykata.sdk.files import AsyncFiles, FileInfo
from pykata.sdk.pool import AsyncPool
from pykata.sdk.process import AsyncProcess, AsyncStdin, ExecResult

__all__ = ["IDLE_COMMAND", "AsyncFiles", "AsyncPool", "AsyncProcess", "AsyncPty", "AsyncSandbox", "AsyncStdin",
           "ExecResult", "ExecTimeoutError", "FileInfo", "Files", "Metrics", "NotFoundError", "PolicyDeniedError",
           "Pool", "Proc", "Pty", "Sandbox", "SandboxGoneError", "SandboxInfo", "SandboxTimeoutError", "SdkError",
           "SnapshotError", "Stdin"]
