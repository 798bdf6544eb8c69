"""Resizing a running sandbox (balloon memory, onlined CPUs) on real VMs: the guest's MemTotal and
`nproc` follow, the host gets shrunk memory back, a clone's balloon never touches its template's
memory file, resizes racing each other and stops neither hang nor leak."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

import pykata
from pykata.config import Config, load_config
from pykata.errors import HypervisorError, InvalidArgument, PykataError
from pykata.factory import find_template
from pykata.hypervisor.qemu.balloon import MIN_MEMORY_MIB
from pykata.hypervisor.qemu.clonememory import keep_template_intact
from pykata.resources import sizing

pytestmark = [pytest.mark.vm]
MIB = 1 << 20


def elastic_config(**qemu: object) -> Config:
    base = load_config()
    q = dataclasses.replace(base.qemu, **{"default_memory": 1024, "default_maxmemory": 1536,
                                           "default_maxvcpus": 2, **qemu})  # type: ignore[arg-type]
    return dataclasses.replace(base, hypervisor=dataclasses.replace(base.hypervisor, qemu=q))


async def mem_total_mib(sb: pykata.AsyncSandbox) -> int:
    out = (await sb.run("grep MemTotal /proc/meminfo")).stdout.split()
    return int(out[1]) // 1024


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def test_punch_hole_filter_fakes_success_without_touching_the_file(tmp_path: Path) -> None:
    """The clone's QEMU filter, in a real child: fallocate(PUNCH_HOLE) returns 0 and the data stays;
    other fallocate modes still work."""
    f = tmp_path / "memory"
    f.write_bytes(b"T" * 65536)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            keep_template_intact()
            fd = os.open(f, os.O_RDWR)
            os.posix_fallocate(fd, 0, 131072)  # mode 0: still allowed (grows the file)
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.fallocate(fd, 0x01 | 0x02, ctypes.c_long(0), ctypes.c_long(65536))  # KEEP_SIZE|PUNCH_HOLE
            os._exit(0 if rc == 0 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert f.read_bytes()[:65536] == b"T" * 65536 and f.stat().st_size == 131072


# A QEMU taken over by its guest punching a hole into the template's memory file through i386's
# `int $0x80` (fallocate is 324 there, not 285): the filter checked x86_64's numbers only and let it by.
# i386 fallocate takes 6 arguments (offset and length as two 32-bit halves each), the sixth in ebp.
I386_PUNCH_PROBE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    long fd = open(argv[1], O_RDWR), len = 65536, zero = 0, r;
    if (fd < 0) return 3;
    __asm__ volatile("push %%rbp\n\tmov %[hi], %%rbp\n\tint $0x80\n\tpop %%rbp"
                     : "=a"(r) : "a"(324L), "b"(fd), "c"(3L /* KEEP_SIZE|PUNCH_HOLE */), "d"(zero), "S"(zero),
                       "D"(len), [hi] "r"(zero) : "memory");
    printf("%ld\n", r);
    return 0;
}
"""


def test_punch_hole_filter_refuses_i386_calls(tmp_path: Path) -> None:
    """The same hole punched with an i386 call: ENOSYS under the clone's filter, the data stays;
    without the filter (the control: the probe is sound) the hole is punched."""
    probe = tmp_path / "probe"
    (tmp_path / "probe.c").write_text(I386_PUNCH_PROBE)
    subprocess.run(["cc", "-O1", "-mno-red-zone", "-o", str(probe), str(tmp_path / "probe.c")], check=True,
                   timeout=60)
    f = tmp_path / "memory"
    for guard, want, data in ((keep_template_intact, -errno.ENOSYS, b"T"), (None, 0, b"\0")):
        f.write_bytes(b"T" * 65536)
        out = subprocess.run([str(probe), str(f)], preexec_fn=guard, capture_output=True, text=True, timeout=30,
                             check=True).stdout
        assert int(out) == want, (guard, out)
        assert f.read_bytes() == data * 65536, guard


