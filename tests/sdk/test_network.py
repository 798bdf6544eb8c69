"""A sandbox's network: none by default; network="egress" with allow/deny enforced on the host by the
VMM's uid (pykata.network.egress); expose(). Every address is inside a network namespace this test
makes (a veth pair with private addresses, servers in the namespace): nothing leaves the machine."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

import pykata
from pykata.config import load_config
from pykata.network import egress
from pykata.network.egress import (
    EgressPolicy,
    InstalledRule,
    chain_name,
    installed_rules,
    leftover_chains,
    owner_tag,
    render,
)
from pykata.sandbox import SpecError
from tests.netns import Subnet, served_subnet


@pytest.fixture
def test_net() -> Iterator[Subnet]:
    with served_subnet("pktest", f"198.18.{16 + secrets.randbelow(200)}", (8080, 8081)) as net:
        yield net


@pytest.fixture
async def host_services() -> AsyncIterator[int]:
    """A service on the host's 127.0.0.1 and on all its addresses: the port (the same on both)."""

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"host secret\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(answer, "0.0.0.0", 0)
    port = server.sockets[0].getsockname()[1]
    yield port
    server.close()
    await server.wait_closed()


async def _connect(sb: pykata.AsyncSandbox, addr: str, port: int) -> str:
    """What the guest reads from addr:port ("" when the connection fails)."""
    r = await sb.run(["timeout", "-s", "KILL", "15", "nc", "-w", "5", addr, str(port)], timeout=60)
    return r.stdout.decode() if r.exit_code == 0 else ""


def _chains() -> str:
    return subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout


@pytest.mark.vm
async def test_egress_allow_deny_expose_and_attacks(test_net: Subnet, host_services: int) -> None:
    n = test_net
    async with (pykata.AsyncSandbox(network="egress", allow=[f"{n.near}/32", f"{n.host_end}/32"],
                                    deny=[f"{n.near}:8081"], dns=[n.far]) as sb,
                pykata.AsyncSandbox(network="egress") as other):
        assert chain_name(sb.id) in _chains()
        assert await sb.files.read("/etc/resolv.conf") == f"nameserver {n.far}\n"
        assert f"-A {chain_name(sb.id)} -d {n.far}/32 -p udp -m udp --dport 53 -j ACCEPT" in _chains()
        assert await _connect(sb, n.near, 8080) == "port 8080\n"  # allowed
        assert await _connect(sb, n.near, 8081) == ""  # denied port: deny wins over allow
        assert await _connect(sb, n.far, 8080) == ""  # not in allow
        assert await _connect(other, n.far, 8080) == "port 8080\n"  # no allow list: anything not denied
        # the host: its loopback through the user network's gateway, its own addresses even when allowed
        for guest in (sb, other):
            assert await _connect(guest, "10.0.2.2", host_services) == ""
            assert await _connect(guest, n.host_end, host_services) == ""
        # expose: the host reaches a guest port; another sandbox cannot (it is on the host's loopback)
        listener = await sb.spawn(["sh", "-c", "echo from-guest | nc -l -p 8000"])
        host_port = await sb.expose(8000)
        deadline = time.monotonic() + 30
        got = b""
        while not got and time.monotonic() < deadline:
            assert await _connect(other, "10.0.2.2", host_port) == ""
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
                got = await asyncio.wait_for(reader.read(100), 10)
                writer.close()
            except OSError:
                await asyncio.sleep(0.5)
        assert got == b"from-guest\n"
        await listener.wait(30)
        # the guest owns its side (root in the VM): changing its address or route changes nothing outside
        await sb.run("ip addr add 10.0.2.99/24 dev eth0; ip route replace default via 10.0.2.2 src 10.0.2.99")
        assert await _connect(sb, n.far, 8080) == ""
        assert await _connect(sb, "10.0.2.2", host_services) == ""
        ids = (sb.id, other.id)
    assert not [c for c in leftover_chains(_chains()) if c in {chain_name(i) for i in ids}]
    assert not [line for line in _chains().splitlines() if any(i in line for i in ids)]


