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
from pykata.images import ImageStore
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
                                                           "grep -c pykata-warmup /proc/mounts; "
                                                           "ls /run/pykata-agent/crun /run/pykata-agent/bundles "
                                                           "/run/pykata-agent/storage; ls -d /sys/fs/cgroup/pykata/*"
                                                           " 2>&1; true"])
        listing = await _output(Process(sb.agent, "", "dbg-1", pid, False))
        assert listing.splitlines()[0] == "0" and "pykata-warmup" not in listing, listing
        # the pod's container sees the boot id given at pooling time
        image = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
        spec = build_spec(["cat", "/proc/sys/kernel/random/boot_id"], env=["PATH=/bin"])
        c = await sb.create_container("c1", spec, image)
        await c.start()
        assert (await _output(c.init)).strip() == sb.reseed.boot_id
    finally:
        await sb.stop(remove=True)
        shutil.rmtree(runtime, ignore_errors=True)
