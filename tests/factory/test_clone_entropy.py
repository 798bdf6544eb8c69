"""Two VMs cloned from one template must not share randomness: the host reseeds each clone
(agent ReseedRandomDev) before anything runs in it."""

from __future__ import annotations

import pytest

import pykata
from tests.vmfactory import VmFactory

pytestmark = [pytest.mark.vm]

BOOT_ID = "/proc/sys/kernel/random/boot_id"


async def test_two_clones_differ_in_boot_id_urandom_and_agent_rng(vm_factory: VmFactory) -> None:
    async with pykata.AsyncSandbox(image="busybox") as a, pykata.AsyncSandbox(image="busybox") as b:
        seen = []
        for sb in (a, b):
            sandbox = sb._sandbox
            vm_factory.track(sandbox.vm)  # checked for leftovers after the test
            assert sandbox.vm.restore_source is not None
            reseed = sandbox.reseed
            assert reseed is not None
            boot_id = (await sb.run(["cat", BOOT_ID])).stdout.decode().strip()
            # what the container sees is the clone's own boot id, the one the host gave it
            assert boot_id == reseed.boot_id
            # and it stays fixed for the VM's life (a fresh read in another process)
            assert (await sb.run(["cat", BOOT_ID])).stdout.decode().strip() == boot_id
            urandom = (await sb.run(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"])).stdout
            assert len(urandom.split()) == 32
            seen.append((boot_id, urandom, reseed.rng_sample))
        (id_a, rand_a, rng_a), (id_b, rand_b, rng_b) = seen
        assert id_a != id_b
        assert rand_a != rand_b
        # the agent's own PRNG (Python's random, restored from the template's memory) diverged too
        assert rng_a != rng_b
