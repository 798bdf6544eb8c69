"""An egress sandbox with hypervisor.qemu.user_network = "passt": QEMU has an empty network namespace
and passt, beside it as a uid of its own, opens the guest's connections.

Attacks, each beside a control that shows the probe is sound:
  * from the guest: a TCP service of the host on 127.0.0.1 (through the gateway 10.0.2.2) and on two
    host-only addresses (a veth end of this host, in the host's namespace, that the policy even
    allows, and the address of the host's default route). The host itself reaches the service; the
    guest reaches an allowed address outside the host.
  * from QEMU itself (a guest that took QEMU over through a device bug), stood in for by QMP, which makes
    the real QEMU open sockets where a compromised one would: `chardev-add` of a TCP client to the host's
    127.0.0.1, to a host-only address and to the allowed address, and `netdev_add` of a libslirp NIC
    with a host forward. A QEMU on libslirp (user_network = "slirp", in the host's namespace) reaches
    the allowed address the same way (control).
  * crashes: passt killed (the guest loses its network, the sandbox still ends cleanly) and QEMU killed
    (passt ends by itself); nothing is left (tests/conftest.py's leak check counts passt too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import pykata
from pykata.config import Config, load_config
from pykata.hypervisor.errors import QmpError
from pykata.network import egress
from pykata.network.egress import chain_name
from pykata.sandbox.snapshotdir import SnapshotError
from tests.sdk.test_network import Subnet, host_services, test_net  # noqa: F401 (fixtures)


def _config(stack: str) -> Config:
    config = load_config()
    qemu = dataclasses.replace(config.qemu, user_network=stack)
    return dataclasses.replace(config, hypervisor=dataclasses.replace(config.hypervisor, qemu=qemu))


# Answers every A query with 192.0.2.44 (anything else with no record), on UDP port 53 of argv[1].
_RESOLVER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53)); print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048)
    q = d[12:12 + d[12:].index(b"\\0") + 5]
    ans = b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 44]) if q[-4:-2] == b"\\0\\1" else b""
    s.sendto(d[:2] + b"\\x81\\x80" + struct.pack(">HHHH", 1, 1 if ans else 0, 0, 0) + q + ans, a)
"""


async def _connect(sb: pykata.AsyncSandbox, addr: str, port: int) -> str:
    """What the guest reads from addr:port ("" when the connection fails). nc's stdin is a FIFO it
    holds open itself, so the guest never shuts its side down first: Debian 12's passt loses the
    server's FIN after an early one of the guest (configuration.toml, user_network)."""
    r = await sb.run(["sh", "-c", f"mkfifo /tmp/in.$$; timeout -s KILL 15 nc -w 5 {addr} {port} <>/tmp/in.$$; "
                                  "rc=$?; rm -f /tmp/in.$$; exit $rc"], timeout=60)
    return r.stdout.decode() if r.exit_code == 0 else ""


def _default_route_address() -> str:
    """The host's own address on its default route's interface (a host-only address a guest must
    not reach, outside any test namespace)."""
    dev = subprocess.run(["ip", "-o", "route", "show", "default"], capture_output=True, text=True,
                         check=True).stdout.split(" dev ")[1].split()[0]
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", dev], capture_output=True, text=True,
                         check=True).stdout
    return out.split(" inet ")[1].split("/")[0]


def _tcp_probe(host: str, port: int) -> dict[str, Any]:
    return {"id": f"probe{port}-{host.replace('.', '-')}", "backend": {"type": "socket", "data": {
        "addr": {"type": "inet", "data": {"host": host, "port": str(port)}}, "server": False}}}


def _answers(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5) as s:
        return s.recv(100) == b"host secret\n"


def _passt(uid: int) -> psutil.Process:
    found = [p for p in psutil.process_iter(["uids", "cmdline"]) if p.info["uids"].real == uid]
    assert len(found) == 1 and "passt" in " ".join(found[0].info["cmdline"]), found
    return found[0]


@pytest.fixture
async def passt_sandbox(test_net: Subnet) -> AsyncIterator[pykata.AsyncSandbox]:  # noqa: F811
    n = test_net
    async with pykata.AsyncSandbox(network="egress", allow=[f"{n.near}/32", f"{n.host_end}/32"], dns=[n.far],
                                   config=_config("passt")) as sb:
        yield sb


