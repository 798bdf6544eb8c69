"""What an SDK sandbox's owner leaves when it is interrupted or killed: nothing. A close cut short by a
second Ctrl-C finishes synchronously (Sandbox.teardown_now); an owner killed with SIGKILL has its VM
ended by the PID-namespace lifeline and its mounts and directory removed by its reaper
(pykata.sandbox.reaper), without anyone running `pykata cleanup`."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pykata.resources.mounts import mounts_under
from tests.sdk.test_sandbox import VM_ALIVE

pytestmark = [pytest.mark.vm]

SECOND_CTRL_C_DURING_CLOSE = r"""
import asyncio, json, os, signal, threading, time
from pykata.sdk import AsyncSandbox

seen = {}

async def main():
    sb = AsyncSandbox(image="busybox")
    async with sb:
        seen.update(dir=str(sb._sandbox.dir), vmm_pid=sb._sandbox.vm.pid)

        def interrupt_twice():
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGINT)  # asyncio.run cancels main(): `async with` closes
            while sb._closing is None:
                time.sleep(0.005)
            # while the close runs: asyncio.run raises KeyboardInterrupt and cancels every task left
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_twice, daemon=True).start()
        await sb.run("sleep 1000")

try:
    asyncio.run(main())
    outcome = "ran"
except KeyboardInterrupt:
    outcome = "interrupted"

""" + VM_ALIVE + r"""
# checked before this process exits (its reaper cleans up only after that): the close went to the end
mounts = sum(f" {seen['dir']}" in line for line in open("/proc/self/mountinfo"))
print(json.dumps({"outcome": outcome, "dir_exists": os.path.exists(seen["dir"]), "mounts": mounts,
                  "vm_alive": vm_alive(seen["vmm_pid"]), **seen}))
"""


def test_a_second_ctrl_c_during_the_async_close_still_removes_the_mounts_and_directory() -> None:
    """Seen when pytest's asyncio runner was interrupted in tests/sdk: QEMU died (lifeline) but the
    sandbox directory and its 3 mounts stayed until `pykata cleanup`."""
    p = subprocess.run([sys.executable, "-c", SECOND_CTRL_C_DURING_CLOSE], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    got = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert got["outcome"] == "interrupted"
    assert (got["vm_alive"], got["dir_exists"], got["mounts"]) == (False, False, 0), got


# Starts a sandbox, says where it lives, and waits to be killed.
_OWNER = """
import json, time, pykata
sb = pykata.Sandbox(image="busybox").start()
print(json.dumps({"id": sb.id, "dir": str(sb._async._sandbox.dir)}), flush=True)
time.sleep(600)
"""


def _processes_naming(sandbox_id: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if sandbox_id in cmd and "pykata.sandbox.reaper" not in cmd:
            found.append(f"{p.pid} {cmd[:100]}")
    return found


def _wait_gone(directory: Path, sandbox_id: str, timeout: float) -> list[str]:
    """What is left of the sandbox once it is all gone or `timeout` passed (empty: nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        left = ([f"dir {directory}"] if directory.exists() else []) + \
               [f"mount {m}" for m in mounts_under(directory)] + _processes_naming(sandbox_id)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_a_sigkilled_owner_leaves_no_vm_mount_or_directory() -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 240)
        assert ready, "the sandbox did not start within 240 s"
        made = json.loads(owner.stdout.readline())
        directory = Path(made["dir"])
        assert mounts_under(directory) and _processes_naming(made["id"])
        owner.kill()  # SIGKILL: nothing of it runs to clean up
        owner.wait()
        # before: QEMU died (lifeline); the directory and its mounts stayed until `pykata cleanup`
        assert _wait_gone(directory, made["id"], 60) == []
        assert made["id"] not in subprocess.run([str(Path(sys.executable).parent / "pykata"), "cleanup"],
                                                capture_output=True, text=True, check=True).stdout
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
