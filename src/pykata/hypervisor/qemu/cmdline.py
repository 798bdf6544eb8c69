"""QEMU's command line as small typed objects that render to argv.

Every object is a frozen dataclass with `argv() -> list[str]`. Devices take a `bus`: "mmio" renders the
`virtio-*-device` variants microvm needs, "pci" the `virtio-*-pci` ones of q35. Option values are
escaped the way QEMU's option parser wants (a comma in a value is doubled), so a path can hold any
character but NUL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Bus = Literal["mmio", "pci"]


class Arg(Protocol):
    def argv(self) -> list[str]: ...


def escape(value: str) -> str:
    """Escape one option value for QEMU's `key=value,...` parser.

    Raises:
        ValueError: the value holds a NUL byte (no way to pass it).
    """
    if "\0" in value:
        raise ValueError(f"QEMU option value contains NUL: {value!r}")
    return value.replace(",", ",,")


def opts(head: str, *pairs: tuple[str, object]) -> str:
    """Render `head,k=v,...`; None values are left out, booleans become on/off."""
    parts = [head] if head else []
    for key, value in pairs:
        if value is None:
            continue
        text = ("on" if value else "off") if isinstance(value, bool) else escape(str(value))
        parts.append(f"{key}={text}")
    return ",".join(parts)


def virtio_driver(kind: str, bus: Bus) -> str:
    """`virtio-net` -> `virtio-net-device` (mmio) or `virtio-net-pci` (pci)."""
    return f"{kind}-device" if bus == "mmio" else f"{kind}-pci"


@dataclass(frozen=True)
class Name:
    """`-name`: shows in `ps` and QMP; the guest name is the VM id."""

    name: str

    def argv(self) -> list[str]:
        return ["-name", opts(escape(self.name), ("debug-threads", True))]


@dataclass(frozen=True)
class Machine:
    """`-machine`. For microvm the legacy devices are switches; None leaves QEMU's default."""

    type: Literal["microvm", "q35"]
    memory_backend: str | None = None
    # microvm only:
    option_roms: bool | None = None
    isa_serial: bool | None = None
    rtc: bool | None = None
    pit: bool | None = None
    pic: bool | None = None
    acpi: bool | None = None
    # q35 only: no VGA, no default NIC happen through -nodefaults.
    nvdimm: bool | None = None
    # Whether the host's KSM may merge guest RAM (QEMU's default: on).
    mem_merge: bool | None = None

    def argv(self) -> list[str]:
        pairs: list[tuple[str, object]] = []
        if self.type == "microvm":
            pairs += [("x-option-roms", self.option_roms), ("isa-serial", self.isa_serial),
                      ("rtc", self.rtc), ("pit", self.pit), ("pic", self.pic), ("acpi", self.acpi)]
        else:
            pairs += [("nvdimm", self.nvdimm)]
        pairs += [("memory-backend", self.memory_backend), ("mem-merge", self.mem_merge)]
        return ["-machine", opts(self.type, *pairs)]


@dataclass(frozen=True)
class Accel:
    """`-accel kvm` or `-accel tcg,thread=multi` (one host thread per vCPU), with TCG's translation
    cache capped at `tb_size_mib` when given."""

    kind: Literal["kvm", "tcg"]
    tb_size_mib: int | None = None

    def argv(self) -> list[str]:
        if self.kind == "tcg":
            return ["-accel", "tcg,thread=multi" + (f",tb-size={self.tb_size_mib}" if self.tb_size_mib else "")]
        return ["-accel", "kvm"]


@dataclass(frozen=True)
class Cpu:
    model: str

    def argv(self) -> list[str]:
        return ["-cpu", self.model]


@dataclass(frozen=True)
class Smp:
    cpus: int
    maxcpus: int | None = None

    def argv(self) -> list[str]:
        return ["-smp", opts(str(self.cpus), ("maxcpus", self.maxcpus))]


@dataclass(frozen=True)
class Memory:
    """`-m`: boot memory; `slots`/`maxmem` reserve room for hot-added DIMMs (q35)."""

    size_mib: int
    slots: int | None = None
    maxmem_mib: int | None = None

    def argv(self) -> list[str]:
        maxmem = f"{self.maxmem_mib}M" if self.maxmem_mib else None
        return ["-m", opts(f"{self.size_mib}M", ("slots", self.slots), ("maxmem", maxmem))]


@dataclass(frozen=True)
class MemoryBackend:
    """`-object memory-backend-{memfd,file}`: guest RAM a vhost-user daemon can map (share=on), or a
    file a VM template is saved to and cloned from."""

    id: str
    size_mib: int
    kind: Literal["memfd", "file", "ram"] = "memfd"
    share: bool = True
    mem_path: str | None = None

    def argv(self) -> list[str]:
        return ["-object", opts(f"memory-backend-{self.kind}", ("id", self.id), ("size", f"{self.size_mib}M"),
                                ("mem-path", self.mem_path), ("share", self.share))]