@pytest.mark.vm
async def test_neither_the_guest_nor_its_qemu_reaches_the_host(
        passt_sandbox: pykata.AsyncSandbox, test_net: Subnet, host_services: int) -> None:  # noqa: F811
    n, sb, port = test_net, passt_sandbox, host_services
    vm = sb._own("test").vm
    assert vm is not None and vm.pid is not None and vm.user_net_uid not in (None, vm.jail_uid)
    # where everything runs: QEMU in a namespace with nothing but a loopback; passt in the host's, as
    # its own uid, which the sandbox's filter rules match
    host_ns = os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{vm.pid}/ns/net") != host_ns
    links = subprocess.run(["nsenter", "-t", str(vm.pid), "-n", "ip", "-o", "link"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    passt = _passt(vm.user_net_uid)
    assert os.readlink(f"/proc/{passt.pid}/ns/net") == host_ns
    rules = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, text=True, check=True).stdout
    assert f"--uid-owner {vm.user_net_uid} " in rules and chain_name(sb.id) in rules
    assert f"--uid-owner {vm.jail_uid} " not in rules

    # the guest: an allowed address outside the host answers (control), so does the `dns` resolver over
    # UDP (its resolv.conf names it), the host's services do not
    assert await _connect(sb, n.near, 8080) == "port 8080\n"
    resolver = subprocess.Popen(["ip", "netns", "exec", n.netns, sys.executable, "-c", _RESOLVER, n.far],
                                stdout=subprocess.PIPE)
    try:
        assert resolver.stdout is not None and resolver.stdout.readline() == b"ready\n"
        r = await sb.run(["nslookup", "example.org"], timeout=60)
        assert r.exit_code == 0 and b"192.0.2.44" in r.stdout, r.stdout + r.stderr
    finally:
        resolver.kill()
        resolver.wait()
    own = _default_route_address()
    for addr in ("127.0.0.1", n.host_end, own):
        assert await asyncio.to_thread(_answers, addr, port)  # control: the host reaches its service
    for addr in ("10.0.2.2", n.host_end, own, "10.0.2.3"):
        assert await _connect(sb, addr, port) == "", addr

    # QEMU itself: no socket it opens leaves its namespace, even to where the guest may go
    for addr, target_port in (("127.0.0.1", port), (n.host_end, port), (own, port), (n.near, 8080)):
        with pytest.raises(QmpError, match=r"(?i)unreachable|refused"):
            await vm.qmp.execute("chardev-add", _tcp_probe(addr, target_port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    # a libslirp NIC added at run time would open its forward's listener in QEMU's namespace, not the host's
    with contextlib.suppress(QmpError):  # refused outright: as good
        await vm.qmp.execute("netdev_add", {"type": "user", "id": "probe-user",
                                            "hostfwd": [{"str": f"tcp:127.0.0.1:{free}-:22"}]})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", free), timeout=5).close()
    assert await _connect(sb, n.near, 8080) == "port 8080\n"  # the sandbox works on


@pytest.mark.vm
async def test_control_a_slirp_qemu_reaches_what_its_guest_may(test_net: Subnet) -> None:  # noqa: F811
    """The QMP probe above is sound: the same chardev-add from a QEMU on libslirp (in the host's
    namespace, filtered as its guest is) connects to the allowed address."""
    n = test_net
    async with pykata.AsyncSandbox(network="egress", allow=[f"{n.near}/32"], config=_config("slirp")) as sb:
        vm = sb._own("test").vm
        assert vm is not None
        await vm.qmp.execute("chardev-add", _tcp_probe(n.near, 8080))


@pytest.mark.vm
async def test_a_crash_of_passt_or_qemu_leaves_nothing(test_net: Subnet) -> None:  # noqa: F811
    n = test_net
    async with pykata.AsyncSandbox(network="egress", config=_config("passt")) as sb:
        vm = sb._own("test").vm
        assert vm is not None and vm.user_net_uid is not None
        assert await _connect(sb, n.near, 8080) == "port 8080\n"
        _passt(vm.user_net_uid).send_signal(signal.SIGSEGV)
        deadline = time.monotonic() + 10
        while any(p.info["uids"].real == vm.user_net_uid for p in psutil.process_iter(["uids"])):
            assert time.monotonic() < deadline, "passt outlived its crash"
            await asyncio.sleep(0.1)
        assert await _connect(sb, n.near, 8080) == ""  # no network stack: nothing gets out
        assert (await sb.run(["true"])).exit_code == 0  # the rest of the sandbox is unaffected
        ids = [sb.id]
    async with pykata.AsyncSandbox(network="egress", config=_config("passt")) as sb:
        vm = sb._own("test").vm
        assert vm is not None and vm.pid is not None and vm.user_net_uid is not None
        passt = _passt(vm.user_net_uid)
        os.kill(vm.pid, signal.SIGKILL)
        await asyncio.to_thread(passt.wait, 10)  # it ends by itself when QEMU's end of the stream closes
        ids.append(sb.id)
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
    assert not [i for i in ids if i in rules or chain_name(i) in rules]

    def naming(ids: list[str]) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if any(i in " ".join(p.info["cmdline"] or ()) for i in ids)]

    # the sandboxes' reapers (pykata.sandbox.reaper), released by their stop, end on their own a moment later
    deadline = time.monotonic() + 10
    while naming(ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not naming(ids)



def test_the_sweep_tells_a_running_passt_by_its_sandbox_directory() -> None:
    """A dead owner's rules stay while its passt runs: that passt, named by its log in the sandbox's
    directory (an exact path component: "sb1" is a prefix of "sb12")."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--log-file",
                             "/run/pykata/sandboxes/sb12/vm/net0.log"])
    try:
        time.sleep(0.2)  # exec'd: its command line is the one above
        assert egress._vmm_running(os.getuid(), "sb12")
        assert not egress._vmm_running(os.getuid(), "sb1")
        assert not egress._vmm_running(os.getuid(), "net0.log")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.vm
async def test_a_passt_snapshot_restores_on_passt_only(test_net: Subnet, tmp_path: Path) -> None:  # noqa: F811
    """A snapshot restores with its policy made again for the new passt's uid; on the other stack it is
    refused naming the field (a libslirp QEMU saves libslirp's state in its stream)."""
    n = test_net
    async with pykata.AsyncSandbox(network="egress", snapshots=True, allow=[f"{n.near}/32"],
                                   config=_config("passt")) as sb:
        assert await _connect(sb, n.near, 8080) == "port 8080\n"
        await sb.snapshot(tmp_path / "snap")
    with pytest.raises(SnapshotError, match=r"network\.user_network"):
        await pykata.AsyncSandbox.restore(tmp_path / "snap", config=_config("slirp"))
    restored = await pykata.AsyncSandbox.restore(tmp_path / "snap", config=_config("passt"))
    try:
        vm = restored._own("test").vm
        assert vm is not None and vm.pid is not None and vm.user_net_uid is not None
        assert os.readlink(f"/proc/{vm.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert _passt(vm.user_net_uid).pid
        assert await _connect(restored, n.near, 8080) == "port 8080\n"
        assert await _connect(restored, n.far, 8080) == ""  # the saved policy: not in allow
    finally:
        await restored.close()


# Starts an egress sandbox on passt, says its id and passt's uid, and waits to be killed.
_OWNER = """
import sys, time, pykata
sb = pykata.Sandbox(network="egress").start()
print(sb.id, sb._async._own("t").vm.user_net_uid, flush=True)
time.sleep(600)
"""


@pytest.mark.vm
async def test_passt_dies_with_a_killed_owner_and_its_reaper_removes_its_rules(tmp_path: Path) -> None:
    conf = tmp_path / "pykata.toml"
    conf.write_text(f'{load_config_text()}\n')
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYKATA_CONFIG": str(conf)})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 240)  # type: ignore[union-attr]
        sid, uid = line.split()
        assert _passt(int(uid)).pid and chain_name(sid) in _rules()
        owner.kill()  # SIGKILL: it cannot stop anything; QEMU and passt die with it (lifelines)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while [p for p in psutil.process_iter(["uids", "cmdline"])
           if p.info["uids"].real == int(uid) or sid in " ".join(p.info["cmdline"] or ())]:
        assert time.monotonic() < deadline, "the killed owner's passt or QEMU ran on"
        await asyncio.sleep(0.2)
    # its directory and its rules: removed by its reaper (pykata.sandbox.reaper), not left to the next
    # egress sandbox's sweep or `pykata cleanup`
    sandbox_dir = Path(load_config({"PYKATA_CONFIG": str(conf)}).runtime.runtime_dir) / "sandboxes" / sid
    while sandbox_dir.exists() or sid in _rules() or chain_name(sid) in _rules():
        assert time.monotonic() < deadline + 30, "the killed owner's sandbox directory or filter rules stayed"
        await asyncio.sleep(0.2)
    assert sid not in await egress.sweep()  # nothing of it left for a sweep
    out = subprocess.run([str(Path(sys.executable).parent / "pykata"), "cleanup"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYKATA_CONFIG": str(conf)}).stdout
    assert sid not in out


def _rules() -> str:
    return subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True).stdout


def load_config_text() -> str:
    """The configuration in force with user_network = "passt" (the packaged default's text, edited)."""
    from pykata.config.load import find_config_path, packaged_default_text

    path = find_config_path()
    text = path.read_text() if path is not None else packaged_default_text()
    assert 'user_network = "slirp"' in text
    return text.replace('user_network = "slirp"', 'user_network = "passt"')
