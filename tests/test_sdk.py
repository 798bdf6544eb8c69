"""The Python API: disposable VM sandboxes from code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pykata
from pykata.sdk import ExecTimeoutError

pytestmark = [pytest.mark.vm]


def test_sync_sandbox_exec_stream_and_timeout() -> None:
    with pykata.Sandbox(image="busybox") as sb:
        r = sb.exec(["sh", "-c", "echo hi; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"hi\n", b"err\n")
        assert sb.exec(["cat"], stdin=b"data in").stdout == b"data in"
        # state persists between execs: it is one VM and one container
        sb.exec(["sh", "-c", "echo kept > /tmp/f"])
        assert sb.exec(["cat", "/tmp/f"]).stdout == b"kept\n"
        items = list(sb.stream(["sh", "-c", "echo a; echo b >&2"]))
        assert ("stdout", b"a\n") in items and ("stderr", b"b\n") in items and items[-1] == ("exit", b"0")
        with pytest.raises(ExecTimeoutError):
            sb.exec(["sleep", "30"], timeout=1)
        sb_id = sb.id
    assert sb_id


async def test_async_sandbox() -> None:
    async with pykata.AsyncSandbox(image="busybox", env=["GREETING=hello"]) as sb:
        r = await sb.exec(["sh", "-c", "echo $GREETING"])
        assert r.ok and r.stdout == b"hello\n"


def test_unknown_image_raises_before_any_vm() -> None:
    with pytest.raises(pykata.PykataError, match="unknown image"), pykata.Sandbox(image="nope"):
        pass


INTERRUPT_DURING_BOOT = r"""
import json, os, signal, threading, asyncio
import pykata
from pykata.sandbox import Sandbox as VmSandbox

seen = {}
real_create_container = VmSandbox.create_container

async def interrupted_create_container(self, *args, **kwargs):
    # the VM runs and its agent answers; Ctrl-C arrives before the sandbox's container exists
    seen.update(vmm_pid=self.vm.pid, dir=str(self.dir), loop_thread=threading.current_thread().name)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(120)
    return await real_create_container(self, *args, **kwargs)

VmSandbox.create_container = interrupted_create_container
try:
    with pykata.Sandbox(image="busybox"):
        outcome = "booted"
except KeyboardInterrupt:
    outcome = "interrupted"

def vm_alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu" in f.read()
    except OSError:
        return False

# checked here, before this process exits: the cleanup happened before KeyboardInterrupt reached us
print(json.dumps({"outcome": outcome, "threads": [t.name for t in threading.enumerate()],
                  "vm_alive": vm_alive(seen["vmm_pid"]), "dir_exists": os.path.exists(seen["dir"]), **seen}))
"""


def test_ctrl_c_during_boot_cancels_it_and_leaves_no_vm_dir_or_thread() -> None:
    p = subprocess.run([sys.executable, "-c", INTERRUPT_DURING_BOOT], capture_output=True, timeout=240)
    assert p.returncode == 0, p.stderr.decode()
    got = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert got["outcome"] == "interrupted"
    assert got["loop_thread"] == "pykata-sdk-loop"
    assert got["threads"] == ["MainThread"]  # the shared loop thread ended with its last sandbox
    assert got["vm_alive"] is False and got["dir_exists"] is False
    assert not Path(got["dir"]).exists()
