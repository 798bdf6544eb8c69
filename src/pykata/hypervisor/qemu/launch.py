"""From configuration to a QEMU command line: the pure part of starting a VM (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pykata.config.schema import QemuConfig
from pykata.hypervisor.devices import DATA_DISK_SERIAL, BlockDevice, Device, NetDevice, root_slot_serial
from pykata.hypervisor.jail import JailSpec
from pykata.hypervisor.qemu import cmdline as c
from pykata.ids import vm_process_name

AgentChannelKind = Literal["vsock", "virtio-serial"]
SHARED_FS_TAG = "kataShared"
AGENT_PORT_NAME = "agent.channel.0"
# q35 root ports kept free for hot-plugged PCI devices.
HOTPLUG_PORTS = 4


@dataclass(frozen=True)
class VmPaths:
    """Where one VM keeps its sockets and logs: one directory, removed when the VM stops."""

    dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def virtiofsd_socket(self) -> Path:
        return self.dir / "virtiofsd.sock"

    @property
    def virtiofsd_log(self) -> Path:
        return self.dir / "virtiofsd.log"

    @property
    def proxy9p_log(self) -> Path:
        return self.dir / "proxy9p.log"

    @property
    def chroot(self) -> Path:
        return self.dir / "root"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that decides a VM's command line, resolved (no "auto", no empty kernel path)."""

    vm_id: str
    config: QemuConfig
    accel: Literal["kvm", "tcg"]
    kernel: Path
    paths: VmPaths
    initrd: Path | None = None
    image: Path | None = None
    shared_dir: Path | None = None
    agent_channel: AgentChannelKind = "virtio-serial"
    vsock_cid: int | None = None
    extra_kernel_params: tuple[str, ...] = ()
    # Cold-plugged devices; a NetDevice's tap_fd is inherited by QEMU (the driver passes it).
    devices: tuple[Device, ...] = ()
    # VM templating: RAM in a shared file, and a clone that waits for `migrate-incoming`.
    memory_file: Path | None = None
    # share=on while a template is made (guest RAM lands in the file); share=off for a clone, which
    # maps the template's file privately (copy-on-write), so clones never write into the template.
    memory_file_shared: bool = True
    # RAM in a private anonymous backend named like a template's ("mem"): a restored snapshot, whose
    # stream fills a RAM block of that name.
    private_memory: bool = False
    incoming: bool = False
    # A connected socket QEMU inherits for the serial console (hypervisor.console drains it); None:
    # QEMU appends to paths.console_log itself, unbounded (only for short trial boots of our own guests).
    console_fd: int | None = None
    # Listening sockets pykata bound at paths.qmp_socket / paths.agent_socket and passes in: QEMU then
    # makes no file on the host, and the sockets are 0600 from the start.
    qmp_fd: int | None = None
    agent_fd: int | None = None
    # Host TSC frequency, told to a TCG guest so it need not calibrate (see hostinfo.host_tsc_khz).
    tsc_khz: int | None = None
    # How QEMU is confined (None: not at all); a jailed QEMU's 9p goes through virtfs-proxy-helper on
    # the inherited socket `proxy_9p_fd`.
    jail: JailSpec | None = None
    proxy_9p_fd: int | None = None
    # The listening socket of the user-mode network NIC's stream to passt (hypervisor.qemu.passt),
    # inherited; None: the NIC is on libslirp inside QEMU (user_network = "slirp").
    user_net_fd: int | None = None
    # Read-only disks filled at run time with container images (hypervisor.qemu.slots), each of
    # root_slot_size bytes: part of the device set, so a template and its clones have the same.
    root_slots: int = 0
    root_slot_size: int = 0
    # The writable disk of bulk file transfers (hypervisor.qemu.datadisk), of this many bytes; 0: none.
    # Part of the device set too.
    data_disk_size: int = 0

    @property
    def bus(self) -> c.Bus:
        return "mmio" if self.config.machine_type == "microvm" else "pci"

    @property
    def shares_memory(self) -> bool:
        """vhost-user daemons (virtiofsd) map guest RAM, so it must be a shared memfd."""
        return self.config.shared_fs == "virtio-fs" and self.shared_dir is not None


DATA_DISK_NODE = "datadisk"
# The APIC timer's input clock under TCG: QEMU's APIC_BUS_CYCLE_NS is 1.
TCG_APIC_HZ = 1_000_000_000
# CONFIG_HZ of pykata's guest kernel (guestimage/kernel.config leaves Kconfig's default, HZ_250).
GUEST_KERNEL_HZ = 250


def root_slot_node(slot: int) -> str:
    """The block node name of image slot `slot` (its device is `<node>-dev`)."""
    return f"rootslot{slot}"


