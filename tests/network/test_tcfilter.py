"""Host side of pod networking: taps and tc filters in a real network namespace made like CNI's."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
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


def _frame(src_mac: str, ethertype: int, payload: bytes) -> bytes:
    return b"\xff" * 6 + bytes.fromhex(src_mac.replace(":", "")) + ethertype.to_bytes(2, "big") + payload


def _ipv4(src: str, marker: bytes) -> bytes:
    header = bytes([0x45, 0, 0, 20 + len(marker), 0, 0, 0, 0, 64, 17, 0, 0]) + socket.inet_aton(src)
    return header + socket.inet_aton("10.253.0.1") + marker


def _arp(sender_ip: str, sender_mac: str, marker: bytes) -> bytes:
    mac = bytes.fromhex(sender_mac.replace(":", ""))
    return (bytes([0, 1, 8, 0, 6, 4, 0, 2]) + mac + socket.inet_aton(sender_ip) + b"\xff" * 6
            + socket.inet_aton("10.253.0.1") + marker)


async def test_a_hostile_guest_cannot_send_as_another_pod(cni_like_netns: str) -> None:
    """The attack: the guest (owned by the workload, so even a pod without NET_RAW) writes frames into
    its NIC, that is, into the tap QEMU holds, with another pod's MAC, another pod's IPv4 address, an
    ARP reply claiming another pod's address, or an 802.1Q tag. On a shared bridge they would steal
    that pod's traffic. Written into the tap fd exactly as QEMU writes the guest's frames (a
    virtio-net header, then the frame) and watched on the host end of the pod's veth: only the honest
    ones come out."""
    ns = os.path.basename(cni_like_netns)
    peer = int(sh(f"ip netns exec {ns} ip -o link show eth0").split("@if", 1)[1].split(":", 1)[0])
    net = await attach(cni_like_netns)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        sh(f"ip link set {socket.if_indextoname(peer)} up")
        sniffer.bind((socket.if_indextoname(peer), 0))
        sniffer.settimeout(0.3)
        e = net.endpoints[0]
        assert e.tap_fd is not None
        own, other = e.mac, "0a:58:0a:fe:00:42"
        frames = {
            b"honest-ipv4": _frame(own, 0x0800, _ipv4("10.253.0.9", b"honest-ipv4")),
            b"honest-arp": _frame(own, 0x0806, _arp("10.253.0.9", own, b"honest-arp")),
            b"honest-ipv6": _frame(own, 0x86DD, bytes([0x60]) + bytes(39) + b"honest-ipv6"),
            b"spoof-mac": _frame(other, 0x0800, _ipv4("10.253.0.9", b"spoof-mac")),
            b"spoof-ipv4": _frame(own, 0x0800, _ipv4("10.253.0.42", b"spoof-ipv4")),
            b"spoof-arp": _frame(own, 0x0806, _arp("10.253.0.42", own, b"spoof-arp")),
            b"spoof-vlan": _frame(own, 0x8100, b"\x00\x07\x08\x00" + _ipv4("10.253.0.42", b"spoof-vlan")),
            b"spoof-0.0.0.0": _frame(own, 0x0800, _ipv4("0.0.0.0", b"spoof-0.0.0.0")),
        }

        def send_all() -> set[bytes]:
            assert e.tap_fd is not None
            for frame in frames.values():
                os.write(e.tap_fd, bytes(10) + frame)  # struct virtio_net_hdr, all zero: no offloads
            seen = set()
            with contextlib.suppress(TimeoutError):
                while True:
                    data = sniffer.recv(65536)
                    seen |= {m for m in frames if data.endswith(m)}
            return seen

        assert send_all() == {b"honest-ipv4", b"honest-arp", b"honest-ipv6"}
        assert "pykata-antispoof" in sh(f"ip netns exec {ns} tc filter show dev tap0_kata ingress")
        # without the check every frame goes out: the probe is sound
        sh(f"ip netns exec {ns} tc filter del dev tap0_kata ingress prio 1")
        assert send_all() == set(frames)
    finally:
        sniffer.close()
        await detach(net)
    assert "filter" not in sh(f"ip netns exec {ns} tc filter show dev eth0 ingress")