@dataclass(frozen=True)
class Kernel:
    kernel: str
    initrd: str | None = None
    append: str = ""

    def argv(self) -> list[str]:
        out = ["-kernel", self.kernel]
        if self.initrd:
            out += ["-initrd", self.initrd]
        if self.append:
            out += ["-append", self.append]
        return out


@dataclass(frozen=True)
class Defaults:
    """No default devices, no user config file, no display, exit instead of rebooting."""

    def argv(self) -> list[str]:
        return ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]


@dataclass(frozen=True)
class SerialConsole:
    """The guest's ttyS0: into a connected socket QEMU inherits as `fd` (the host drains it into a
    bounded log, see hypervisor.console), or else appended to the file `path` (short trial boots)."""

    path: str
    id: str = "console"
    fd: int | None = None

    def argv(self) -> list[str]:
        if self.fd is not None:
            chardev = opts("socket", ("id", self.id), ("fd", self.fd))
        else:
            chardev = opts("file", ("id", self.id), ("path", self.path), ("append", True))
        return ["-chardev", chardev, "-serial", f"chardev:{self.id}"]


@dataclass(frozen=True)
class VirtioSerial:
    bus: Bus
    id: str = "serial0"

    def argv(self) -> list[str]:
        return ["-device", opts(virtio_driver("virtio-serial", self.bus), ("id", self.id))]


@dataclass(frozen=True)
class VirtSerialPort:
    """A virtio-serial port backed by a listening unix socket on the host (the agent channel)."""

    socket: str
    name: str = "agent.channel.0"
    id: str = "agent"
    serial_id: str = "serial0"
    # With an id, QEMU reports the guest opening and closing the port (QMP VSERPORT_CHANGE).
    device_id: str = "agent.port"
    # the listening socket pykata bound at `socket` and passed in (else QEMU makes it)
    fd: int | None = None

    def argv(self) -> list[str]:
        where = ("fd", self.fd) if self.fd is not None else ("path", self.socket)
        return [
            "-chardev", opts("socket", ("id", self.id), where, ("server", True), ("wait", False)),
            "-device", opts("virtserialport", ("bus", f"{self.serial_id}.0"), ("chardev", self.id),
                            ("name", self.name), ("id", self.device_id)),
        ]


@dataclass(frozen=True)
class VhostVsock:
    bus: Bus
    guest_cid: int
    id: str = "vsock0"

    def argv(self) -> list[str]:
        return ["-device", opts(virtio_driver("vhost-vsock", self.bus), ("id", self.id),
                                ("guest-cid", self.guest_cid))]


@dataclass(frozen=True)
class VhostUserFs:
    """virtio-fs through a virtiofsd listening on `socket`; the guest mounts it by `tag`."""

    bus: Bus
    socket: str
    tag: str
    queue_size: int = 1024
    id: str = "fs0"

    def argv(self) -> list[str]:
        chardev = f"char-{self.id}"
        return [
            "-chardev", opts("socket", ("id", chardev), ("path", self.socket)),
            "-device", opts(virtio_driver("vhost-user-fs", self.bus), ("id", self.id), ("chardev", chardev),
                            ("tag", self.tag), ("queue-size", self.queue_size)),
        ]


@dataclass(frozen=True)
class Virtio9p:
    """A host directory over 9p; QEMU serves it itself, no daemon."""

    bus: Bus
    path: str
    tag: str
    id: str = "fs0"
    security_model: Literal["none", "passthrough", "mapped-xattr"] = "none"
    multidevs: Literal["remap", "forbid", "warn"] | None = "remap"

    def argv(self) -> list[str]:
        fsdev = f"fsdev-{self.id}"
        return [
            "-fsdev", opts("local", ("id", fsdev), ("path", self.path), ("security_model", self.security_model),
                           ("multidevs", self.multidevs)),
            "-device", opts(virtio_driver("virtio-9p", self.bus), ("id", self.id), ("fsdev", fsdev),
                            ("mount_tag", self.tag)),
        ]


@dataclass(frozen=True)
class Virtio9pProxy:
    """A host directory over 9p served by virtfs-proxy-helper on the inherited socket `sock_fd`: QEMU
    itself then touches no host file (the jail: QEMU runs unprivileged, the helper keeps the file
    capabilities, as virtiofsd does for virtio-fs)."""

    bus: Bus
    sock_fd: int
    tag: str
    id: str = "fs0"

    def argv(self) -> list[str]:
        fsdev = f"fsdev-{self.id}"
        return [
            "-fsdev", opts("proxy", ("id", fsdev), ("sock_fd", self.sock_fd)),
            "-device", opts(virtio_driver("virtio-9p", self.bus), ("id", self.id), ("fsdev", fsdev),
                            ("mount_tag", self.tag)),
        ]