async def test_memory_and_cpus_follow_resizes_in_a_template_clone() -> None:
    config = elastic_config()
    async with pykata.AsyncSandbox(image="busybox", memory_mib=512, cpus=1, config=config) as sb:
        inner = sb._own("test")
        vm = inner.vm
        assert vm is not None and vm.restore_source is not None, "a template clone (sized after restore)"
        template = await find_template(config)
        assert template is not None
        blocks_before = template.memory.stat().st_blocks
        assert abs(await mem_total_mib(sb) - 512) <= 128
        assert (await sb.run("nproc")).stdout == b"1\n"

        # grow, shrink: MemTotal and nproc follow
        timings = []
        for memory, cpus in ((1400, 2), (700, 1), (1024, 2)):
            started = time.monotonic()
            assert await sb.resize(memory_mib=memory, cpus=cpus) == (memory, cpus)
            timings.append(time.monotonic() - started)
            assert abs(await mem_total_mib(sb) - memory) <= 128, memory
            assert (await sb.run("nproc")).stdout == f"{cpus}\n".encode()
        assert await sb.resize(memory_mib=1024, cpus=2) == (1024, 2)  # the same size: a no-op

        # the host gets memory back: fill 300 MiB in the guest, free it, shrink
        assert vm.pid is not None
        before = rss_mib(vm.pid)
        await sb.run("dd if=/dev/urandom of=/tmp/fill bs=1M count=300 2>/dev/null")
        filled = rss_mib(vm.pid)
        assert filled - before >= 200, (before, filled)
        await sb.run("rm /tmp/fill")
        await sb.resize(memory_mib=600)
        await asyncio.sleep(3)  # free page reporting batches what is left every 2 s
        assert rss_mib(vm.pid) < filled - 200, (before, filled, rss_mib(vm.pid))

        # the clone gave pages back without punching them out of the template's memory file: it kept
        # every block. It may gain some: a clone's (this one's or an idle pooled VM's) read fault on a
        # hole of the tmpfs file allocates a zero page there; QEMU holds the file read-only
        # (`pykata check template-memory`), so no clone writes it
        assert template.memory.stat().st_blocks >= blocks_before

        # outside what the VM can have: refused, nothing changed
        with pytest.raises(HypervisorError, match="default_maxmemory"):
            await sb.resize(memory_mib=4096)
        with pytest.raises(HypervisorError, match=r"outside 128\.\.1536"):
            await inner.resize(memory_mib=64)
        assert inner.vm is not None and inner.vm.memory_mib == 600
        print(f"resize latencies: {[round(t, 2) for t in timings]}")


async def test_racing_resizes_and_stops() -> None:
    """20 resizes and 3 stops at once: every call ends (bounded), the successful resizes are a prefix of
    the calls in order, the VM's size is the last one that succeeded, nothing is left (session check)."""
    config = elastic_config()
    sb = pykata.AsyncSandbox(image="busybox", config=config)
    await sb.start()
    inner = sb._own("test")
    vm = inner.vm
    assert vm is not None
    rng = random.Random(15)
    targets = [rng.choice((256, 512, 768, 1024, 1280, 1536)) for _ in range(20)]
    results: list[int | BaseException] = [0] * 20

    async def resize(i: int) -> None:
        try:
            results[i] = (await inner.resize(memory_mib=targets[i]))[0]
        except PykataError as exc:
            results[i] = exc

    tasks = [asyncio.ensure_future(resize(i)) for i in range(20)]
    await asyncio.sleep(0.3)  # some resizes are through, some wait for the lock
    stops = [asyncio.ensure_future(sb.close()) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*tasks, *stops), 60)
    done = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert done == list(range(len(done))), results  # in call order, none after a failed one
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            assert "stop" in str(r) or "gone" in str(r) or "no running VM" in str(r), r
        else:
            assert r == targets[i]
    if done:
        assert vm.memory_mib == targets[done[-1]]
    assert vm.pid is None and vm.exited.done()


async def test_resizes_in_a_row_end_at_the_last() -> None:
    config = elastic_config()
    async with pykata.AsyncSandbox(image="busybox", config=config) as sb:
        inner = sb._own("test")
        targets = [1536, 256, 1280, 512, 900]
        got = await asyncio.gather(*(inner.resize(memory_mib=t) for t in targets))
        assert [m for m, _ in got] == targets
        assert inner.vm is not None
        actual = await inner.vm._balloon.actual(inner.vm.qmp)  # type: ignore[attr-defined]
        assert abs(actual - 900) <= 1 and abs(await mem_total_mib(sb) - 900) <= 128


@pytest.mark.parametrize("memory_mib", [1, 127, 0, -5, True, 1.5])
def test_a_vm_size_below_the_floor_or_not_a_number_names_its_field(memory_mib: object) -> None:
    with pytest.raises(InvalidArgument, match=r"^memory_mib: "):
        sizing.vm_size(None, memory_mib, vcpus_source="cpus", memory_source="memory_mib")  # type: ignore[arg-type]
    assert sizing.vm_size(2, MIN_MEMORY_MIB, vcpus_source="cpus", memory_source="memory_mib").memory_mib == 128


def test_status_reads_a_microvms_size_from_its_command_line() -> None:
    """A microvm has every vCPU from boot and brings up `maxcpus=` of them: `sandbox ls` and the monitor
    report that as its vCPUs, and bound the guest's figures by all of them."""
    from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths, build_command_line
    from pykata.sandbox.status import vm_max_vcpus, vm_shape

    q = dataclasses.replace(load_config().qemu, default_vcpus=1, default_maxvcpus=4, default_memory=512,
                            default_maxmemory=1024)
    argv = build_command_line(LaunchSpec(vm_id="x", config=q, accel="tcg", kernel=Path("/k"),
                                         paths=VmPaths(Path("/run/x")))).argv()
    assert vm_shape(argv)[:2] == (1, 1024) and vm_max_vcpus(argv) == 4
