"""A pod's network, wired to its VM: the taps pykata.network made become plain NIC device values the
driver cold-plugs (the hypervisor never imports pykata.network; pykata.network never imports the
hypervisor)."""

from __future__ import annotations

from pykata.hypervisor.devices import NetDevice
from pykata.network import PodNetwork, guest_mac, nic_id


def nic_devices(net: PodNetwork) -> list[NetDevice]:
    """The VM's NICs for `net`'s endpoints whose tap is still open here (cold-plugged before start;
    QEMU gets each tap fd)."""
    return [NetDevice(nic_id(e.index), guest_mac(e.index), tap_fd=e.tap_fd) for e in net.endpoints
            if e.tap_fd is not None]