@dataclass(frozen=True)
class SeccompSandbox:
    """`-sandbox`: QEMU's own seccomp filter, installed before the guest runs.

    `elevateprivileges` stays "allow" when QEMU drops to an unprivileged uid itself (`RunAs`): QEMU 7.2
    installs the filter while parsing options, before -runas calls setgid/setuid, so "deny" kills it
    with SIGSYS. Once the uid is not 0 and no capability is left, set*id cannot regain anything.
    """

    obsolete: Literal["allow", "deny"] = "deny"
    elevateprivileges: Literal["allow", "deny", "children"] = "deny"
    spawn: Literal["allow", "deny"] = "deny"
    resourcecontrol: Literal["allow", "deny"] = "deny"

    def argv(self) -> list[str]:
        return ["-sandbox", opts("on", ("obsolete", self.obsolete), ("elevateprivileges", self.elevateprivileges),
                                 ("spawn", self.spawn), ("resourcecontrol", self.resourcecontrol))]


@dataclass(frozen=True)
class RunAs:
    """`-runas uid:gid`: QEMU opens everything it needs as root, then drops to this uid/gid (no
    supplementary groups, no capabilities left) just before the guest runs."""

    uid: int
    gid: int

    def argv(self) -> list[str]:
        return ["-runas", f"{self.uid}:{self.gid}"]


@dataclass(frozen=True)
class Chroot:
    """`-chroot dir`: QEMU changes its root to `dir` (an empty directory) just before the guest runs."""

    path: str

    def argv(self) -> list[str]:
        return ["-chroot", self.path]


@dataclass(frozen=True)
class VirtioRng:
    bus: Bus
    filename: str = "/dev/urandom"
    id: str = "rng0"

    def argv(self) -> list[str]:
        backend = f"{self.id}-backend"
        return ["-object", opts("rng-random", ("id", backend), ("filename", self.filename)),
                "-device", opts(virtio_driver("virtio-rng", self.bus), ("id", self.id), ("rng", backend))]


@dataclass(frozen=True)
class VirtioBalloon:
    """A virtio-balloon: the host sets the guest's memory below its boot size (the guest gives pages
    back) and raises it again. `deflate_on_oom` off: the guest never takes ballooned pages back on its
    own, and its MemTotal follows the balloon. `free_page_reporting`: the guest tells the host which
    free pages it may drop (QEMU discards them), so freed guest memory leaves QEMU's RSS."""

    bus: Bus
    id: str = "balloon0"
    deflate_on_oom: bool = False
    free_page_reporting: bool = False

    def argv(self) -> list[str]:
        return ["-device", opts(virtio_driver("virtio-balloon", self.bus), ("id", self.id),
                                ("deflate-on-oom", self.deflate_on_oom),
                                ("free-page-reporting", self.free_page_reporting))]


@dataclass(frozen=True)
class VirtioNetTap:
    """A virtio-net NIC on a tap: an already-open `fd` (inherited by QEMU) or an interface name."""

    bus: Bus
    id: str
    mac: str
    fd: int | None = None
    ifname: str | None = None
    vhost: bool = False

    def __post_init__(self) -> None:
        if (self.fd is None) == (self.ifname is None):
            raise ValueError("VirtioNetTap needs exactly one of fd and ifname")

    def argv(self) -> list[str]:
        netdev = f"netdev-{self.id}"
        tap: list[tuple[str, object]] = [("id", netdev)]
        if self.fd is not None:
            tap.append(("fd", self.fd))
        else:
            tap += [("ifname", self.ifname), ("script", "no"), ("downscript", "no")]
        tap.append(("vhost", self.vhost))
        return ["-netdev", opts("tap", *tap),
                "-device", opts(virtio_driver("virtio-net", self.bus), ("id", self.id), ("netdev", netdev),
                                ("mac", self.mac))]


@dataclass(frozen=True)
class VirtioNetUser:
    """A virtio-net NIC on QEMU's user-mode network (libslirp): 10.0.2.0/24, the guest at .15,
    the gateway at .2. IPv6 off; no DNS relay, TFTP or SMB (the jailed QEMU has no /etc to read)."""

    bus: Bus
    id: str
    mac: str

    def argv(self) -> list[str]:
        netdev = f"netdev-{self.id}"
        return ["-netdev", opts("user", ("id", netdev), ("net", "10.0.2.0/24"), ("host", "10.0.2.2"),
                                ("ipv6", False)),
                "-device", opts(virtio_driver("virtio-net", self.bus), ("id", self.id), ("netdev", netdev),
                                ("mac", self.mac))]


