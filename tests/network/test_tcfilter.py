"""Host side of pod networking: taps and tc filters in a real network namespace made like CNI's."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from pykata.network import Endpoint, NetworkError, attach, detach, guest_mac, open_tap
from pykata.network.antispoof import link_local
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


@contextlib.asynccontextmanager
async def _tap_and_sniffer(netns: str) -> AsyncIterator[tuple[str, Endpoint, socket.socket]]:
    """(the netns's name, its pod network's endpoint, a raw socket on the host end of its veth): the tap
    QEMU would hold, and where a frame the guest writes into it leaves the pod (reads time out in 0.3 s)."""
    ns = os.path.basename(netns)
    peer = int(sh(f"ip netns exec {ns} ip -o link show eth0").split("@if", 1)[1].split(":", 1)[0])
    net = await attach(netns)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        sh(f"ip link set {socket.if_indextoname(peer)} up")
        sniffer.bind((socket.if_indextoname(peer), 0))
        sniffer.settimeout(0.3)
        assert net.endpoints[0].tap_fd is not None
        yield ns, net.endpoints[0], sniffer
    finally:
        sniffer.close()
        await detach(net)


def _send_all(e: Endpoint, sniffer: socket.socket, frames: dict[bytes, bytes],
              names: Callable[[bytes], set[bytes]]) -> set[bytes]:
    """Write `frames` into the tap as QEMU writes the guest's, then the names (`names` of each frame
    seen) of those that came out."""
    assert e.tap_fd is not None
    for frame in frames.values():
        os.write(e.tap_fd, bytes(10) + frame)  # struct virtio_net_hdr, all zero: no offloads
    seen: set[bytes] = set()
    with contextlib.suppress(TimeoutError):
        while True:
            seen |= names(sniffer.recv(65536))
    return seen


async def test_a_hostile_guest_cannot_send_as_another_pod(cni_like_netns: str) -> None:
    """The attack: the guest (owned by the workload, so even a pod without NET_RAW) writes frames into
    its NIC, that is, into the tap QEMU holds, with another pod's MAC, another pod's IPv4 address, an
    ARP reply claiming another pod's address, or an 802.1Q tag. On a shared bridge they would steal
    that pod's traffic. Written into the tap fd exactly as QEMU writes the guest's frames (a
    virtio-net header, then the frame) and watched on the host end of the pod's veth: only the honest
    ones come out."""
    async with _tap_and_sniffer(cni_like_netns) as (ns, e, sniffer):
        own, other = e.mac, "0a:58:0a:fe:00:42"
        frames = {
            b"honest-ipv4": _frame(own, 0x0800, _ipv4("10.253.0.9", b"honest-ipv4")),
            b"honest-arp": _frame(own, 0x0806, _arp("10.253.0.9", own, b"honest-arp")),
            b"honest-ipv6": _frame(own, 0x86DD, _ipv6(link_local(own), "ff02::1", 17, b"honest-ipv6")),
            b"spoof-mac": _frame(other, 0x0800, _ipv4("10.253.0.9", b"spoof-mac")),
            b"spoof-ipv4": _frame(own, 0x0800, _ipv4("10.253.0.42", b"spoof-ipv4")),
            b"spoof-arp": _frame(own, 0x0806, _arp("10.253.0.42", own, b"spoof-arp")),
            b"spoof-arp-mac": _frame(own, 0x0806, _arp("10.253.0.9", other, b"spoof-arp-mac")),
            b"spoof-vlan": _frame(own, 0x8100, b"\x00\x07\x08\x00" + _ipv4("10.253.0.42", b"spoof-vlan")),
            b"spoof-0.0.0.0": _frame(own, 0x0800, _ipv4("0.0.0.0", b"spoof-0.0.0.0")),
        }


        def send_all() -> set[bytes]:
            return _send_all(e, sniffer, frames, lambda data: {m for m in frames if data.endswith(m)})

        assert send_all() == {b"honest-ipv4", b"honest-arp", b"honest-ipv6"}
        assert "pykata-antispoof" in sh(f"ip netns exec {ns} tc filter show dev tap0_kata ingress")
        # without the check every frame goes out: the probe is sound
        sh(f"ip netns exec {ns} tc filter del dev tap0_kata ingress prio 1")
        assert send_all() == set(frames)
    assert "filter" not in sh(f"ip netns exec {ns} tc filter show dev eth0 ingress")


@pytest.fixture
def dual_stack_netns(cni_like_netns: str) -> str:
    """cni_like_netns with an IPv6 address and default route too, as the bridge plugin with a
    host-local IPv6 range leaves it (nodad: nobody else is on the link to answer)."""
    ns = os.path.basename(cni_like_netns)
    sh(f"ip netns exec {ns} sh -c 'ip -6 addr add fd00:253::9/64 dev eth0 nodad && "
       f"ip -6 route add default via fd00:253::1 dev eth0'")
    return cni_like_netns


def _ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return (bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([next_header, 255])
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + payload)


def _nd(kind: int, target: str, *options: bytes) -> bytes:
    """A Neighbor Solicitation (135) or Advertisement (136) of `target` with `options` (no checksum:
    the filter does not read it, and nothing beyond the sniffer does)."""
    flags = b"\x60\x00\x00\x00" if kind == 136 else bytes(4)  # solicited, override
    return bytes([kind, 0, 0, 0]) + flags + socket.inet_pton(socket.AF_INET6, target) + b"".join(options)


def _lladdr(kind: int, mac: str) -> bytes:
    return bytes([kind, 1]) + bytes.fromhex(mac.replace(":", ""))


async def test_a_hostile_guest_cannot_spoof_ipv6_or_neighbor_discovery(dual_stack_netns: str) -> None:
    """The IPv6 attacks of a guest that owns its kernel, on a dual-stack pod network, written into the
    tap as QEMU writes the guest's frames (see the IPv4 test above): another pod's or the gateway's
    source address, another pod's link-local address, Neighbor Advertisements claiming another pod's
    address or the gateway's, or giving another MAC for our own; a DAD probe or answer for another
    pod's address (which takes it away from that pod); Router Advertisements and Redirects (making
    this pod every pod's router), also hidden behind extension headers. Only the honest frames a Linux
    guest sends come out on the host end of the pod's veth: its own global and link-local sources,
    address resolution, its DAD probe (from ::, with a nonce), MLD reports, a router solicitation,
    fragments."""
    async with _tap_and_sniffer(dual_stack_netns) as (ns, e, sniffer):
        assert ("fd00:253::9", 64) in e.addresses
        own_mac, other_mac = e.mac, "0a:58:0a:fe:00:42"
        own, own_ll = "fd00:253::9", link_local(own_mac)
        other, other_ll, gateway = "fd00:253::42", link_local(other_mac), "fd00:253::1"
        allnodes, gw_solicited = "ff02::1", "ff02::1:ff00:1"
        udp = b"\x30\x39\x30\x39\x00\x10\x00\x00"
        echo = bytes([128, 0, 0, 0, 0, 1, 0, 1])
        mld = bytes([58, 0, 5, 2, 0, 0, 1, 0]) + bytes([143, 0, 0, 0, 0, 0, 0, 1]) + bytes(20)  # HBH + MLDv2
        ra = bytes([134, 0, 0, 0, 64, 0, 0x07, 0x08]) + bytes(8)
        nonce = bytes([14, 1, 1, 2, 3, 4, 5, 6])

        def v6(src: str, dst: str, nh: int, payload: bytes, marker: bytes) -> bytes:
            return _frame(own_mac, 0x86DD, _ipv6(src, dst, nh, payload + marker))

        honest = {
            b"h-global-udp": v6(own, gateway, 17, udp, b"h-global-udp"),
            b"h-linklocal-echo": v6(own_ll, allnodes, 58, echo, b"h-linklocal-echo"),
            b"h-resolve": v6(own, gw_solicited, 58, _nd(135, gateway, _lladdr(1, own_mac)), b""),
            b"h-advert": v6(own, gateway, 58, _nd(136, own, _lladdr(2, own_mac)), b""),
            b"h-advert-ll": v6(own_ll, gateway, 58, _nd(136, own_ll, _lladdr(2, own_mac)), b""),
            b"h-dad": v6("::", "ff02::1:ff00:9", 58, _nd(135, own, nonce), b""),
            b"h-mld": v6("::", "ff02::16", 0, mld, b"h-mld"),
            b"h-router-solicit": v6(own_ll, "ff02::2", 58, bytes([133, 0, 0, 0, 0, 0, 0, 0]), b"h-router-solicit"),
            b"h-fragment-udp": v6(own, gateway, 44, bytes([17, 0, 0, 1, 0, 0, 0, 7]) + udp, b"h-fragment-udp"),
            b"h-fragment-echo": v6(own, gateway, 44, bytes([58, 0, 0, 1, 0, 0, 0, 8]) + echo, b"h-fragment-echo"),
            b"h-fragment-later": v6(own, gateway, 44, bytes([58, 0, 0, 0xB9, 0, 0, 0, 9]) + ra, b"h-fragment-later"),
        }
        spoofed = {
            b"s-other-source": v6(other, gateway, 17, udp, b"s-other-source"),
            b"s-gateway-source": v6(gateway, other, 17, udp, b"s-gateway-source"),
            b"s-other-linklocal": v6(other_ll, allnodes, 58, echo, b"s-other-linklocal"),
            b"s-unspecified-udp": v6("::", gateway, 17, udp, b"s-unspecified-udp"),
            b"s-advert-other": v6(own, allnodes, 58, _nd(136, other, _lladdr(2, own_mac)), b"s-advert-other"),
            b"s-advert-gateway": v6(own, allnodes, 58, _nd(136, gateway, _lladdr(2, own_mac)), b"s-advert-gateway"),
            b"s-advert-other-mac": v6(own, allnodes, 58, _nd(136, own, _lladdr(2, other_mac)), b"s-advert-other-mac"),
            b"s-solicit-other-mac": v6(own, gw_solicited, 58, _nd(135, gateway, _lladdr(1, other_mac)),
                                       b"s-solicit-other-mac"),
            b"s-advert-two-options": v6(own, allnodes, 58, _nd(136, own, _lladdr(2, own_mac), _lladdr(2, other_mac)),
                                        b"s-advert-two-options"),
            b"s-dad-other": v6("::", "ff02::1:ff00:42", 58, _nd(135, other, nonce), b"s-dad-other"),
            b"s-dad-answer": v6("::", allnodes, 58, _nd(136, other), b"s-dad-answer"),
            b"s-router-advert": v6(own_ll, allnodes, 58, ra, b"s-router-advert"),
            b"s-redirect": v6(own_ll, other, 58, bytes([137, 0, 0, 0, 0, 0, 0, 0]) + bytes(32), b"s-redirect"),
            b"s-ra-behind-hbh": v6(own_ll, allnodes, 0, bytes([58, 0, 5, 2, 0, 0, 1, 0]) + ra, b"s-ra-behind-hbh"),
            b"s-ra-behind-dstopts": v6(own_ll, allnodes, 60, bytes([58, 0, 1, 4, 0, 0, 0, 0]) + ra,
                                       b"s-ra-behind-dstopts"),
            b"s-ra-fragment": v6(own_ll, allnodes, 44, bytes([58, 0, 0, 1, 0, 0, 0, 5]) + ra, b"s-ra-fragment"),
        }
        # markers: NDP frames end in their options, so they are told apart by their whole frame
        frames = {**honest, **spoofed}

        def send_all() -> set[bytes]:
            return _send_all(e, sniffer, frames, lambda data: {n for n, frame in frames.items() if data == frame})

        assert send_all() == set(honest), "spoofed frames passed, or honest ones were dropped"
        # without the check every frame goes out: the probe is sound
        sh(f"ip netns exec {ns} tc filter del dev tap0_kata ingress prio 1")
        assert send_all() == set(frames)
