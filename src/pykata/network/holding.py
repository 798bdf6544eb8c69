"""The NIC of a pooled VM (pykata.factory.pool) before its pod exists, and its hand-over to the pod.

A NIC is fixed when QEMU starts, so a VM restored ahead of time for a CRI pod needs a tap before the
pod's network namespace exists. It gets one in a *holding* namespace: a new, empty network namespace
of its own, held only by file descriptors (pykata.network.tap.new_netns: no bind mount, nothing in
`ip netns`), so it ends with the waiting process and its QEMU however they end. At hand-out the tap
is moved into the pod's namespace under the name a cold-booted VM's tap has (QEMU keeps its fd: a
moved tap stays the same device), and wired to the CNI interface with the tc redirect of
pykata.network.tcfilter; the guest NIC then takes the interface's MAC, addresses and routes through
the agent, as for any VM.

    holding = HoldingNetwork.make()          # VM devices: holding.device_tap_fd as net0
    ... QEMU started; holding.close_tap_fd() ...
    net = await hand_over(holding, pod_netns)  # a PodNetwork, as tcfilter.attach() gives
    holding.close()
"""

from __future__ import annotations

import contextlib
import os

from pykata.network.tap import NetworkError, netlink_socket, new_netns, ns_path, open_tap
from pykata.network.tcfilter import PodNetwork, as_network_error, detach, log_network, read_network, redirect

HOLDING_TAP = "tap0_kata"  # alone in its namespace: any name would do; this is the one it gets in the pod's


class PoolMismatch(NetworkError):
    """The pod's network is not one a pooled VM (one NIC) can take; nothing was changed. The pod then
    starts the normal way."""


class HoldingNetwork:
    """A holding namespace and the tap made in it for a pooled VM's only NIC (net0)."""

    def __init__(self, ns_fd: int, tap_fd: int) -> None:
        self.ns_fd: int | None = ns_fd
        self.tap_fd: int | None = tap_fd
        self.path = ns_path(ns_fd)

    @classmethod
    def make(cls) -> HoldingNetwork:
        """Raises NetworkError: no network namespace or tap could be made."""
        ns_fd = new_netns()
        try:
            tap_fd = open_tap(HOLDING_TAP, ns_path(ns_fd))
        except BaseException:
            os.close(ns_fd)
            raise
        return cls(ns_fd, tap_fd)

    def close_tap_fd(self) -> None:
        """Drop this process's copy of the tap's fd once QEMU holds it (the tap then ends with QEMU)."""
        if self.tap_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.tap_fd)
            self.tap_fd = None

    def close(self) -> None:
        """Let the holding namespace go (it ends once QEMU's tap file, opened in it, is closed too).
        Idempotent."""
        self.close_tap_fd()
        if self.ns_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.ns_fd)
            self.ns_fd = None


def preload() -> None:
    """Import what hand_over() needs (pyroute2: 0.2-0.3 s under load), for a waiting process to do it
    before its claim rather than during the pod's start."""
    import pyroute2  # noqa: F401


async def hand_over(holding: HoldingNetwork, netns: str) -> PodNetwork:
    """Move the pooled VM's tap from `holding` into the pod's network namespace at `netns` and wire it
    to the pod's one CNI interface (tcfilter's redirect). Returns the pod's network, its endpoint's tap
    held by QEMU (tap_fd None), for the agent's interface and routes and for tcfilter.detach().

    Raises:
        PoolMismatch: the namespace has no CNI interface or more than one (nothing was changed).
        NetworkError: a netlink step failed; what was done in the pod's namespace is undone (the tap
            moved there is removed: the VM cannot serve any pod after that).
    """
    from pyroute2 import AsyncIPRoute

    if holding.ns_fd is None:
        raise NetworkError("the pooled VM's holding network namespace is closed already")
    net = await read_network(netns)
    if len(net.endpoints) != 1:
        raise PoolMismatch(f"network namespace {netns} has {len(net.endpoints)} interfaces; a pooled VM has "
                           "exactly one NIC")
    endpoint = net.endpoints[0]
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            async with AsyncIPRoute(fileno=netlink_socket(holding.path)) as ipr:
                found = await ipr.link_lookup(ifname=HOLDING_TAP)
                if not found:
                    raise NetworkError("the pooled VM's tap is gone from its holding namespace")
                # one request moves and renames it (a device changing namespace is brought down first)
                await ipr.link("set", index=found[0], net_ns_fd=target, ifname=endpoint.tap_name)
        finally:
            os.close(target)
        async with AsyncIPRoute(fileno=netlink_socket(netns)) as ipr:
            await redirect(ipr, endpoint)
    except BaseException as exc:
        await detach(net)
        raise as_network_error(exc, netns) from None
    log_network(net)
    return net