@dataclass(frozen=True)
class VirtioNetStream:
    """A virtio-net NIC whose frames go over a stream socket (`fd`: a listening unix socket QEMU
    inherits; the next connection is taken when one ends) to a user-mode network stack outside QEMU
    (pykata.hypervisor.qemu.passt)."""

    bus: Bus
    id: str
    mac: str
    fd: int

    def argv(self) -> list[str]:
        netdev = f"netdev-{self.id}"
        return ["-netdev", opts("stream", ("id", netdev), ("server", True), ("addr.type", "fd"),
                                ("addr.str", self.fd)),
                "-device", opts(virtio_driver("virtio-net", self.bus), ("id", self.id), ("netdev", netdev),
                                ("mac", self.mac))]


@dataclass(frozen=True)
class VirtioBlk:
    bus: Bus
    id: str
    path: str
    readonly: bool = False
    format: Literal["raw", "qcow2"] = "raw"

    def argv(self) -> list[str]:
        drive = f"drive-{self.id}"
        return ["-drive", opts("", ("id", drive), ("file", self.path), ("if", "none"), ("format", self.format),
                               ("readonly", self.readonly)),
                "-device", opts(virtio_driver("virtio-blk", self.bus), ("id", self.id), ("drive", drive))]


@dataclass(frozen=True)
class RootSlot:
    """A read-only virtio-blk disk whose content is given at run time (pykata.hypervisor.qemu.slots):
    a raw node `node` over an empty `null-co` node of `size` bytes (reads as zeros) until the host
    swaps in an image file; the guest finds it by its `serial`. The device and its capacity are fixed
    at start, so a template carries the slot and every clone fills it with its own images."""

    bus: Bus
    node: str
    serial: str
    size: int

    def argv(self) -> list[str]:
        # the null node is a -blockdev of its own (owned by the monitor), so it outlives being
        # swapped out and the slot can be emptied again
        return ["-blockdev", opts("", ("driver", "null-co"), ("node-name", f"{self.node}-null"),
                                  ("size", self.size), ("read-zeroes", True), ("read-only", True)),
                "-blockdev", opts("", ("driver", "raw"), ("node-name", self.node), ("read-only", True),
                                  ("file", f"{self.node}-null")),
                "-device", opts(virtio_driver("virtio-blk", self.bus), ("id", f"{self.node}-dev"),
                                ("drive", self.node), ("serial", self.serial))]


@dataclass(frozen=True)
class DataDisk:
    """The writable virtio-blk disk of bulk file transfers (pykata.hypervisor.qemu.datadisk): a raw
    node `node` over a writable `null-co` node of `size` bytes (reads zeros, drops writes) until the
    host swaps in a file of its own for one transfer. Fixed at start, like RootSlot."""

    bus: Bus
    node: str
    serial: str
    size: int

    def argv(self) -> list[str]:
        return ["-blockdev", opts("", ("driver", "null-co"), ("node-name", f"{self.node}-null"),
                                  ("size", self.size), ("read-zeroes", True)),
                "-blockdev", opts("", ("driver", "raw"), ("node-name", self.node), ("file", f"{self.node}-null")),
                "-device", opts(virtio_driver("virtio-blk", self.bus), ("id", f"{self.node}-dev"),
                                ("drive", self.node), ("serial", self.serial))]


@dataclass(frozen=True)
class PcieRootPort:
    """An empty PCIe root port on q35, for hot-plugging one device later."""

    id: str
    chassis: int
    bus: str = "pcie.0"

    def argv(self) -> list[str]:
        return ["-device", opts("pcie-root-port", ("id", self.id), ("bus", self.bus), ("chassis", self.chassis))]


@dataclass(frozen=True)
class QmpSocket:
    """The QMP server socket: at `path`, or the listening socket `fd` pykata bound there and passed in."""

    path: str
    fd: int | None = None

    def argv(self) -> list[str]:
        where = ("fd", self.fd) if self.fd is not None else ("path", self.path)
        return ["-chardev", opts("socket", ("id", "qmp"), where, ("server", True), ("wait", False)),
                "-mon", "chardev=qmp,mode=control"]


@dataclass(frozen=True)
class Global:
    driver: str
    prop: str
    value: str

    def argv(self) -> list[str]:
        return ["-global", f"{self.driver}.{self.prop}={escape(self.value)}"]


@dataclass(frozen=True)
class Incoming:
    """Start paused, waiting for `migrate-incoming` (VM templating)."""

    def argv(self) -> list[str]:
        return ["-S", "-incoming", "defer"]


@dataclass(frozen=True)
class CommandLine:
    binary: str
    args: Sequence[Arg] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        out = [self.binary]
        for arg in self.args:
            out += arg.argv()
        return out
