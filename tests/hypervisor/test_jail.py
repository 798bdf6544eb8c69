"""The VMM's jail: each confinement layer is active on a running VM, and what a compromised QEMU (or a
QMP caller) would try next fails."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import mmap
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import pykata
from pykata.config import Config, load_config, parse_toml
from pykata.errors import ConfigError, HypervisorError
from pykata.hypervisor import helperroot, ksm
from pykata.hypervisor.errors import QmpError
from pykata.hypervisor.jail import JailSpec, UidLease, inspect_process
from pykata.hypervisor.qemu import ramreadonly
from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths, build_command_line

# Capabilities virtfs-proxy-helper keeps to serve files, and nothing else: chown, dac_override,
# fowner, fsetid, setgid, setuid, mknod.
PROXY_HELPER_CAPS = 0x80000DB
CAP_SYS_ADMIN = 1 << 21


def _spec(jail: JailSpec, *, proxy_fd: int | None = None) -> LaunchSpec:
    q = dataclasses.replace(Config().qemu, shared_fs="virtio-9p")
    return LaunchSpec(vm_id="j1", config=q, accel="tcg", kernel=Path("/k"), paths=VmPaths(Path("/run/vm")),
                      shared_dir=Path("/run/shared"), jail=jail, proxy_9p_fd=proxy_fd)


def test_jailed_command_line() -> None:
    jail = JailSpec(seccomp=True, uid=1500000007, gid=1500000007, chroot=Path("/run/vm/root"),
                    mount_namespace=True)
    argv = build_command_line(_spec(jail, proxy_fd=9)).argv()
    tail = argv[argv.index("-sandbox"):]
    # -runas needs set*id after the filter is installed: elevateprivileges stays allowed for it.
    assert tail == ["-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                    "-chroot", "/run/vm/root", "-runas", "1500000007:1500000007"]
    assert "proxy,id=fsdev-fs0,sock_fd=9" in argv
    assert not any(a.startswith("local,") for a in argv)


def test_seccomp_alone_denies_privilege_elevation_too() -> None:
    jail = JailSpec(seccomp=True, uid=None, gid=None, chroot=None, mount_namespace=False)
    argv = build_command_line(_spec(jail)).argv()
    assert argv[argv.index("-sandbox") + 1] == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    assert "-runas" not in argv and "-chroot" not in argv
    assert any(a.startswith("local,") for a in argv)  # root QEMU serves 9p itself


def test_uid_leases_are_exclusive_and_given_back(tmp_path: Path) -> None:
    q = parse_toml("[hypervisor.qemu]\njail_uid_base = 3000000000\njail_uid_count = 2\n").qemu
    a = UidLease.acquire(q, tmp_path)
    b = UidLease.acquire(q, tmp_path)
    assert {a.uid, b.uid} == {3000000000, 3000000001}
    with pytest.raises(HypervisorError, match="jail_uid_count"):
        UidLease.acquire(q, tmp_path)
    a.release()
    a.release()  # idempotent
    c = UidLease.acquire(q, tmp_path)
    assert c.uid not in (b.uid,)
    b.release()
    c.release()
    assert list((tmp_path / "jail" / "uids").iterdir()) == []


@pytest.mark.parametrize(("text", "key"), [
    ("jail_uid_base = 0", "hypervisor.qemu.jail_uid_base"),
    ("jail_uid_count = 0", "hypervisor.qemu.jail_uid_count"),
    ("jail_uid_base = 4294967000\njail_uid_count = 65536", "hypervisor.qemu.jail_uid_count"),
    ("jail_seccomp = 'on'", "hypervisor.qemu.jail_seccomp"),
])
def test_bad_jail_keys_are_named(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_toml("[hypervisor.qemu]\n" + text + "\n")
    assert key in str(info.value)


def _take_fd(pid: int, fd: int) -> int:
    """A copy of process `pid`'s descriptor `fd` (pidfd_getfd, Linux 5.6): what that process can do
    with it, this one can."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def _assert_no_network_from(pid: int) -> None:
    """A TCP listener on the host's loopback, the metadata address clouds serve node credentials on,
    and an abstract unix socket of the host's namespace (the shims' fork server listens on one, and
    lets any uid-0 peer in: virtfs-proxy-helper is uid 0), tried from process `pid`'s network
    namespace (nsenter): all unreachable."""
    abstract = f"\0pykata-jail-test-{os.getpid()}"
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(abstract)
        unix.listen(1)
        port = server.getsockname()[1]
        probe = ("import socket, sys\n"
                 "for addr in (('127.0.0.1', int(sys.argv[1])), ('169.254.169.254', 80), sys.argv[2]):\n"
                 "    try:\n"
                 "        if isinstance(addr, str):\n"
                 "            s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect('\\0' + addr)\n"
                 "        else:\n"
                 "            s = socket.create_connection(addr, timeout=2)\n"
                 "        s.close()\n"
                 "        print('reached', addr)\n"
                 "    except OSError as e:\n"
                 "        print('refused', e.errno)\n")
        out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", probe, str(port),
                              abstract[1:]], capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
    assert [line.split()[0] for line in out if line] == ["refused"] * 3, out
    # the same probe from the host's namespace does reach the listener: the probe itself works
    with socket.create_server(("127.0.0.1", 0)) as server:
        socket.create_connection(server.getsockname(), timeout=2).close()