def kernel_params(spec: LaunchSpec) -> str:
    """The guest kernel command line: pykata's base, then the configured, then the caller's extra."""
    q = spec.config
    params = [
        "console=ttyS0",
        # Panic -> immediate reboot -> QEMU exits (-no-reboot): a dead guest never lingers.
        "panic=-1", "reboot=k",
        "no_timer_check", "noreplace-smp", "rcupdate.rcu_expedited=1", "cryptomgr.notests",
        # 256 legacy BSD ptys cost ~70 ms of boot under TCG; containers use /dev/pts.
        "pty.legacy_count=0",
        "nr_cpus=" + str(_maxvcpus(spec)),
    ]
    if q.machine_type == "microvm" and _maxvcpus(spec) > q.default_vcpus:
        # microvm has no CPU hotplug: every vCPU is there from the start, and the guest brings up
        # only the VM's size; the agent onlines and offlines the others (OnlineCPUMem) as it is resized.
        params.append(f"maxcpus={q.default_vcpus}")
    if q.machine_type == "microvm":
        # No PCI bus on microvm: skip probing one.
        params.append("pci=off")
    if spec.accel == "tcg" and spec.tsc_khz:
        # TCG guests read the host TSC; calibrating it against emulated timers fails on a busy host
        # (the guest then hangs), and the clocksource watchdog would wrongly call it unstable.
        params += [f"tsc_early_khz={spec.tsc_khz}", "tsc=reliable"]
    if spec.accel == "tcg":
        # The APIC timer's rate, so the guest does not measure it (a parameter of pykata's kernel, see
        # guestimage.kernel.SOURCE_EDITS; another kernel passes it to init). The measurement reads
        # "too slow" when the host stalls the vCPU at its start, and a microvm with ACPI then never
        # gets a tick again. QEMU's TCG APIC counts at 1 GHz.
        params.append(f"lapic_timer_period={TCG_APIC_HZ // GUEST_KERNEL_HZ}")
    if not q.enable_debug:
        params.append("quiet")
    if spec.image is not None:
        params += ["root=/dev/vda", "ro", "rootfstype=ext4"]
    if q.kernel_params:
        params += q.kernel_params.split()
    params += spec.extra_kernel_params
    return " ".join(params)


def boot_memory(q: QemuConfig) -> int:
    """The guest RAM QEMU is started with (MiB): the balloon's ceiling when the VM has one (the
    balloon then holds back all but default_memory), else default_memory."""
    return q.balloon_memory() or q.default_memory


def _maxvcpus(spec: LaunchSpec) -> int:
    return spec.config.resolved_maxvcpus()


# TCG's "max" has RDRAND, so the guest has entropy early (Python's startup needs it). Without ERMS and
# FSRM the guest kernel copies and clears memory with `rep movsq`/unrolled moves instead of `rep movsb`,
# which TCG runs one byte per iteration: the initramfs unpack and page clearing cost less QEMU CPU
# (bench/boot_ab.py -n 10, load 9-11: cold boot to ready 1.982 -> 1.932 s, lower in 7 of 10 rounds;
# the unpack 0.404 -> 0.358).
TCG_CPU_MODEL = "max,-erms,-fsrm"


def default_cpu_model(accel: str) -> str:
    """The QEMU -cpu of a VM whose configuration names none."""
    return "host" if accel == "kvm" else TCG_CPU_MODEL


def cpu_model(spec: LaunchSpec) -> str:
    return spec.config.cpu_model or default_cpu_model(spec.accel)


