"""A pooled VM's NIC (pykata.network.holding): a tap in a holding namespace of its own, moved into a pod's
namespace made like CNI's at hand-out; real namespaces, veths and taps (no VM: the tap's fd stands in for
QEMU's)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.network import PoolMismatch, detach
from pykata.network.holding import HoldingNetwork, hand_over


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A netns with eth0 (a veth whose peer is in a second test-made netns), an address and a default
    route, as the bridge plugin leaves it. Yields its path."""
    name, peer = f"pkhold-{secrets.token_hex(3)}", f"pkpeer-{secrets.token_hex(3)}"
    sh(f"ip netns add {name} && ip netns add {peer}")
    try:
        sh(f"ip -n {peer} link add v0 type veth peer name eth0 netns {name}")
        sh(f"ip netns exec {name} sh -c 'ip link set eth0 address 0a:58:0a:fe:00:0a mtu 1450 up && "
           f"ip addr add 10.253.1.9/24 dev eth0 && ip route add default via 10.253.1.1 dev eth0'")
        yield f"/var/run/netns/{name}"
    finally:
        sh(f"ip netns del {name}; ip netns del {peer}")


def _netns_inode(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _holders(inode_link: str) -> list[str]:
    """Every process fd or namespace link on this host that refers to the namespace `inode_link`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [proc / "ns" / "net", *(proc / "fd").iterdir()]
        except OSError:
            continue
        for link in links:
            try:
                if os.readlink(link) == inode_link:
                    found.append(str(link))
            except OSError:
                continue
    return found


async def test_hand_over_moves_the_tap_into_the_pod_and_wires_it(pod_netns: str) -> None:
    ns = os.path.basename(pod_netns)
    holding = HoldingNetwork.make()
    assert holding.tap_fd is not None and holding.ns_fd is not None
    inode = _netns_inode(holding.ns_fd)
    # the holding namespace is named nowhere: not in `ip netns`, not a mount
    assert inode not in sh("ip netns list") and "pkhold" not in inode
    assert "tap0_kata" in sh(f"nsenter --net={holding.path} ip -o link show tap0_kata")
    qemu_fd = os.dup(holding.tap_fd)  # what QEMU holds: the tap lives as long as it
    holding.close_tap_fd()
    net = None
    try:
        net = await hand_over(holding, pod_netns)
        assert "tap0_kata" not in sh(f"nsenter --net={holding.path} ip -o link")
        assert "mtu 1450" in sh(f"ip -n {ns} -o link show tap0_kata")
        assert "Redirect to device tap0_kata" in sh(f"ip netns exec {ns} tc filter show dev eth0 ingress")
        assert "Redirect to device eth0" in sh(f"ip netns exec {ns} tc filter show dev tap0_kata ingress")
        [iface] = net.interfaces()
        assert iface.hw_addr == "0a:58:0a:fe:00:0a" and [a.address for a in iface.addresses] == ["10.253.1.9"]
        assert [(r.dest, r.gateway) for r in net.guest_routes()] == [("default", "10.253.1.1")]
    finally:
        holding.close()
        os.close(qemu_fd)  # QEMU ends: its tap goes, and with it the last hold on the holding namespace
        if net is not None:
            await detach(net)
    assert "tap0_kata" not in sh(f"ip -n {ns} -o link")
    assert "ingress" not in sh(f"ip netns exec {ns} tc qdisc show dev eth0")
    assert _holders(inode) == []


async def test_a_pod_with_two_interfaces_is_refused_and_nothing_changes(pod_netns: str) -> None:
    ns = os.path.basename(pod_netns)
    sh(f"ip -n {ns} link add eth1 type veth peer name eth1p")
    holding = HoldingNetwork.make()
    try:
        with pytest.raises(PoolMismatch, match="3 interfaces; a pooled VM has exactly one NIC"):
            await hand_over(holding, pod_netns)
        assert "tap0_kata" in sh(f"nsenter --net={holding.path} ip -o link show tap0_kata")
        assert "tap0_kata" not in sh(f"ip -n {ns} -o link")
        assert "ingress" not in sh(f"ip netns exec {ns} tc qdisc show dev eth0")
    finally:
        inode = _netns_inode(holding.ns_fd) if holding.ns_fd is not None else ""
        holding.close()
    assert _holders(inode) == []


async def test_a_pod_with_no_interface_is_refused(tmp_path: Path) -> None:
    name = f"pkempty-{secrets.token_hex(3)}"
    sh(f"ip netns add {name}")
    holding = HoldingNetwork.make()
    try:
        with pytest.raises(PoolMismatch, match="0 interfaces"):
            await hand_over(holding, f"/var/run/netns/{name}")
    finally:
        holding.close()
        sh(f"ip netns del {name}")