@pytest.mark.vm
async def test_an_egress_snapshot_restores_its_policy_for_a_new_uid(test_net: Subnet, host_services: int,
                                                                     tmp_path: Path) -> None:
    n = test_net
    async with pykata.AsyncSandbox(network="egress", snapshots=True, allow=[f"{n.near}/32"],
                                   deny=[f"{n.near}:8081"]) as sb:
        assert await _connect(sb, n.near, 8080) == "port 8080\n"
        saved_uid = sb._own("test").vm.jail_uid  # type: ignore[union-attr]
        await sb.snapshot(tmp_path / "snap")
    restored = await pykata.AsyncSandbox.restore(tmp_path / "snap")
    try:
        uid = restored._own("test").vm.jail_uid  # type: ignore[union-attr]
        assert uid != saved_uid
        assert f"--uid-owner {uid} -m comment --comment \"pykata sandbox {restored.id} owner" in _chains()
        # the same policy, made again before the restored QEMU ran: allowed, denied port, not allowed, the host
        assert await _connect(restored, n.near, 8080) == "port 8080\n"
        assert await _connect(restored, n.near, 8081) == ""
        assert await _connect(restored, n.far, 8080) == ""
        assert await _connect(restored, "10.0.2.2", host_services) == ""
        listener = await restored.spawn(["sh", "-c", "echo restored | nc -l -p 8000"])
        host_port = await restored.expose(8000)  # a forward of its own (none is saved)
        got = b""
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
                got = await asyncio.wait_for(reader.read(100), 10)
                writer.close()
            except OSError:
                await asyncio.sleep(0.5)
        assert got == b"restored\n"
        await listener.wait(30)
    finally:
        await restored.close()
    assert restored.id not in _chains()


@pytest.mark.vm
async def test_no_network_by_default() -> None:
    async with pykata.AsyncSandbox() as sb:
        r = await sb.run("ls /sys/class/net")
        assert r.stdout.split() == [b"lo"]
        with pytest.raises(SpecError, match="network"):
            await sb.expose(80)


def test_bad_policies_name_the_field() -> None:
    with pytest.raises(SpecError, match=r"^allow: "):
        pykata.AsyncSandbox(allow=["10.0.0.0/8"])  # without network="egress"
    with pytest.raises(SpecError, match=r"^network: "):
        pykata.AsyncSandbox(network="bridge")  # type: ignore[arg-type]
    for field, kwargs in (("allow", {"allow": ["10.0.0.300"]}), ("deny", {"deny": ["10.0.0.0/8:0"]}),
                          ("deny", {"deny": "10.0.0.0/8"}), ("dns", {"dns": ["resolver"]}),
                          ("allow", {"allow": ["::1"]}), ("deny", {"deny": ["10.0.0.1:99999"]})):
        with pytest.raises(SpecError, match=rf"^{field}: "):
            pykata.AsyncSandbox(network="egress", **kwargs)  # type: ignore[arg-type]


