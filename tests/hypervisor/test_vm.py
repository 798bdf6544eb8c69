"""The QEMU driver against real QEMU: the cached guest kernel plus a tiny busybox initrd made here."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pykata.config import Config, parse_toml
from pykata.errors import HypervisorError
from pykata.hypervisor import QemuHypervisor, QmpError, VmExitedError
from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from pykata.hypervisor.readiness import wait_for_console_line
from tests.guest_assets import guest_kernel_path
from tests.vmfactory import VmFactory

pytestmark = pytest.mark.vm

READY = "echo PYKATA_AGENT_READY\n"
IDLE_INIT = "#!/bin/sh\nmount -t proc proc /proc\n" + READY + "while true; do sleep 1000; done\n"
# A bound generous for a loaded 2-core CI machine, far below anything that would mean "hung".
STOP_BOUND = 10.0


@pytest.fixture(scope="session")
def kernel() -> Path:
    return guest_kernel_path()


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Short: unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="pkvm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def idle_initrd(workdir: Path) -> Path:
    return write_busybox_initrd(workdir / "idle.cpio", IDLE_INIT)


def make_config(workdir: Path, **qemu: object) -> Config:
    base = parse_toml(
        f"""
        [hypervisor.qemu]
        default_memory = 256
        shared_fs = "none"
        boot_timeout = 60.0
        [runtime]
        runtime_dir = "{workdir}/run"
        cache_dir = "{workdir}/cache"
        # no image slots (disks for container images) and no data disk: these VMs run no containers,
        # and tests count disks
        rootfs_block_slots = 0
        data_disk_mib = 0
        """
    )
    q = dataclasses.replace(base.qemu, **qemu)  # type: ignore[arg-type]
    return dataclasses.replace(base, hypervisor=dataclasses.replace(base.hypervisor, qemu=q))


_counter = iter(range(1_000_000))


@pytest.fixture
def make_vm(vm_factory: VmFactory, workdir: Path, kernel: Path) -> object:
    """VMs from the per-test factory (tests/vmfactory.py): stopped and checked for leftovers at the end."""

    def build(initrd: Path, config: Config | None = None, **kwargs: object) -> QemuHypervisor:
        kwargs.setdefault("kernel", kernel)
        return vm_factory.build(f"t{os.getpid()}-{next(_counter)}", config or make_config(workdir), initrd=initrd,
                                **kwargs)

    return build


async def boot(vm: QemuHypervisor, timeout: float = 60.0) -> QemuHypervisor:
    await vm.prepare()
    await vm.start()
    await vm.wait_ready(timeout)
    return vm


async def test_boot_and_stop(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    vm = await boot(make_vm(idle_initrd))
    pid = vm.pid
    assert pid is not None and psutil.pid_exists(pid)
    assert vm.paths.qmp_socket.exists() and vm.paths.agent_socket.exists()
    status = await vm.qmp.execute("query-status")
    assert status["status"] == "running"
    assert vm.agent_endpoint.kind == "virtio-serial"
    assert vm.agent_endpoint.socket == vm.paths.agent_socket
    started = time.monotonic()
    result = await vm.stop()
    assert time.monotonic() - started < STOP_BOUND
    assert result is not None and result.requested
    assert "host-qmp-quit" in result.reason
    assert vm.exited.done()
    assert not psutil.pid_exists(pid)
    assert not vm.paths.dir.exists()
    assert vm.pid is None
    # Stopped already: returns at once with the same answer.
    assert await vm.stop() == result


async def test_twenty_concurrent_stops(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    vm = await boot(make_vm(idle_initrd))
    pid = vm.pid
    assert pid is not None
    started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(vm.stop() for _ in range(20))), STOP_BOUND)
    assert time.monotonic() - started < STOP_BOUND
    assert len({id(r) for r in results}) == 1 and results[0] is not None
    assert not psutil.pid_exists(pid)
    assert not vm.paths.dir.exists()
    assert not any(p.exists() for p in (vm.paths.qmp_socket, vm.paths.agent_socket, vm.paths.console_log))


async def test_stop_in_every_early_state(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    fresh = make_vm(idle_initrd)
    assert await fresh.stop() is None
    prepared = make_vm(idle_initrd)
    await prepared.prepare()
    assert prepared.paths.dir.exists()
    assert await prepared.stop() is None
    assert not prepared.paths.dir.exists()
    with pytest.raises(HypervisorError):
        await prepared.start()
    # Stop while the guest is still booting (not ready yet).
    booting = make_vm(idle_initrd)
    await booting.prepare()
    await booting.start()
    pid = booting.pid
    assert pid is not None
    await asyncio.wait_for(booting.stop(), STOP_BOUND)
    assert not psutil.pid_exists(pid)


async def test_stop_cancelled_caller_still_finishes(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    vm = await boot(make_vm(idle_initrd))
    pid = vm.pid
    task = asyncio.ensure_future(vm.stop())
    await asyncio.sleep(0)
    task.cancel()
    # Another caller waits for the same (shielded) teardown.
    await asyncio.wait_for(vm.stop(), STOP_BOUND)
    assert pid is not None and not psutil.pid_exists(pid)
    assert not vm.paths.dir.exists()


async def test_kill_from_outside_is_noticed(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    vm = await boot(make_vm(idle_initrd))
    pid = vm.pid
    assert pid is not None
    # A frozen QEMU never answers: these calls are pending when it dies.
    os.kill(pid, signal.SIGSTOP)
    pending = [asyncio.ensure_future(vm.qmp.execute("query-status", timeout=60)) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert not any(p.done() for p in pending)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    exit_info = await asyncio.wait_for(vm.exited, 5)
    assert exit_info.code == -signal.SIGKILL
    assert "SIGKILL" in exit_info.reason
    assert not exit_info.requested
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
    assert time.monotonic() - killed_at < 2.0, "pending QMP calls waited for their timeout"
    assert all(isinstance(r, QmpError) for r in results)
    with pytest.raises(HypervisorError):
        await vm.qmp.execute("query-status")
    assert await asyncio.wait_for(vm.stop(), STOP_BOUND) == exit_info
    assert not vm.paths.dir.exists()


async def test_guest_poweroff_is_reported(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    initrd = write_busybox_initrd(workdir / "poweroff.cpio", "#!/bin/sh\n" + READY + "poweroff -f\n")
    vm = await boot(make_vm(initrd))
    exit_info = await asyncio.wait_for(vm.exited, 30)
    assert exit_info.code == 0 and not exit_info.requested
    assert "guest-shutdown" in exit_info.reason
    await vm.stop()
    assert not vm.paths.dir.exists()


async def test_two_hundred_concurrent_qmp_calls(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    vm = await boot(make_vm(idle_initrd))

    async def one(i: int) -> bool:
        if i % 2:
            return (await vm.qmp.execute("query-status"))["status"] == "running"
        return (await vm.qmp.execute("query-name"))["name"] == f"pykata-{vm.vm_id}"

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(results)


async def test_early_exit_during_wait_ready(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    initrd = write_busybox_initrd(workdir / "dies.cpio", "#!/bin/sh\necho about to die\npoweroff -f\n")
    vm = make_vm(initrd)
    await vm.prepare()
    await vm.start()
    with pytest.raises(VmExitedError) as info:
        await vm.wait_ready(60)
    assert "about to die" in str(info.value)


async def test_not_ready_times_out_with_console_tail(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    initrd = write_busybox_initrd(workdir / "silent.cpio",
                                  "#!/bin/sh\necho still booting\nwhile true; do sleep 1000; done\n")
    vm = make_vm(initrd)
    await vm.prepare()
    await vm.start()
    await asyncio.wait_for(wait_for_console_line(vm.console_log, b"still booting"), 60)
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="not ready after") as info:
        await vm.wait_ready(0.5)
    assert time.monotonic() - started < 2.0
    assert "still booting" in str(info.value)


async def test_qemu_failing_at_start_leaves_nothing(make_vm, workdir: Path, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    bogus = workdir / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    vm = make_vm(idle_initrd, kernel=bogus)
    await vm.prepare()
    with pytest.raises(HypervisorError, match="QEMU") as info:
        await vm.start()
    assert "exited" in str(info.value) or "killed" in str(info.value)
    assert not vm.paths.dir.exists()
    assert vm.pid is None


async def test_custom_readiness_probe(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    calls: list[object] = []

    async def probe(vm: object) -> None:
        calls.append(vm)
        # The agent channel accepts a connection once QEMU runs.
        path = vm.agent_endpoint.socket  # type: ignore[attr-defined]
        _, writer = await asyncio.open_unix_connection(str(path))
        writer.close()

    vm = await boot(make_vm(idle_initrd, readiness=probe))
    assert calls == [vm]
    assert "ready" in vm.timestamps


SHARE_INIT = """#!/bin/sh
mount -t proc proc /proc
mkdir -p /share
if [ "$(cat /proc/cmdline | grep -o fs=9p)" = "fs=9p" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L kataShared /share || echo MOUNT_FAILED
else
    mount -t virtiofs kataShared /share || echo MOUNT_FAILED
fi
echo "CONTENT:$(cat /share/hello.txt)"
echo written-by-guest > /share/from-guest.txt
sync
echo PYKATA_AGENT_READY
while true; do sleep 1000; done
"""


@pytest.mark.parametrize("shared_fs", ["virtio-fs", "virtio-9p"])
async def test_shared_directory(make_vm, workdir: Path, shared_fs: str) -> None:  # type: ignore[no-untyped-def]
    initrd = write_busybox_initrd(workdir / "share.cpio", SHARE_INIT)
    shared = Path(tempfile.mkdtemp(prefix="share", dir=workdir))
    (shared / "hello.txt").write_text("hello from the host")
    params = ("fs=9p",) if shared_fs == "virtio-9p" else ()
    vm = make_vm(initrd, make_config(workdir, shared_fs=shared_fs), shared_dir=shared,
                 extra_kernel_params=params)
    await boot(vm)
    console = vm.console_log.read_text(errors="replace")
    assert "CONTENT:hello from the host" in console, console[-2000:]
    assert (shared / "from-guest.txt").read_text().strip() == "written-by-guest"
    virtiofsd = vm._sidecars.virtiofsd
    daemon = virtiofsd.child.pid if virtiofsd and virtiofsd.child else None
    assert (daemon is not None) == (shared_fs == "virtio-fs")
    if daemon is not None:
        assert psutil.pid_exists(daemon)
    await vm.stop()
    if daemon is not None:
        assert not psutil.pid_exists(daemon)
    assert not vm.paths.dir.exists()


HOTPLUG_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo PYKATA_AGENT_READY
while true; do
    set -- /sys/devices/system/cpu/cpu[0-9]*
    read -r _ kb _ < /proc/meminfo
    echo "HOTPLUG cpus=$# memkb=$kb disks=$(ls /sys/block | grep vd)."
    sleep 0.3
done
"""


async def wait_console(vm: QemuHypervisor, pattern: str, timeout: float = 30, after: int = 0) -> str:
    """The last match of `pattern` in the console output past byte `after`."""
    import re

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, vm.console_log.read_bytes()[after:].decode(errors="replace"))
        if found:
            return str(found[-1])
        await asyncio.sleep(0.1)
    raise AssertionError(f"{pattern!r} not on the console: {vm.console_log.read_text()[-500:]}")


