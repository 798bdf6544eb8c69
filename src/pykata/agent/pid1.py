"""The guest's PID 1: set the VM up, then become the agent in the same process.

The kernel runs /init (guestimage/init, a few lines of Python) as PID 1, which calls `main()`.
It was a busybox script that exec'd Python; under TCG the script cost ~0.3 s of QEMU CPU per cold
boot (busybox's own start, a re-exec to move the root, a fork+exec per mount, link or `ip`), about
what all of Python's start costs. Here each step is one system call in the process that then
imports and runs the agent.

Kernel command line options (read from /proc/cmdline):
  pykata.channel=serial      virtio-serial port named agent.channel.0 (default)
  pykata.channel=serial:NAME virtio-serial port named NAME
  pykata.channel=vsock       vsock, port pykata.vsock_port (default 1024)
  pykata.debug=1             print diagnostics (kernel, mounts, entropy, python, crun) and run the
                             agent with --debug
  pykata.hostname=NAME       host name (default: pykata)
  pykata.agent=0             do not start the agent: print diagnostics and power off (tests)
  pykata.exec=crun           start exec processes with `crun exec` only (default: the agent's
                             own setns path where it covers the process spec)
  pykata.exec=spawner        the agent's own path, its children forked by the exec spawner
  pykata.exec=fork           the agent's own path, its children forked by the agent (the default
                             starts them with the image's exec starter, /usr/libexec/pykata/execstart)
And PYKATA_BOOT_MARKS=1 (no dot: the kernel hands it to init as an environment variable) prints
"PYKATA_BOOT <phase> <uptime>" lines as the boot goes on: py (Python runs /init), setup (the VM is
set up, the agent's import begins), imported (pykata.agent.main); bench/boot_bench.py times them.

Runs only inside a VM: it mounts over /, /proc, /sys and /dev, and powers the machine off on failure.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import time
from typing import NoReturn

from pykata.agent.ports import DEFAULT_PORT_NAME, find_serial_port
from pykata.agent.sysmount import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, mount, umount

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MS_MOVE = 0x2000
CGROUP = "/sys/fs/cgroup"
PORT_WAIT = 5.0  # seconds for the agent port's /dev node (made asynchronously after the probe)
# The agent moves stdin/stdout in buffers of up to a few MiB. glibc would mmap each one fresh and
# unmap it when freed, and every first touch of a fresh page is a guest page fault (tens of
# microseconds under TCG): keep such buffers in the heap, and the heap's free top, for reuse.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 128 << 20
RB_POWER_OFF = 0x4321FEDC
_KNOWN = ("channel", "debug", "hostname", "agent", "vsock_port", "exec")


def say(msg: str) -> None:
    print(f"pykata-init: {msg}", flush=True)


def mark(phase: str) -> None:
    if os.environ.get("PYKATA_BOOT_MARKS") == "1":
        print(f"PYKATA_BOOT {phase} {time.clock_gettime(time.CLOCK_BOOTTIME):.3f}", flush=True)


def power_off() -> NoReturn:
    """Power the VM off (ending PID 1 would panic the kernel instead)."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_POWER_OFF)
    os._exit(1)  # not reached


def die(msg: str) -> NoReturn:
    say(f"FATAL: {msg}")
    power_off()


def parse_cmdline(cmdline: str) -> dict[str, str]:
    """The pykata.* options of a kernel command line (the last of each wins)."""
    options = {}
    for word in cmdline.split():
        key, eq, value = word.partition("=")
        if eq and key.startswith("pykata.") and key[7:] in _KNOWN:
            options[key[7:]] = value
    return options


def agent_argv(options: dict[str, str], channel: str) -> list[str]:
    """The agent's arguments for these options and its resolved channel."""
    argv = ["--channel", channel]
    if options.get("debug") == "1":
        argv.append("--debug")
    if options.get("exec") in ("crun", "spawner", "fork"):
        argv += ["--exec-with", options["exec"]]
    return argv


def _mount_api_filesystems() -> None:
    nsx = MS_NOSUID | MS_NODEV | MS_NOEXEC
    mount("proc", "/proc", "proc", nsx, "")
    # On the initramfs, / is the root mount of the namespace (its mount ID is its own parent's), and
    # pivot_root(2) refuses to move that one: crun would need --no-pivot, which is weaker. A bind mount
    # of / moved on top of / and entered with chroot is an ordinary mount, so containers can pivot.
    # (The ext4 root is an ordinary mount already.)
    with open("/proc/self/mountinfo") as f:
        mount_id, parent_id = f.readline().split()[:2]
    if mount_id == parent_id:
        umount("/proc")
        try:
            mount("/", "/mnt", "", MS_BIND, "")
            os.chdir("/mnt")
            mount(".", "/", "", MS_MOVE, "")
            os.chroot(".")
            os.chdir("/")
        except OSError as exc:
            say(f"could not make / a movable mount ({exc}); containers need crun --no-pivot")
            os.chdir("/")
        mount("proc", "/proc", "proc", nsx, "")
    mount("sysfs", "/sys", "sysfs", nsx, "")
    # From the ext4 root the kernel has mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
    if not os.path.ismount("/dev"):
        mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    for d in ("/dev/pts", "/dev/shm"):
        os.makedirs(d, exist_ok=True)
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666")
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "fd/0"), ("/dev/stdout", "fd/1"),
                         ("/dev/stderr", "fd/2")):
        if not os.path.lexists(link):
            os.symlink(target, link)