def _processes_of(vm_dir: Path, shared_dir: Path) -> dict[str, int]:
    """The pids of the QEMU and the file server of one VM, found by their command lines."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        joined = " ".join(text)
        if text[0].endswith("qemu-system-x86_64") and str(vm_dir) in joined:
            found["qemu"] = int(entry.name)
        elif text[0].endswith(("virtfs-proxy-helper", "virtiofsd")) and str(shared_dir) in joined:
            found[Path(text[0]).name] = int(entry.name)
    return found


# What a process taken over by its guest makes in the IPC namespace it is in: a SysV shared memory
# segment and a POSIX message queue, both open to everyone; prints whether each was made.
IPC_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
shm = libc.shmget(int(sys.argv[1]), 4096, 0o1000 | 0o666)  # IPC_CREAT
mq = libc.mq_open(sys.argv[2].encode(), os.O_CREAT | os.O_RDWR, 0o666, None)
print(shm >= 0, mq >= 0)
"""


def _assert_no_host_ipc_from(pid: int, uid: int) -> None:
    """A process in `pid`'s IPC namespace, as `uid`, makes a SysV segment and a POSIX message queue
    (nsenter). Neither is the host's: a QEMU or file server taken over by its guest could otherwise
    fill the host's IPC ids (kernel.shmmni, msgmni) with objects that outlive it, or open other host
    software's. The same objects, looked for from the host's namespace, are absent."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x5E000000 | (os.getpid() & 0xFFFFFF)
    name = f"/pykata-jail-test-{os.getpid()}"
    try:
        out = subprocess.run(["nsenter", f"--ipc=/proc/{pid}/ns/ipc", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                              "--clear-groups", os.path.realpath(sys.executable), "-c", IPC_PROBE, str(key), name],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        assert out == ["True", "True"], out  # made, in the namespace the process was in
        host_keys = [line.split()[0] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
        assert str(key) not in host_keys, "the segment is the host's"
        assert libc.mq_open(name.encode(), os.O_RDONLY) < 0, "the message queue is the host's"
    finally:  # what a failing run left on the host
        shmid = libc.shmget(key, 0, 0)
        if shmid >= 0:
            libc.shmctl(shmid, 0, None)  # IPC_RMID
        libc.mq_unlink(name.encode())


@pytest.mark.vm
async def test_templated_vm_runs_in_every_layer_of_the_jail(tmp_path: Path) -> None:
    config = load_config()
    q = config.qemu
    # A host volume, so the guest mounts the share (since agent protocol 10 it does so only for a
    # container that needs it: a root on an image disk alone leaves 9p unused, and then nothing blocks
    # the migration asked for below, which QEMU's seccomp filter ends by killing QEMU at its fork).
    async with pykata.AsyncSandbox(image="busybox", volumes=[f"{tmp_path}:/v"]) as sb:
        sandbox = sb._sandbox
        vm = sandbox.vm
        assert vm.restore_source is not None
        # The guest works through the jail: 9p served by the proxy helper, writes included.
        r = await sb.exec(["sh", "-c", "echo jailed > /v/probe && cat /v/probe"])
        assert (r.exit_code, r.stdout) == (0, b"jailed\n")
        assert (tmp_path / "probe").read_bytes() == b"jailed\n"

        pids = _processes_of(vm.paths.dir, sandbox.shared_dir)
        assert set(pids) == {"qemu", "virtfs-proxy-helper"}, pids
        assert pids["qemu"] == vm.pid
        c = inspect_process(vm.pid)
        assert c.seccomp_mode == 2
        # three filters: the clone's (clonememory), pykata's (fileguard: no io_uring, no setuid modes;
        # tests/hypervisor/test_fileguard.py performs those calls) and QEMU's own -sandbox
        filters = next(line for line in Path(f"/proc/{vm.pid}/status").read_text().splitlines()
                       if line.startswith("Seccomp_filters:"))
        assert int(filters.split()[1]) >= 3, filters
        assert c.io_urings == 0  # QEMU's two rings at start were refused (it holds none either way)
        assert c.uid != 0 and c.gid != 0
        assert q.jail_uid_base <= c.uid < q.jail_uid_base + q.jail_uid_count
        assert c.groups in ((), (c.gid,))
        assert c.cap_effective == 0 and c.cap_permitted == 0
        assert c.no_new_privs
        assert c.own_mount_namespace
        assert c.root == str(vm.paths.chroot) and os.listdir(vm.paths.chroot) == []
        assert all(c.layers().values()), c.layers()
        # no network: from QEMU's network namespace neither a service on the host's loopback nor a
        # cloud's metadata address is reachable (the guest's own NIC, a tap, is an fd QEMU holds)
        assert c.own_network_namespace
        _assert_no_network_from(vm.pid)
        _assert_no_host_ipc_from(vm.pid, c.uid)
        assert os.readlink(f"/proc/{vm.pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc")
        # QEMU made no file on the host: its sockets were bound by pykata (0600) and passed in
        for sock in (vm.paths.qmp_socket, vm.paths.agent_socket):
            st = os.stat(sock)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), sock
        assert not [p for p in vm.paths.dir.rglob("*") if p.lstat().st_uid == c.uid]
        # hypervisor.qemu.mem_merge = false: no guest RAM is offered to the host's KSM (the "mg" flag)
        assert not q.mem_merge
        flags = [line for line in Path(f"/proc/{vm.pid}/smaps").read_text().splitlines()
                 if line.startswith("VmFlags:")]
        assert flags and not [f for f in flags if " mg" in f], "QEMU marked memory mergeable"
        assert not ksm.merges(vm.pid)  # nor the rest of QEMU's memory (PR_SET_MEMORY_MERGE)

        helper = inspect_process(pids["virtfs-proxy-helper"])
        assert helper.cap_effective & ~PROXY_HELPER_CAPS == 0 and not helper.cap_effective & CAP_SYS_ADMIN
        assert helper.cap_bounding == 0  # it can never get any other capability back
        assert helper.no_new_privs and helper.own_mount_namespace
        # a PID namespace of its own, where it is pid 2 under the namespace's init (its host pid is
        # unchanged for the host's view: tests/hypervisor/qemu/test_proxy9p.py performs the attack)
        helper_pid = pids["virtfs-proxy-helper"]
        assert os.readlink(f"/proc/{helper_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        nspid = next(line for line in Path(f"/proc/{helper_pid}/status").read_text().splitlines()
                     if line.startswith("NSpid:"))
        assert nspid.split()[1:] == [str(helper_pid), "2"], nspid
        assert helper.root == str(sandbox.shared_dir)
        assert helper.own_network_namespace
        _assert_no_network_from(pids["virtfs-proxy-helper"])
        _assert_no_host_ipc_from(pids["virtfs-proxy-helper"], 0)
        # and its second filter: no signal, trace or pidfd to any other process (fileguard.no_reach_program)
        filters = next(line for line in Path(f"/proc/{pids['virtfs-proxy-helper']}/status").read_text().splitlines()
                       if line.startswith("Seccomp_filters:"))
        assert int(filters.split()[1]) >= 2, filters

        # A compromised QEMU's descriptors: the helper hands QEMU one for each directory the guest
        # opens (here the volume, held open by a guest process). `..` from it ends at the helper's
        # own root (/usr and the share, pykata.hypervisor.helperroot), never at the host's `/`
        # (tests/security/test_proxy9p_escape.py: the same walk as a jailed uid, through the protocol).
        holder = await sb.spawn("exec 3</v; echo held; exec sleep 60")
        async for _, chunk in holder:
            if b"held" in chunk:
                break
        dirs: list[int] = []
        for n in os.listdir(f"/proc/{vm.pid}/fd"):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(f"/proc/{vm.pid}/fd/{n}").st_mode):
                    dirs.append(int(n))
        assert dirs, "QEMU holds no descriptor of the guest's open directory"
        host_root = os.stat("/")
        for n in dirs:
            fd = _take_fd(vm.pid, n)
            try:
                top = os.open("../" * 16, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                try:
                    assert (os.fstat(top).st_dev, os.fstat(top).st_ino) != (host_root.st_dev, host_root.st_ino)
                    names = set(os.listdir(top))
                    assert "usr" in names and not names - {*helperroot.SYSTEM_DIRS, "etc",
                                                           sandbox.shared_dir.parts[1]}, names
                    assert os.listdir(os.path.join(f"/proc/self/fd/{top}", "etc")) == ["ld.so.cache"]
                    assert os.statvfs(top).f_flag & os.ST_RDONLY
                finally:
                    os.close(top)
            finally:
                os.close(fd)
        await holder.kill()

        # A compromised QEMU's descriptors: the template's memory file, which every clone of the
        # template maps (other pods' running guests included), is held read-only: a write through it,
        # or a shared writable mapping of it, fails (the descriptor is taken from QEMU with pidfd_getfd).
        memory = vm.restore_source.memory
        assert memory is not None
        held = [int(n) for n in os.listdir(f"/proc/{vm.pid}/fd")
                if os.readlink(f"/proc/{vm.pid}/fd/{n}") == str(memory)]
        assert held, "the clone's QEMU does not map the template's memory file"
        assert ramreadonly.writable_descriptors(vm.pid, memory) == []
        before = memory.stat()
        for n in held:
            fd = _take_fd(vm.pid, n)
            try:
                with pytest.raises(OSError) as write:
                    os.pwrite(fd, b"\xcc" * 4096, 0)
                assert write.value.errno == errno.EBADF
                with pytest.raises(OSError) as shared:
                    mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                assert shared.value.errno == errno.EACCES
            finally:
                os.close(fd)
        assert memory.stat().st_mtime_ns == before.st_mtime_ns

        # What a compromised QEMU would do next, asked over QMP: open a host file, run a program.
        with pytest.raises(QmpError, match=r"No such file|Could not open"):
            await vm.qmp.execute("blockdev-add", {"driver": "file", "node-name": "steal",
                                                  "filename": "/etc/shadow", "read-only": True})
        marker = vm.paths.dir / "spawned"
        with contextlib.suppress(QmpError):  # refused outright: fine too
            await vm.qmp.execute("migrate", {"uri": f"exec:touch {marker}"})
        assert not marker.exists()
        # The VM survived both attempts.
        assert (await sb.exec(["true"])).ok


@pytest.mark.vm
async def test_cold_vm_virtiofsd_is_confined_too() -> None:
    base = load_config()
    config = dataclasses.replace(base, factory=dataclasses.replace(base.factory, enable_template=False))
    async with pykata.AsyncSandbox(image="busybox", config=config) as sb:
        sandbox = sb._sandbox
        vm = sandbox.vm
        assert vm.restore_source is None and vm.shared_fs == "virtio-fs"
        assert (await sb.exec(["sh", "-c", "echo ok > /f && cat /f"])).stdout == b"ok\n"
        pids = _processes_of(vm.paths.dir, sandbox.shared_dir)
        assert set(pids) == {"qemu", "virtiofsd"}, pids
        assert all(inspect_process(pids["qemu"]).layers().values())
        fsd = inspect_process(pids["virtiofsd"])
        # virtiofsd's own sandbox: seccomp, its namespaces with pivot_root into the shared dir, and a
        # reduced capability set (it must stay root to serve files of every owner).
        assert fsd.seccomp_mode == 2 and fsd.no_new_privs and fsd.own_mount_namespace
        assert inspect_process(pids["qemu"]).own_network_namespace and fsd.own_network_namespace
        _assert_no_network_from(pids["qemu"])
        assert not fsd.cap_effective & CAP_SYS_ADMIN
        _assert_no_host_ipc_from(pids["virtiofsd"], 0)  # uid 0: it could remove root's SysV objects


def test_ram_preload_opens_only_the_template_memory_read_only(tmp_path: Path) -> None:
    """The clone's preload library (pykata.hypervisor.qemu.ramreadonly): open() of exactly the named
    file asked read-write opens it read-only, through every entry point QEMU 7.2 uses; other files
    and creating opens are untouched. A real process (python) runs with it."""
    lib = ramreadonly.library(tmp_path / "cache")
    assert lib is not None and lib.is_file()
    memory, other = tmp_path / "memory", tmp_path / "other"
    memory.write_bytes(b"template")
    other.write_bytes(b"other")
    probe = (
        "import ctypes, fcntl, os, sys\n"
        "libc = ctypes.CDLL(None)\n"
        "def mode(fd): return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE if fd >= 0 else -1\n"
        "m, o = sys.argv[1].encode(), sys.argv[2].encode()\n"
        "print(mode(os.open(m, os.O_RDWR)), mode(libc.open64(m, os.O_RDWR)), mode(libc.__open64_2(m, os.O_RDWR)),"
        " mode(libc.open(m, os.O_RDWR)), mode(os.open(o, os.O_RDWR)), mode(libc.__open_2(o, os.O_RDWR)))\n"
    )
    env = {**os.environ, **ramreadonly.environment(lib, memory)}
    out = subprocess.run([sys.executable, "-c", probe, str(memory), str(other)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(os.O_RDONLY)] * 4 + [str(os.O_RDWR)] * 2
    # a second call finds the built library (keyed by its source) instead of building again
    built = lib.stat().st_ino
    assert ramreadonly.library(tmp_path / "cache") == lib and lib.stat().st_ino == built
    # one that others could have changed (it is loaded into a QEMU that starts as root) is built again
    lib.chmod(0o777)
    assert ramreadonly.library(tmp_path / "cache") == lib and lib.stat().st_ino != built
    assert stat.S_IMODE(lib.stat().st_mode) == 0o755


def test_ram_preload_keeps_small_blocks_off_huge_pages(tmp_path: Path) -> None:
    """The clone's preload library: QEMU's madvise(MADV_HUGEPAGE) of a region of at most 2 MiB (a ROM,
    such as the ACPI tables' 2 MiB block) becomes MADV_NOHUGEPAGE, so one write does not cost a whole
    huge page; a larger region (guest RAM, TCG's code buffer) keeps MADV_HUGEPAGE. A real process
    (python) runs with it; the kernel's record of the advice (smaps VmFlags: hg / nh) is checked."""
    lib = ramreadonly.library(tmp_path / "cache")
    assert lib is not None
    probe = (
        "import ctypes, mmap\n"
        "def flags(m):\n"
        "    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
        "    hit = False\n"
        "    for line in open('/proc/self/smaps'):\n"
        "        head = line.split()[0]\n"
        "        if '-' in head and ':' not in head:\n"
        "            lo, hi = (int(x, 16) for x in head.split('-'))\n"
        "            hit = lo <= addr < hi\n"
        "        elif hit and head == 'VmFlags:':\n"
        "            return set(line.split()[1:])\n"
        "out = []\n"
        "for size in (2 << 20, 4 << 20):\n"
        "    m = mmap.mmap(-1, size)\n"
        "    m.madvise(mmap.MADV_HUGEPAGE)\n"
        "    f = flags(m)\n"
        "    out.append('hg' if 'hg' in f else 'nh' if 'nh' in f else '-')\n"
        "print(*out)\n"
    )
    env = {**os.environ, **ramreadonly.environment(lib, tmp_path / "memory")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["nh", "hg"]
    # without the library, the small region keeps the advice it was given (the probe is sound)
    plain = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert plain == ["hg", "hg"]