def build_command_line(spec: LaunchSpec) -> c.CommandLine:
    """Render the whole QEMU command line for `spec`.

    Raises:
        ValueError: a path holds a NUL byte (QEMU cannot be told about it).
    """
    q = spec.config
    p = spec.paths
    bus = spec.bus
    args: list[c.Arg] = [c.Name(vm_process_name(spec.vm_id))]

    backend_id = "mem" if spec.memory_file is not None or spec.shares_memory or spec.private_memory else None
    if q.machine_type == "microvm":
        # Under TCG the guest has no kvmclock and calibrates its TSC against the PIT: without one
        # it hangs at "Unable to calibrate against PIT". Under KVM the legacy timers are dead weight.
        legacy = None if spec.accel == "tcg" else False
        args.append(c.Machine("microvm", memory_backend=backend_id, option_roms=False, isa_serial=True,
                              rtc=True, pit=legacy, pic=legacy, mem_merge=q.mem_merge))
    else:
        args.append(c.Machine("q35", memory_backend=backend_id, mem_merge=q.mem_merge))
    args += [c.Accel(spec.accel, q.tcg_tb_size or None), c.Cpu(cpu_model(spec))]

    maxcpus = _maxvcpus(spec)
    if q.machine_type == "microvm":
        # all present (no hotplug); the kernel's maxcpus= keeps the ones above the VM's size offline
        args.append(c.Smp(maxcpus))
    else:
        args.append(c.Smp(q.default_vcpus, maxcpus if maxcpus != q.default_vcpus else None))
    ram = boot_memory(q)
    if q.machine_type == "q35" and q.memory_slots:
        args.append(c.Memory(ram, q.memory_slots, q.resolved_maxmemory()))
    else:
        args.append(c.Memory(ram))
    if spec.memory_file is not None:
        args.append(c.MemoryBackend("mem", ram, kind="file", share=spec.memory_file_shared,
                                    mem_path=str(spec.memory_file)))
    elif spec.shares_memory:
        args.append(c.MemoryBackend("mem", ram, kind="memfd", share=True))
    elif spec.private_memory:
        args.append(c.MemoryBackend("mem", ram, kind="ram", share=False))

    initrd = str(spec.initrd) if spec.initrd else None
    args += [c.Kernel(str(spec.kernel), initrd, kernel_params(spec)), c.Defaults()]
    args += [c.QmpSocket(str(p.qmp_socket), fd=spec.qmp_fd), c.SerialConsole(str(p.console_log), fd=spec.console_fd)]
    args.append(c.VirtioRng(bus, q.entropy_source))

    if spec.agent_channel == "vsock":
        if spec.vsock_cid is None:
            raise ValueError("vsock agent channel needs a guest CID")
        args.append(c.VhostVsock(bus, spec.vsock_cid))
    else:
        args += [c.VirtioSerial(bus), c.VirtSerialPort(str(p.agent_socket), AGENT_PORT_NAME, fd=spec.agent_fd)]

    if spec.shared_dir is not None:
        if q.shared_fs == "virtio-fs":
            args.append(c.VhostUserFs(bus, str(p.virtiofsd_socket), SHARED_FS_TAG, q.virtio_fs_queue_size))
            if q.machine_type == "microvm":
                # QEMU 7.2's virtio-mmio defaults to legacy (0.9) devices, and vhost-user-fs needs a
                # virtio 1.0 transport: without this the guest never sees the device.
                args.append(c.Global("virtio-mmio", "force-legacy", "false"))
        elif q.shared_fs == "virtio-9p" and spec.proxy_9p_fd is not None:
            args.append(c.Virtio9pProxy(bus, spec.proxy_9p_fd, SHARED_FS_TAG))
        elif q.shared_fs == "virtio-9p":
            args.append(c.Virtio9p(bus, str(spec.shared_dir), SHARED_FS_TAG))

    if q.balloon_memory():
        args.append(c.VirtioBalloon(bus, free_page_reporting=q.free_page_reporting))
    if spec.image is not None:
        args.append(c.VirtioBlk(bus, "rootfs", str(spec.image), readonly=True))
    args += [c.RootSlot(bus, root_slot_node(i), root_slot_serial(i), spec.root_slot_size)
             for i in range(spec.root_slots)]
    if spec.data_disk_size:
        args.append(c.DataDisk(bus, DATA_DISK_NODE, DATA_DISK_SERIAL, spec.data_disk_size))
    for dev in spec.devices:
        args.append(device_arg(dev, bus, spec.user_net_fd))
    if q.machine_type == "q35":
        # Devices on the root complex cannot be hot-plugged; these empty ports can take them.
        args += [c.PcieRootPort(f"rp{i}", chassis=i + 1) for i in range(HOTPLUG_PORTS)]
    if spec.incoming:
        args.append(c.Incoming())
    if spec.jail is not None:
        args += jail_args(spec.jail)
    return c.CommandLine(q.path, tuple(args))


def jail_args(jail: JailSpec) -> list[c.Arg]:
    """QEMU's own confinement options (the mount namespace is the caller's: see jail.namespace_prefix)."""
    args: list[c.Arg] = []
    if jail.seccomp:
        # -runas needs setgid/setuid after the filter is in place (see cmdline.SeccompSandbox).
        args.append(c.SeccompSandbox(elevateprivileges="allow" if jail.unprivileged else "deny"))
    if jail.chroot is not None:
        args.append(c.Chroot(str(jail.chroot)))
    if jail.uid is not None and jail.gid is not None:
        args.append(c.RunAs(jail.uid, jail.gid))
    return args


def device_arg(dev: Device, bus: c.Bus, user_net_fd: int | None = None) -> c.Arg:
    """The command-line form of a cold-plugged device (a user-mode network NIC on the stream socket
    `user_net_fd`, else on libslirp)."""
    if isinstance(dev, BlockDevice):
        return c.VirtioBlk(bus, dev.id, str(dev.path), readonly=dev.readonly)
    assert isinstance(dev, NetDevice)
    if dev.user_net:
        if user_net_fd is None:
            return c.VirtioNetUser(bus, dev.id, dev.mac)
        return c.VirtioNetStream(bus, dev.id, dev.mac, user_net_fd)
    return c.VirtioNetTap(bus, dev.id, dev.mac, fd=dev.tap_fd, ifname=dev.tap_name)
