"""Container roots on image disks in a real (templated) VM: each image takes a slot, an image while
every slot is in use goes through the shared directory, and an idle slot is refilled with another
image, which the guest then reads (not its cached blocks of the one before)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pykata.config import load_config
from pykata.images.store import ImageStore
from pykata.sandbox.ocispec import GUEST_SHARED_DIR, build_spec
from pykata.sandbox.sandbox import Sandbox

pytestmark = [pytest.mark.vm]

PROBE = "grep ' / ' /proc/mounts; cat /marker 2>&1"


async def _run(sb: Sandbox, cid: str, rootfs: Path) -> str:
    c = await sb.create_container(cid, build_spec(["sh", "-c", PROBE], env=["PATH=/bin"]), rootfs)
    await c.start()
    out = b"".join([chunk async for chunk in c.init.chunks()]).decode()
    assert await c.wait() == 0, out
    await c.delete()
    return out


async def test_slots_fill_run_out_and_refill(tmp_path: Path) -> None:
    config = load_config()
    slots = config.runtime.rootfs_block_slots
    busybox = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    images = []
    for i in range(slots + 1):
        image = tmp_path / f"image{i}"
        shutil.copytree(busybox, image, symlinks=True)
        (image / "marker").write_text(f"image {i}\n")
        images.append(image)
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        # every slot in use by a running container of its own image
        for i in range(slots):
            c = await sb.create_container(f"keep{i}", build_spec(["sleep", "600"], env=["PATH=/bin"]), images[i])
            await c.start()
        assert sorted(users for _, users in sb.root_slots.holding().values()) == sorted(
            frozenset({f"keep{i}"}) for i in range(slots))
        # one image more: through the shared directory
        out = await _run(sb, "over", images[slots])
        assert f"lowerdir={GUEST_SHARED_DIR}/over/rootfs" in out and f"image {slots}" in out, out
        # an idle slot takes the next image; the guest reads the new disk, not what it cached
        await sb.containers["keep0"].delete()
        out = await _run(sb, "refilled", images[slots])
        assert "storage/refilled/lower" in out and f"image {slots}" in out, out
        out = await _run(sb, "back", images[0])
        assert "storage/back/lower" in out and "image 0" in out, out
        # containers of one image share its slot
        out = await _run(sb, "same", images[1])
        assert "storage/same/lower" in out and "image 1" in out, out
        assert sum(key is not None for key, _ in sb.root_slots.holding().values()) == slots
    finally:
        await sb.stop()