async def test_q35_hotplug(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    from pykata.hypervisor import BlockDevice, NotSupportedError

    initrd = write_busybox_initrd(workdir / "hotplug.cpio", HOTPLUG_INIT)
    config = make_config(workdir, machine_type="q35", default_maxvcpus=2, default_maxmemory=1024,
                         memory_slots=2)
    vm = await boot(make_vm(initrd, config), timeout=90)
    before = int(await wait_console(vm, r"HOTPLUG cpus=1 memkb=(\d+)"))
    disks_before = (await wait_console(vm, r"disks=([a-z\s]*)\.")).split()  # the image slots, if any
    assert await vm.resize_vcpus(2) == 2
    cpus = await vm.qmp.execute("query-hotpluggable-cpus")
    assert all("qom-path" in c for c in cpus)
    assert await vm.resize_memory(384) == 384
    dimms = await vm.qmp.execute("query-memory-devices")
    assert [d["data"]["size"] for d in dimms] == [128 * 1024 * 1024]
    # The guest sees the new vCPU (onlining it is the agent's job) and onlines the DIMM itself.
    after = int(await wait_console(vm, r"HOTPLUG cpus=2 memkb=(\d+)"))
    assert after - before >= 120 * 1024
    disk = workdir / "disk.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    await vm.add_device(BlockDevice("disk1", disk, readonly=True))
    blocks = await vm.qmp.execute("query-block")
    assert any("disk1" in str(b.get("qdev", "")) for b in blocks), blocks
    await wait_console(vm, rf"disks=((?:vd[a-z]+\s*){{{len(disks_before) + 1}}})\.")
    # Unplug waits for the guest to release the device (PCIe hotplug in the guest kernel).
    await vm.remove_device("disk1")
    assert not any("disk1" in str(b.get("qdev", "")) for b in await vm.qmp.execute("query-block"))
    await wait_console(vm, "disks=" + r"\s+".join(disks_before) + r"\.", after=vm.console_log.stat().st_size)
    with pytest.raises(NotSupportedError):
        await vm.resize_memory(256)
    with pytest.raises(HypervisorError):
        await vm.resize_vcpus(3)


async def test_microvm_refuses_hotplug(make_vm, idle_initrd: Path, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    from pykata.hypervisor import BlockDevice, NotSupportedError

    vm = await boot(make_vm(idle_initrd))
    disk = workdir / "disk2.img"
    disk.write_bytes(b"\0" * 4096)
    with pytest.raises(NotSupportedError, match="microvm"):
        await vm.add_device(BlockDevice("disk2", disk))
    # memory moves through the balloon, within its ceiling only (tests/sandbox/test_resize.py resizes)
    with pytest.raises(HypervisorError, match="default_maxmemory"):
        await vm.resize_memory(vm.memory_ceiling_mib + 1)
    with pytest.raises(NotSupportedError):
        await vm.save(workdir / "state")


async def test_cold_plugged_disk_is_seen_by_guest(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    from pykata.hypervisor import BlockDevice

    init = ("#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n"
            "echo BLOCK:$(ls /sys/block | grep vd)\n" + READY + "while true; do sleep 1000; done\n")
    initrd = write_busybox_initrd(workdir / "blk.cpio", init)
    disk = workdir / "disk3.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    vm = make_vm(initrd)
    await vm.add_device(BlockDevice("disk3", disk, readonly=True))
    await boot(vm)
    assert "BLOCK:vda" in vm.console_log.read_text(errors="replace")


async def test_guest_shutdown_hook_runs_once_and_is_bounded(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)

    vm = await boot(make_vm(idle_initrd, guest_shutdown=hangs))
    pid = vm.pid
    started = time.monotonic()
    await asyncio.gather(*(vm.stop() for _ in range(5)))
    # The hook's 2 s deadline plus quit; never the hook's hour.
    assert time.monotonic() - started < 2.0 + STOP_BOUND / 2
    assert calls == 1
    assert pid is not None and not psutil.pid_exists(pid)


async def test_stop_of_a_frozen_qemu_is_bounded(make_vm, idle_initrd: Path) -> None:  # type: ignore[no-untyped-def]
    vm = await boot(make_vm(idle_initrd))
    pid = vm.pid
    assert pid is not None
    # QEMU stopped by a signal never answers `quit`: stop() must fall through to SIGKILL.
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    results = await asyncio.gather(*(vm.stop() for _ in range(3)))
    assert time.monotonic() - started < STOP_BOUND
    assert results[0] is not None and results[0].code == -signal.SIGKILL
    assert not psutil.pid_exists(pid)
    assert not vm.paths.dir.exists()


async def test_guest_panic_ends_the_vm(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    # PID 1 exiting panics the kernel; panic=-1 reboots at once and -no-reboot turns that into an exit.
    initrd = write_busybox_initrd(workdir / "panic.cpio", "#!/bin/sh\n" + READY + "exit 3\n")
    vm = await boot(make_vm(initrd))
    exit_info = await asyncio.wait_for(vm.exited, 30)
    assert not exit_info.requested
    assert "guest-reset" in exit_info.reason or "panic" in exit_info.reason
    assert "Attempted to kill init" in vm.console_log.read_text(errors="replace")
    await vm.stop()
    assert not vm.paths.dir.exists()
