"""Host side of pod networking: taps and tc filters in a real network namespace made like CNI's."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from pykata.network import NetworkError, attach, detach, guest_mac, open_tap
from pykata.protocols.agent import agent_pb2
from pykata.resources.network import nic_devices


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def cni_like_netns() -> Iterator[str]:
    """A netns with eth0 (one end of a veth, the other end in the host netns), an address and a
    default route, as the bridge plugin leaves it."""
    name = f"pktest-{secrets.token_hex(3)}"
    host_end = f"pkv{secrets.token_hex(3)}"
    sh(f"ip netns add {name}")
    try:
        sh(f"ip link add {host_end} type veth peer name eth0 netns {name}")
        sh(f"ip netns exec {name} sh -c 'ip link set eth0 address 0a:58:0a:fe:00:09 mtu 1450 up && "
           f"ip addr add 10.253.0.9/24 dev eth0 && ip route add default via 10.253.0.1 dev eth0 && "
           f"ip route add 10.77.0.0/16 via 10.253.0.1 dev eth0'")
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(f"ip link del {host_end}", shell=True, capture_output=True)
        sh(f"ip netns del {name}")


async def test_attach_makes_tap_and_filters_and_detach_removes_them(cni_like_netns: str) -> None:
    ns = os.path.basename(cni_like_netns)
    net = await attach(cni_like_netns)
    try:
        assert [e.name for e in net.endpoints] == ["eth0"]
        e = net.endpoints[0]
        assert (e.mac, e.mtu, e.addresses) == ("0a:58:0a:fe:00:09", 1450, [("10.253.0.9", 24)])
        assert "tap0_kata" in sh(f"ip netns exec {ns} ip -o link show tap0_kata")
        assert "mtu 1450" in sh(f"ip netns exec {ns} ip -o link show tap0_kata")
        assert "Redirect to device tap0_kata" in sh(f"ip netns exec {ns} tc filter show dev eth0 ingress")
        assert "Redirect to device eth0" in sh(f"ip netns exec {ns} tc filter show dev tap0_kata ingress")
        [iface] = net.interfaces()
        assert iface.current_hw_addr == guest_mac(0) and iface.hw_addr == "0a:58:0a:fe:00:09"
        assert [(a.address, a.prefix_length) for a in iface.addresses] == [("10.253.0.9", 24)]
        routes = {(r.dest, r.gateway, r.device) for r in net.guest_routes()}
        assert routes == {("default", "10.253.0.1", "eth0"), ("10.77.0.0/16", "10.253.0.1", "eth0")}
        [dev] = nic_devices(net)
        assert dev.mac == guest_mac(0) and dev.tap_fd is not None
    finally:
        await detach(net)
    assert "tap0_kata" not in sh(f"ip netns exec {ns} ip -o link")
    assert "ingress" not in sh(f"ip netns exec {ns} tc qdisc show dev eth0")
    assert net.endpoints[0].tap_fd is None


async def test_tap_disappears_with_its_last_fd(cni_like_netns: str) -> None:
    ns = os.path.basename(cni_like_netns)
    fd = open_tap("tap5_kata", cni_like_netns)
    try:
        assert "tap5_kata" in sh(f"ip netns exec {ns} ip -o link")
        assert "tap5_kata" not in sh("ip -o link"), "the tap is made in the pod's namespace only"
    finally:
        os.close(fd)
    assert "tap5_kata" not in sh(f"ip netns exec {ns} ip -o link")


async def test_missing_netns_is_a_clear_error_and_creates_nothing() -> None:
    path = f"/var/run/netns/pk-missing-{secrets.token_hex(3)}"
    with pytest.raises(NetworkError, match="does not exist"):
        await attach(path)
    assert not os.path.exists(path)


def test_bad_tap_name() -> None:
    with pytest.raises(NetworkError, match="tap name"):
        open_tap("x" * 20)


async def test_loopback_only_netns_has_no_endpoints() -> None:
    name = f"pktest-{secrets.token_hex(3)}"
    sh(f"ip netns add {name}")
    try:
        net = await attach(f"/var/run/netns/{name}")
        assert net.endpoints == [] and nic_devices(net) == [] and net.guest_routes() == []
        await detach(net)
    finally:
        sh(f"ip netns del {name}")


def test_agent_messages_are_valid() -> None:
    from pykata.agent.network import check_interface

    check_interface(agent_pb2.Interface(current_hw_addr=guest_mac(0), hw_addr="0a:58:0a:fe:00:09", mtu=1500))


def _open_fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


async def test_no_fork_no_stray_signal_no_fd_leak(cni_like_netns: str) -> None:
    """Regression: pyroute2's netns= forked a child that inherited the loop's signal wake-up socket
    and was ended with SIGTERM, which the shim's loop then took as its own SIGTERM and exited. The
    netlink socket is now made in a setns thread: no child, no signal, no fd left open."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    got: list[int] = []
    loop.add_signal_handler(signal.SIGTERM, got.append, signal.SIGTERM)
    fds_before = _open_fds()
    try:
        for _ in range(10):
            net = await attach(cni_like_netns)
            await detach(net)
        await asyncio.sleep(0.1)  # a stray signal would be dispatched by now
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    assert got == []
    # fds opened by the test and still open; one closed meanwhile (an earlier test's transport being
    # collected) is not a leak of this one
    assert {fd: target for fd, target in _open_fds().items() if fds_before.get(fd) != target} == {}
