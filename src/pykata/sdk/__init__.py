"""Disposable VM sandboxes from Python code.

    import pykata
    with pykata.Sandbox(image="busybox") as sb:
        result = sb.exec(["sh", "-c", "echo hi"])
        print(result.exit_code, result.stdout)          # 0 b'hi\\n'

    async with pykata.AsyncSandbox(image="busybox") as sb:
        result = await sb.exec(["echo", "hi"], timeout=10)
        async for stream, chunk in sb.stream(["sh", "-c", "for i in 1 2 3; do echo $i; done"]):
            ...

Each sandbox is one VM running the image's container with a long-lived idle process; `exec` runs
commands in it. Leaving the `with` block destroys the VM and everything it used.
"""

from pykata.sdk.blocking import Sandbox
from pykata.sdk.core import IDLE_COMMAND, AsyncSandbox, ExecResult, ExecTimeoutError

__all__ = ["IDLE_COMMAND", "AsyncSandbox", "ExecResult", "ExecTimeoutError", "Sandbox"]
