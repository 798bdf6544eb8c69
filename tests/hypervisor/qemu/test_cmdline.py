"""Golden tests of the rendered QEMU command line. Regenerate with PYKATA_REGEN_GOLDEN=1."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pykata.config import QemuConfig, parse_toml
from pykata.hypervisor.devices import BlockDevice, NetDevice
from pykata.hypervisor.qemu import cmdline as c
from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths, build_command_line, kernel_params

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("PYKATA_REGEN_GOLDEN") == "1"
VM_DIR = VmPaths(Path("/run/pykata/vm/golden"))
KERNEL = Path("/var/cache/pykata/kernel/0123/vmlinux")
INITRD = Path("/var/cache/pykata/rootfs/4567/initrd.img")


def _qemu(**overrides: object) -> QemuConfig:
    base = parse_toml("[hypervisor.qemu]\ndefault_maxvcpus = 4\ndefault_maxmemory = 8192\n").qemu
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


CASES: dict[str, LaunchSpec] = {
    "microvm-virtiofs-serial-tcg": LaunchSpec(
        vm_id="golden", config=_qemu(default_memory=512), accel="tcg", kernel=KERNEL, initrd=INITRD,
        paths=VM_DIR, shared_dir=Path("/run/pykata/shared/golden"), agent_channel="virtio-serial",
        extra_kernel_params=("pykata.debug=0",), tsc_khz=2596150,
    ),
    "microvm-9p-vsock-kvm": LaunchSpec(
        vm_id="golden", config=_qemu(shared_fs="virtio-9p", default_vcpus=2, default_memory=1024),
        accel="kvm", kernel=KERNEL, initrd=INITRD, paths=VM_DIR, shared_dir=Path("/srv/share,odd"),
        agent_channel="vsock", vsock_cid=1234,
    ),
    "microvm-minimal-image": LaunchSpec(
        vm_id="golden", config=_qemu(shared_fs="none", enable_debug=True, kernel_params="init=/sbin/init"),
        accel="tcg", kernel=KERNEL, image=Path("/var/cache/pykata/rootfs.img"), paths=VM_DIR,
    ),
    "q35-hotplug-devices-kvm": LaunchSpec(
        vm_id="golden", config=_qemu(machine_type="q35", default_vcpus=2, default_memory=2048),
        accel="kvm", kernel=KERNEL, initrd=INITRD, paths=VM_DIR, shared_dir=Path("/run/pykata/shared/golden"),
        devices=(BlockDevice("disk0", Path("/dev/sdb"), readonly=True),
                 NetDevice("eth0", "02:00:ca:fe:00:01", tap_fd=7),
                 NetDevice("eth1", "02:00:ca:fe:00:02", tap_name="tap1")),
    ),
    "microvm-template-file": LaunchSpec(
        vm_id="golden", config=_qemu(shared_fs="none", cpu_model="Skylake-Client"), accel="tcg",
        kernel=KERNEL, initrd=INITRD, paths=VM_DIR, memory_file=Path("/run/pykata/template/memory"),
        incoming=True,
    ),
    "microvm-template-clone-9p": LaunchSpec(
        vm_id="golden", config=_qemu(shared_fs="virtio-9p", cpu_model="Skylake-Client"), accel="tcg",
        kernel=KERNEL, initrd=INITRD, paths=VM_DIR, shared_dir=Path("/run/pykata/shared/golden"),
        memory_file=Path("/run/pykata/template/0123/memory"), memory_file_shared=False, incoming=True,
    ),
    "microvm-template-clone-root-slots": LaunchSpec(
        vm_id="golden", config=_qemu(shared_fs="virtio-9p"), accel="tcg", kernel=KERNEL, initrd=INITRD,
        paths=VM_DIR, shared_dir=Path("/run/pykata/shared/golden"),
        memory_file=Path("/run/pykata/template/0123/memory"), memory_file_shared=False, incoming=True,
        root_slots=2, root_slot_size=4096 << 20, data_disk_size=64 << 20,
    ),
    "q35-root-slots": LaunchSpec(
        vm_id="golden", config=_qemu(machine_type="q35"), accel="kvm", kernel=KERNEL, initrd=INITRD, paths=VM_DIR,
        root_slots=1, root_slot_size=64 << 20,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_argv(name: str) -> None:
    argv = build_command_line(CASES[name]).argv()
    path = GOLDEN / f"{name}.argv"
    rendered = "\n".join(argv) + "\n"
    if REGEN:
        path.write_text(rendered)
    assert path.exists(), f"{path} missing: run with PYKATA_REGEN_GOLDEN=1"
    assert rendered == path.read_text(), f"argv differs from {path}; regenerate with PYKATA_REGEN_GOLDEN=1"


def test_microvm_uses_mmio_devices_and_q35_pci() -> None:
    micro = build_command_line(CASES["microvm-virtiofs-serial-tcg"]).argv()
    q35 = build_command_line(CASES["q35-hotplug-devices-kvm"]).argv()
    assert any(a.startswith("virtio-serial-device") for a in micro)
    assert not any("-pci" in a for a in micro)
    assert any(a.startswith("vhost-user-fs-pci") for a in q35)
    assert not any(a.startswith("virtio-") and "-device," in a for a in q35)


def test_virtiofs_needs_shared_memfd_and_modern_mmio() -> None:
    argv = build_command_line(CASES["microvm-virtiofs-serial-tcg"]).argv()
    # a microvm with a balloon boots with its ceiling (default_maxmemory 8192 here)
    assert "memory-backend-memfd,id=mem,size=8192M,share=on" in argv
    assert "virtio-mmio.force-legacy=false" in argv
    no_fs = build_command_line(CASES["microvm-minimal-image"]).argv()
    assert not any("memory-backend" in a for a in no_fs)
    assert "virtio-mmio.force-legacy=false" not in no_fs


def test_accel_and_cpu() -> None:
    tcg = build_command_line(CASES["microvm-virtiofs-serial-tcg"]).argv()
    kvm = build_command_line(CASES["microvm-9p-vsock-kvm"]).argv()
    assert tcg[tcg.index("-accel") + 1] == "tcg,thread=multi"
    assert tcg[tcg.index("-cpu") + 1] == "max,-erms,-fsrm"
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    assert kvm[kvm.index("-cpu") + 1] == "host"
    small = dataclasses.replace(CASES["microvm-virtiofs-serial-tcg"], config=_qemu(tcg_tb_size=32))
    argv = build_command_line(small).argv()
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi,tb-size=32"
    kvm_small = dataclasses.replace(CASES["microvm-9p-vsock-kvm"], config=_qemu(tcg_tb_size=32))
    argv = build_command_line(kvm_small).argv()
    assert argv[argv.index("-accel") + 1] == "kvm"  # TCG's cache means nothing to KVM


def test_commas_in_values_are_doubled() -> None:
    argv = build_command_line(CASES["microvm-9p-vsock-kvm"]).argv()
    assert any("path=/srv/share,,odd," in a for a in argv)
    with pytest.raises(ValueError):
        c.Virtio9p("mmio", "/a\0b", "tag").argv()


def test_kernel_params_order() -> None:
    spec = dataclasses.replace(CASES["microvm-virtiofs-serial-tcg"],
                               config=_qemu(kernel_params="a=1 b=2"), extra_kernel_params=("c=3",))
    params = kernel_params(spec).split()
    assert params[0] == "console=ttyS0"
    assert params[-3:] == ["a=1", "b=2", "c=3"]
    assert "quiet" in params and "pci=off" in params


def test_net_tap_needs_one_of_fd_or_name() -> None:
    with pytest.raises(ValueError):
        c.VirtioNetTap("pci", "n0", "02:00:00:00:00:01").argv()


def test_net_user_renders_slirp_without_ipv6() -> None:
    assert c.VirtioNetUser("mmio", "net0", "02:50:4b:00:00:01").argv() == [
        "-netdev", "user,id=netdev-net0,net=10.0.2.0/24,host=10.0.2.2,ipv6=off",
        "-device", "virtio-net-device,id=net0,netdev=netdev-net0,mac=02:50:4b:00:00:01"]


def test_passt_serves_libslirps_guest_network_ipv4_only_without_forwards_or_dhcp() -> None:
    from pykata.hypervisor.qemu.passt import passt_argv

    assert passt_argv("/usr/bin/passt", 9, 1500000007) == [
        "/usr/bin/passt", "--foreground", "--quiet", "--runas", "1500000007:1500000007", "--fd", "9",
        "--ipv4-only", "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2",
        "--dns", "none", "--search", "none", "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
        "--tcp-ports", "none", "--udp-ports", "none"]


def test_net_user_on_passt_is_a_stream_served_on_an_inherited_listening_socket() -> None:
    assert c.VirtioNetStream("mmio", "net0", "02:50:4b:00:00:01", 7).argv() == [
        "-netdev", "stream,id=netdev-net0,server=on,addr.type=fd,addr.str=7",
        "-device", "virtio-net-device,id=net0,netdev=netdev-net0,mac=02:50:4b:00:00:01"]


def test_microvm_balloon_boots_with_its_ceiling() -> None:
    spec = CASES["microvm-virtiofs-serial-tcg"]
    argv = build_command_line(spec).argv()
    assert argv[argv.index("-m") + 1] == "8192M"
    assert "virtio-balloon-device,id=balloon0,deflate-on-oom=off,free-page-reporting=on" in argv
    # no room to grow: it boots with default_memory, the balloon can still shrink it
    tight = dataclasses.replace(spec, config=_qemu(default_memory=512, default_maxmemory=0))
    argv = build_command_line(tight).argv()
    assert argv[argv.index("-m") + 1] == "512M"
    assert any(a.startswith("virtio-balloon-device") for a in argv)
    off = dataclasses.replace(spec, config=_qemu(default_memory=512, memory_balloon=False, free_page_reporting=False))
    argv = build_command_line(off).argv()
    assert argv[argv.index("-m") + 1] == "512M"
    assert not any("balloon" in a for a in argv)
    q35 = build_command_line(CASES["q35-hotplug-devices-kvm"]).argv()
    assert not any("balloon" in a for a in q35)  # q35 grows with DIMMs
