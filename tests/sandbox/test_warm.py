"""A warm-pool VM (Sandbox.create_warm, what pykata.shim.pooled holds): reseeded and warmed up (a
throwaway container in the guest) before it is paused; the warm-up leaves nothing in the guest, is
refused once the VM serves a pod, and the pod sees the boot id the VM got when it was pooled."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest

from pykata.config import load_config
from pykata.errors import AgentError
from pykata.factory import pool
from pykata.images import ImageStore
from pykata.resources.rootimage import RootImageCache, source_for
from pykata.sandbox import Sandbox, build_spec
from pykata.sandbox.process import Process
from tests.vmfactory import VmFactory

pytestmark = [pytest.mark.vm]


async def _output(proc: Process) -> str:
    out = b""
    async for chunk in proc.chunks():
        out += chunk
    assert await proc.wait() == 0, out
    return out.decode()


async def test_a_pooled_vm_is_reseeded_and_warmed_and_keeps_nothing_of_it(vm_factory: VmFactory) -> None:
    base = load_config()
    runtime = Path(tempfile.mkdtemp(prefix="pkwarm", dir="/tmp"))  # short: unix socket paths
    config = dataclasses.replace(
        base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(runtime)),
        agent=dataclasses.replace(base.agent, pykata=dataclasses.replace(base.agent.pykata,
                                                                        debug_console_enabled=True)))
    directory = runtime / "pool" / "pool-0123456789ab"
    directory.parent.mkdir(parents=True)
    try:
        sb = await Sandbox.create_warm(config, directory)
    except BaseException:
        shutil.rmtree(runtime, ignore_errors=True)
        raise
    try:
        assert sb.vm is not None
        vm_factory.track(sb.vm)
        assert sb.reseed is not None, "a pooled VM is reseeded before it waits"
        # a second warm-up of the same throwaway container works: the first left no crun state,
        # mount or cgroup in its way
        await sb.vm.resume()
        await sb.agent.warm_up()
        await sb.vm.pause()

        await sb.adopt("warmpod", serve_proxy=False)
        with pytest.raises(AgentError, match="already serves a pod"):
            await sb.agent.warm_up()
        # nothing of the throwaway container in the guest: mounts, crun state, bundle, cgroup
        pid = await sb.agent.start_debug_console("dbg-1", ["sh", "-c",
                                                           "grep -c warm /proc/mounts; "
                                                           "ls /run/pykata-agent/crun /run/pykata-agent/bundles; "
                                                           "find /run/pykata-agent/storage -mindepth 1; "
                                                           "ls -d /sys/fs/cgroup/pykata/* 2>&1; true"])
        listing = await _output(Process(sb.agent, "", "dbg-1", pid, False))
        # both throwaways: the agent's WarmUp's (pykata-warmup) and, with image slots, the one that took
        # CreateContainer's path (sandbox.WARM_UP_CONTAINER, pykata-pool-warm-up), which the former
        # check's name missed; nor their storage/<id> directories (the agent removes them with the container)
        assert listing.splitlines()[0] == "0" and "warm" not in listing, listing
        # the pod's container sees the boot id given at pooling time
        image = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
        spec = build_spec(["cat", "/proc/sys/kernel/random/boot_id"], env=["PATH=/bin"])
        c = await sb.create_container("c1", spec, image)
        await c.start()
        assert (await _output(c.init)).strip() == sb.reseed.boot_id
    finally:
        await sb.stop(remove=True)
        shutil.rmtree(runtime, ignore_errors=True)


async def _slot_magic(sb: Sandbox, slot: int, name: str) -> str:
    """The ext4 magic bytes of image slot `slot` as the guest reads the disk now ("53 ef" for an
    image, "00 00" for an empty slot), through the debug console (outside any container)."""
    script = (f"for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = pkroot{slot} ] && "
              "dev=/dev/${d##*/}; done; blockdev --flushbufs $dev && od -A n -j 1080 -N 2 -t x1 $dev")
    pid = await sb.agent.start_debug_console(name, ["sh", "-c", script])
    return " ".join((await _output(Process(sb.agent, "", name, pid, False))).split())


async def test_a_pooled_vm_holds_the_recent_image_and_a_pod_of_another_never_sees_it(
        vm_factory: VmFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = load_config()
    runtime = Path(tempfile.mkdtemp(prefix="pkfill", dir="/tmp"))  # short: unix socket paths
    config = dataclasses.replace(
        base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(runtime)),
        factory=dataclasses.replace(base.factory, pool_size=1, pool_prefill_image=True),
        agent=dataclasses.replace(base.agent, pykata=dataclasses.replace(base.agent.pykata,
                                                                        debug_console_enabled=True)))
    if not config.runtime.root_slots:
        pytest.fail("this test needs image slots (runtime.rootfs_block_slots, rootfs_upper = guest)")
    busybox = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    # images of their own (the builtin busybox is the warm-up's, in a slot of every pooled VM)
    recent, other = tmp_path / "recent", tmp_path / "other"
    for tree in (recent, other):
        shutil.copytree(busybox, tree, symlinks=True)
    disks = RootImageCache(config.runtime, config.image)
    source = source_for(recent, tmp_path / "unused", config.runtime.cache_path)
    assert source is not None
    key = disks.ensure(source).key
    (runtime / "pool").mkdir(parents=True)
    pool.remember_image(config, key)
    assert pool.recent_image(config) == key
    marks = tmp_path / "marks"
    monkeypatch.setenv("PYKATA_TIMING_FILE", str(marks))
    spec = build_spec(["sh", "-c", "echo ok"], env=["PATH=/bin"])
    try:
        # a pod of the recent image: its slot was filled while the VM was made, nothing at hand-out
        sb = await Sandbox.create_warm(config, runtime / "pool" / "pool-00000000000a")
        try:
            assert sb.vm is not None
            vm_factory.track(sb.vm)
            assert len(sb.root_slots.tentative()) == 1
            marks.unlink(missing_ok=True)
            await sb.adopt("fillsame", serve_proxy=False)
            c = await sb.create_container("c1", spec, recent)
            assert "rootfs.slot" not in marks.read_text(), "a pre-filled image was put in a slot again"
            assert sb.root_slots.tentative() == []
            await c.start()
            assert (await _output(c.init)).strip() == "ok"
        finally:
            await sb.stop(remove=True)
        # a pod of another image: the pre-filled slot is empty before its first container exists
        sb = await Sandbox.create_warm(config, runtime / "pool" / "pool-00000000000b")
        try:
            assert sb.vm is not None
            vm_factory.track(sb.vm)
            [prefilled] = sb.root_slots.tentative()
            await sb.adopt("fillother", serve_proxy=False)
            c = await sb.create_container("c2", spec, other)
            assert sb.root_slots.tentative() == []
            [own] = [s for s, (_, users) in sb.root_slots.holding().items() if "c2" in users]
            assert own != prefilled
            assert await _slot_magic(sb, own, "dbg-own") == "53 ef"  # the check sees an image
            assert await _slot_magic(sb, prefilled, "dbg-pre") == "00 00", "the pod sees an image it never used"
            # the pool's next VMs pre-fill the image of this pod's first container
            assert pool.recent_image(config) not in (None, key)
            await c.start()
            assert (await _output(c.init)).strip() == "ok"
        finally:
            await sb.stop(remove=True)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def test_an_adopt_refused_for_a_taken_id_stops_the_pooled_vm_and_leaves_the_owner_of_the_id_alone(
        vm_factory: VmFactory) -> None:
    """Sandbox.adopt stops the pooled sandbox on every failure, as it says: one refused because the id's
    sandboxes/<id> exists (a live owner's) or is no sandbox id too, not only those after the link was
    made. Its directory goes; the id's owner keeps its directory and record."""
    import os
    import time

    from pykata.errors import InvalidArgument, SandboxError
    from pykata.sandbox import sandboxes_dir, state

    base = load_config()
    runtime = Path(tempfile.mkdtemp(prefix="pkwarm", dir="/tmp"))
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(runtime)))
    (runtime / "pool").mkdir(parents=True)
    taken = sandboxes_dir(config) / "takenpod"
    taken.mkdir(parents=True)
    record = state.SandboxRecord(id="takenpod", owner_pid=os.getpid(), created_at=time.time(), status="running")
    state.save(taken, record)
    try:
        for i, (sid, error) in enumerate((("takenpod", SandboxError), ("../escape", InvalidArgument))):
            directory = runtime / "pool" / f"pool-0123456789a{i}"
            sb = await Sandbox.create_warm(config, directory)
            assert sb.vm is not None
            vm_factory.track(sb.vm)
            try:
                with pytest.raises(error):
                    await sb.adopt(sid, serve_proxy=False)
                assert sb.vm.exited.done(), f"adopt({sid!r}) failed and left the pooled VM running"
                assert not directory.exists()
            finally:
                await sb.stop(remove=True)
        assert state.load(taken) == record
        assert not (runtime / "escape").exists()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