def _setup_cgroups() -> None:
    """cgroup v2, every controller delegated to the tree below the root (crun creates containers there)."""
    try:
        mount("cgroup2", CGROUP, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "nsdelegate")
    except OSError:
        say("cgroup2 not mounted")
        return
    with open(f"{CGROUP}/cgroup.controllers") as f:
        controllers = f.read().split()
    for c in controllers:
        try:
            with open(f"{CGROUP}/cgroup.subtree_control", "w") as f:
                f.write(f"+{c}")
        except OSError:
            say(f"cgroup controller {c} not enabled")


def _stop_pit() -> None:
    """The PIT: QEMU resets its channel 0 to a square wave (mode 3, count 65536) whose every edge is
    a timer in QEMU's main loop, ~36 host wakeups a second for as long as the VM runs, though a
    kernel that times with the TSC-deadline LAPIC timer never uses the PIT and, in 6.1, never stops
    it (newer kernels do: "x86/i8253: Disable PIT timer 0 when not in use"). When the kernel has no
    IRQ 0 handler (it never set the PIT up), switch channel 0 to one-shot mode (control word 0x30
    to port 0x43): QEMU then stops its timer. Measured with bench/overhead_bench.py (qemu_main)."""
    with open("/proc/interrupts") as f:
        if any(line.lstrip().startswith("0:") for line in f):
            return
    try:
        fd = os.open("/dev/port", os.O_WRONLY)
    except OSError:
        return  # no /dev/port: nothing to stop it with
    try:
        os.pwrite(fd, b"\x30", 0x43)
    except OSError:
        say("could not stop the PIT")
    finally:
        os.close(fd)


def _link_lo_up() -> None:
    from pykata.agent.rtnl import Rtnl

    try:
        with Rtnl() as rtnl:
            rtnl.set_link(1, up=True)  # lo is always interface 1
    except OSError as exc:
        say(f"could not bring lo up: {exc}")


def _diagnostics() -> None:
    import subprocess

    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            return str(exc)

    def ls(path: str) -> str:
        try:
            return " ".join(sorted(os.listdir(path)))
        except OSError as exc:
            return str(exc)

    def run(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        return out.splitlines()[0] if out else ""

    say(f"kernel: {read('/proc/version')}")
    say(f"entropy_avail: {read('/proc/sys/kernel/random/entropy_avail')}")
    say(f"cgroup controllers: {read(f'{CGROUP}/cgroup.subtree_control')}")
    root = next((ln for ln in read("/proc/self/mountinfo").splitlines() if " / / " in ln), "")
    say(f"root mount: {root}")
    say(f"virtio devices: {ls('/sys/bus/virtio/devices')}")
    say(f"virtio ports: {ls('/sys/class/virtio-ports')}")
    say(f"python: {sys.version.split()[0]} {len(os.urandom(16))}")
    say(f"crun: {run('crun', '--version')}")
    say("mounts:")
    print(read("/proc/mounts"), flush=True)


def _agent_channel(options: dict[str, str]) -> str:
    channel = options.get("channel", "serial")
    if channel == "vsock" or channel.startswith("vsock:"):
        port = options.get("vsock_port", "1024") if channel == "vsock" else channel.removeprefix("vsock:")
        return f"vsock:{port}"
    if channel == "serial" or channel.startswith("serial:"):
        name = channel.removeprefix("serial:") if channel != "serial" else DEFAULT_PORT_NAME
        # virtio-serial ports are probed before init runs, but the /dev node is made asynchronously.
        deadline = time.monotonic() + PORT_WAIT
        while True:
            device = find_serial_port(name)
            if device is not None and os.path.exists(device):
                return device
            if time.monotonic() > deadline:
                die(f"no virtio-serial port named {name}")
            time.sleep(0.005)
    die(f"pykata.channel={channel}: expected serial, serial:NAME, vsock or vsock:PORT")


def _tune_malloc() -> None:
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def _setup() -> tuple[dict[str, str], str]:
    """Mount, configure and find the agent's channel; return the options and the channel. Powers
    off when asked to (pykata.agent=0)."""
    _mount_api_filesystems()
    with open("/proc/cmdline") as f:
        options = parse_cmdline(f.read())
    _setup_cgroups()
    _stop_pit()
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(options.get("hostname", "pykata"))
    _link_lo_up()
    if options.get("debug") == "1" or options.get("agent") == "0":
        _diagnostics()
    if options.get("agent") == "0":
        say("pykata.agent=0: powering off")
        power_off()
    channel = _agent_channel(options)
    mark("setup")
    return options, channel


def main(agent: str = "pykata.agent.main") -> NoReturn:
    """Set the VM up and run the agent, the `main()` of module `agent` (tests/security's harness
    names its hostile agent in its own /init); never returns (the agent's end powers the VM off)."""
    os.environ.update({
        "PATH": PATH, "HOME": "/root", "TERM": "linux",
        # what the agent's children (crun, diagnostics) got from the shell init before
        "PYTHONPATH": "/usr/lib/pykata", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUTF8": "1",
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    })
    _tune_malloc()
    try:
        options, channel = _setup()
    except Exception as exc:  # PID 1 must not end with a traceback: the kernel would panic
        die(f"setting the VM up: {exc!r}")
    sys.argv = ["pykata-agent", *agent_argv(options, channel)]
    status = importlib.import_module(agent).main()
    die(f"the agent ended (status {status})")
