"""The host's shared directory is mounted in the guest by the first container that needs it (agent
protocol 10), not by CreateSandbox: a container whose root is on an image disk and that has no host
volume leaves it unmounted; containers that need it, created at once, get one mount between them,
which stays for the sandbox when they are removed. In a real (templated) VM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pykata.config import load_config
from pykata.images.store import ImageStore
from pykata.sandbox.ocispec import GUEST_SHARED_DIR, Volume, build_spec
from pykata.sandbox.sandbox import Container, Sandbox

pytestmark = [pytest.mark.vm]

# run in the guest's pid namespace (the spec has none of its own): PID 1's mounts are the agent's
PROBE = f"grep -c ' {GUEST_SHARED_DIR} 9p ' /proc/1/mounts; cat /vol/f 2>/dev/null; true"


def _spec() -> dict[str, Any]:
    spec = build_spec(["sh", "-c", PROBE], env=["PATH=/bin"])
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"]
    return spec


async def _output(c: Container) -> str:
    await c.start()
    out = b"".join([chunk async for chunk in c.init.chunks()]).decode()
    assert await c.wait() == 0, out
    await c.delete()
    return out


async def test_share_is_mounted_once_by_the_first_containers_that_need_it(tmp_path: Path) -> None:
    config = load_config()
    busybox = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("from the host\n")
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        assert sb.agent.supports(10)
        # a root on an image disk and no host volume: nothing mounts the share
        out = await _output(await sb.create_container("disk", _spec(), busybox))
        assert out == "0\n", out
        # two containers with a host volume, created at once: one mount between them, both see the file
        both = await asyncio.gather(*(sb.create_container(cid, _spec(), busybox, volumes=[Volume(vol, "/vol")])
                                      for cid in ("vol1", "vol2")))
        for c in both:
            assert await _output(c) == "1\nfrom the host\n"
        # removed with them? no: it is the sandbox's
        out = await _output(await sb.create_container("after", _spec(), busybox))
        assert out == "1\n", out
    finally:
        await sb.stop()