def test_rules_deny_before_allow_and_host_before_everything() -> None:
    policy = EgressPolicy.build(allow=["0.0.0.0/0"], deny=["192.0.2.0/24:22-25"], dns=["192.0.2.53"])
    lines = render(policy, 4242, "sb1").splitlines()
    chain = chain_name("sb1")
    body = [line for line in lines if line.startswith(f"-A {chain}")]
    order = [next(i for i, line in enumerate(body) if marker in line)
             for marker in ("ESTABLISHED", "192.0.2.0/24", "LOCAL", "127.0.0.0/8", "--dport 53",
                            "-d 0.0.0.0/0 -j ACCEPT")]
    assert order == sorted(order)
    assert body[-2:] == [f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset", f"-A {chain} -j REJECT"]
    comment = f"pykata sandbox sb1 owner {owner_tag()}"
    jump = f'-I OUTPUT -m owner --uid-owner 4242 -m comment --comment "{comment}" -j {chain}'
    assert jump in lines


def test_installed_rules_name_their_owner() -> None:
    listing = "\n".join([
        "-P OUTPUT ACCEPT",
        '-A OUTPUT -m owner --uid-owner 4242 -m comment --comment "pykata sandbox sb1 owner 77:123" -j PYKATA-x',
        '-A OUTPUT -m owner --uid-owner 4243 -m comment --comment "pykata sandbox sb2" -j PYKATA-y',  # no owner: kept
        '-A OUTPUT -m comment --comment "pykata sandbox sb3 owner 1:2; rm" -j ACCEPT',  # not ours: no uid
    ])
    assert installed_rules(listing) == [InstalledRule("sb1", 4242, "77:123")]
    assert not InstalledRule("me", 1, owner_tag()).owner_gone()
    assert InstalledRule("me", 1, f"{os.getpid()}:1").owner_gone()  # the pid now names another process


def test_a_vmm_still_running_is_told_by_its_exact_name() -> None:
    """The sweep keeps a dead owner's rules while its QEMU still runs: that QEMU, by its exact `-name`, not
    any process of the uid whose command line contains the id ("sb1" is a prefix of "sb12")."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-name", "pykata-sb12,debug-threads=on"])
    try:
        time.sleep(0.2)  # exec'd: its command line is the one above
        assert egress._vmm_running(os.getuid(), "sb12")
        assert not egress._vmm_running(os.getuid(), "sb1")
    finally:
        proc.kill()
        proc.wait()


# Starts an egress sandbox, says its id, and waits to be killed.
_OWNER = """
import sys, time, pykata
sb = pykata.Sandbox(network="egress").start()
print(sb.id, flush=True)
time.sleep(600)
"""

# Installs the filter rules of sandbox argv[1] for uid argv[2] (no VM) and exits: a dead owner's rules.
_DEAD_OWNER_RULES = """
import asyncio, sys
from pykata.network import egress
asyncio.run(egress.install(egress.EgressPolicy.build(), int(sys.argv[2]), sys.argv[1]))
"""


def _listings() -> str:
    return "".join(subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True).stdout
                   for tool in ("iptables", "ip6tables"))


async def test_a_sweep_for_one_sandbox_removes_only_its_dead_owners_rules() -> None:
    """egress.sweep(sandbox_id), a reaper's: that sandbox's rules whose owner is gone go; another dead
    owner's stay (the next egress sandbox's full sweep, or `pykata cleanup`, removes them)."""
    mine, other = f"dead-a-{secrets.token_hex(4)}", f"dead-b-{secrets.token_hex(4)}"
    try:
        for sid, uid in ((mine, "3999871"), (other, "3999872")):
            subprocess.run([sys.executable, "-c", _DEAD_OWNER_RULES, sid, uid], check=True, timeout=60)
        assert _listings().count(f"pykata sandbox {mine} owner") == 2  # the IPv4 and IPv6 jumps
        assert await egress.sweep(mine) == [mine]
        listing = _listings()
        assert mine not in listing and chain_name(mine) not in listing
        assert listing.count(f"pykata sandbox {other} owner") == 2 and chain_name(other) in listing
    finally:
        await egress.sweep(mine)
        await egress.sweep(other)
    assert other not in _listings()


@pytest.mark.vm
async def test_rules_of_a_killed_owner_are_removed_by_its_reaper() -> None:
    """An egress sandbox's owner SIGKILLed: its reaper (pykata.sandbox.reaper) removes the host filter
    rules (the IPv4 chain and jump, the IPv6 jump) with its directory, without `pykata cleanup` or another
    egress sandbox's sweep; a live owner's rules stay through `pykata cleanup`."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 240)  # type: ignore[union-attr]
        sid = line.strip()
        assert sid and chain_name(sid) in _chains()
        assert _listings().count(f"pykata sandbox {sid} owner") == 2  # the IPv4 and IPv6 jumps
        owner.kill()  # SIGKILL: it cannot remove anything; its QEMU dies with it (the lifeline)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while any(sid in " ".join(p.cmdline()) for p in psutil.process_iter() if _alive(p)):
        assert time.monotonic() < deadline, "the killed owner's QEMU ran on"
        await asyncio.sleep(0.2)
    # its reaper removes its directory and its rules
    sandbox_dir = Path(load_config().runtime.runtime_dir) / "sandboxes" / sid
    while sandbox_dir.exists() or sid in _listings() or chain_name(sid) in _listings():
        assert time.monotonic() < deadline + 30, ("the killed owner's sandbox directory or filter rules stayed",
                                                  sandbox_dir.exists(), sid in _listings())
        await asyncio.sleep(0.2)
    async with pykata.AsyncSandbox(network="egress") as live:
        assert live.id in _listings()
        out = subprocess.run([str(Path(sys.executable).parent / "pykata"), "cleanup"], capture_output=True,
                             text=True, check=True).stdout
        assert sid not in out and live.id not in out
        assert chain_name(live.id) in _chains()
        assert (await live.run("true")).ok


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
