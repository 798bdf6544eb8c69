"""A long-lived pod that creates and removes containers keeps nothing of them in the agent's
storage directory: <state>/storage/<container id> goes with the container, and with a create that
failed after its storages were mounted (measured on pooled starts: one empty directory was left per
removed container, the pool's warm-up container's included)."""

from __future__ import annotations

import dataclasses

import pytest

from pykata.config import load_config
from pykata.errors import AgentError
from pykata.images import ImageStore
from pykata.sandbox import Sandbox, build_spec
from pykata.sandbox.ocispec import GUEST_STORAGE_DIR
from pykata.sandbox.process import Process

pytestmark = [pytest.mark.vm]


async def _listing(sb: Sandbox, name: str) -> list[str]:
    """The entries of the agent's storage directory, seen from the guest itself (debug console)."""
    pid = await sb.agent.start_debug_console(name, ["sh", "-c", f"ls -A {GUEST_STORAGE_DIR}"])
    proc = Process(sb.agent, "", name, pid, False)
    out = b"".join([chunk async for chunk in proc.chunks()])
    assert await proc.wait() == 0, out
    return out.decode().split()


async def test_removed_and_failed_containers_leave_no_storage_dir() -> None:
    base = load_config()
    config = dataclasses.replace(base, agent=dataclasses.replace(base.agent, pykata=dataclasses.replace(
        base.agent.pykata, debug_console_enabled=True)))
    busybox = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        keep = await sb.create_container("keep", build_spec(["sleep", "600"], env=["PATH=/bin"]), busybox)
        await keep.start()
        for i in range(3):
            c = await sb.create_container(f"gone{i}", build_spec(["true"], env=["PATH=/bin"]), busybox)
            await c.start()
            assert await c.wait() == 0
            await c.delete()
        # crun create refuses a missing executable: after the agent mounted the container's storages
        with pytest.raises(AgentError):
            await sb.create_container("failed", build_spec(["/no/such/program"], env=["PATH=/bin"]), busybox)
        assert await _listing(sb, "dbg-1") == ["keep"]
        await keep.delete()
        assert await _listing(sb, "dbg-2") == []
    finally:
        await sb.stop()
