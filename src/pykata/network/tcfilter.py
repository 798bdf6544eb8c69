"""Kata's tc-filter network model: a pod's veth (made by CNI) wired to the VM's NIC through a tap.

    net = await attach("/var/run/netns/cni-1234")   # taps + tc filters in the pod's netns
    devices = pykata.resources.network.nic_devices(net)   # plain NetDevice values for the VM
    ... start the VM; net.close_fds() once QEMU holds the taps ...
    for iface in net.interfaces(): agent UpdateInterface(iface)
    agent UpdateRoutes(net.routes())
    await detach(net)                                # after the VM is gone

In the pod's network namespace, for each CNI interface (say eth0) a tap `tap0_kata` is made and two
tc ingress filters redirect every frame: eth0 ingress -> tap egress (into the VM) and tap ingress ->
eth0 egress (out of the VM). The guest NIC takes eth0's MAC, MTU, addresses and routes, so the bridge
and everything beyond it see the same endpoint CNI made. Nothing runs in the host's own namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from pykata.network import antispoof
from pykata.network.tap import MAX_NICS, NetworkError, guest_mac, netlink_socket, open_tap
from pykata.protocols.agent import agent_pb2

log = logging.getLogger("pykata.network")

ETH_P_ALL = 0x0003
# the redirect's priority: after the guest's frames are checked (pykata.network.antispoof, priority 1)
REDIRECT_PRIO = 10
INGRESS = "ffff:"
MAIN_TABLE = 254
RTPROT_KERNEL = 2
IFF_LOOPBACK = 0x8
# u32 needs a class id; on an ingress qdisc it is never used
U32_CLASSID = 0x10001


@dataclass
class Endpoint:
    """One CNI interface of the pod and the tap that carries it to the VM."""

    index: int
    name: str
    link_index: int
    mac: str
    mtu: int
    addresses: list[tuple[str, int]]
    tap_name: str
    tap_fd: int | None = None


@dataclass
class PodNetwork:
    netns: str
    endpoints: list[Endpoint] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)

    def close_fds(self) -> None:
        """Drop pykata's copies of the tap fds: once QEMU holds them, the taps live as long as QEMU."""
        for e in self.endpoints:
            if e.tap_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(e.tap_fd)
                e.tap_fd = None

    def interfaces(self) -> list[agent_pb2.Interface]:
        """What the agent makes of each guest NIC (found by its template MAC)."""
        out = []
        for e in self.endpoints:
            addrs = []
            for address, prefix in e.addresses:
                fam = agent_pb2.IP_FAMILY_V4 if ipaddress.ip_address(address).version == 4 else agent_pb2.IP_FAMILY_V6
                addrs.append(agent_pb2.IPAddress(family=fam, address=address, prefix_length=prefix))
            out.append(agent_pb2.Interface(name=e.name, current_hw_addr=guest_mac(e.index), hw_addr=e.mac,
                                           mtu=e.mtu, addresses=addrs))
        return out

    def guest_routes(self) -> list[agent_pb2.Route]:
        return [agent_pb2.Route(**r) for r in self.routes]


async def attach(netns: str) -> PodNetwork:
    """Read the CNI interfaces of the network namespace at `netns`, make a tap for each and redirect
    traffic both ways with tc. A namespace with only loopback gives a PodNetwork with no endpoints.

    Raises:
        NetworkError: the namespace does not exist or netlink refuses a step; whatever was made is
            undone.
    """
    from pyroute2 import AsyncIPRoute

    if not os.path.exists(netns):
        raise NetworkError(f"network namespace {netns} does not exist")
    net = PodNetwork(netns)
    try:
        # not pyroute2's netns= (it forks: see tap.netlink_socket)
        async with AsyncIPRoute(fileno=netlink_socket(netns)) as ipr:
            await _read(ipr, net)
            for e in net.endpoints:
                e.tap_fd = open_tap(e.tap_name, netns)
                await redirect(ipr, e)
    except BaseException as exc:
        await detach(net)
        raise as_network_error(exc, netns) from None
    log_network(net)
    return net


async def read_network(netns: str) -> PodNetwork:
    """The CNI interfaces, addresses and routes of the network namespace at `netns`, nothing changed.

    Raises:
        NetworkError: the namespace does not exist or cannot be read.
    """
    from pyroute2 import AsyncIPRoute

    if not os.path.exists(netns):
        raise NetworkError(f"network namespace {netns} does not exist")
    net = PodNetwork(netns)
    try:
        async with AsyncIPRoute(fileno=netlink_socket(netns)) as ipr:
            await _read(ipr, net)
    except BaseException as exc:
        raise as_network_error(exc, netns) from None
    return net


async def redirect(ipr: Any, e: Endpoint) -> None:
    """Bring endpoint `e`'s tap (already in the pod's namespace, `ipr`'s) up at the interface's MTU and
    redirect every frame both ways between the two with tc; what the guest sends is first checked
    (pykata.network.antispoof).

    Raises:
        NetworkError: the kernel refuses the check's program."""
    tap = (await ipr.link_lookup(ifname=e.tap_name))[0]
    await ipr.link("set", index=tap, mtu=e.mtu, state="up")
    for src, dst in ((e.link_index, tap), (tap, e.link_index)):
        await ipr.tc("add", "ingress", index=src, handle=INGRESS)
        if src == tap:
            prog = antispoof.load(e.mac, [a for a, _ in e.addresses if ipaddress.ip_address(a).version == 4],
                                  [a for a, _ in e.addresses if ipaddress.ip_address(a).version == 6])
            try:
                await ipr.tc("add-filter", "bpf", index=tap, parent=INGRESS, protocol=ETH_P_ALL, prio=1,
                             fd=prog, name="pykata-antispoof", direct_action=True)
            finally:
                os.close(prog)
        await ipr.tc("add-filter", "u32", index=src, parent=INGRESS, protocol=ETH_P_ALL, prio=REDIRECT_PRIO,
                     target=U32_CLASSID, keys=["0x0/0x0+0"],
                     action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                              "ifindex": dst}])


def as_network_error(exc: BaseException, netns: str) -> BaseException:
    """What a failed netlink step raises: NetworkError naming the namespace (cancellation and the like
    pass through as they are)."""
    if isinstance(exc, NetworkError):
        return exc
    if isinstance(exc, OSError | ValueError | IndexError | KeyError | TimeoutError):
        return NetworkError(f"network namespace {netns}: {exc}")
    return exc


def log_network(net: PodNetwork) -> None:
    described = [f"{e.name} {e.mac} {[f'{a}/{p}' for a, p in e.addresses]} -> {e.tap_name}" for e in net.endpoints]
    log.info("pod network %s: %s", net.netns, ", ".join(described) or "no interfaces")


async def _read(ipr: Any, net: PodNetwork) -> None:
    names: dict[int, str] = {}
    async for link in await ipr.link("dump"):
        name = link.get_attr("IFLA_IFNAME") or ""
        names[link["index"]] = name
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if link["flags"] & IFF_LOOPBACK or kind == "tun" or name.endswith("_kata"):
            continue
        if len(net.endpoints) >= MAX_NICS:
            raise NetworkError(f"network namespace {net.netns}: more than {MAX_NICS} interfaces")
        i = len(net.endpoints)
        net.endpoints.append(Endpoint(index=i, name=name, link_index=link["index"],
                                      mac=(link.get_attr("IFLA_ADDRESS") or "").lower(),
                                      mtu=link.get_attr("IFLA_MTU") or 1500, addresses=[],
                                      tap_name=f"tap{i}_kata"))
    by_index = {e.link_index: e for e in net.endpoints}
    async for a in await ipr.addr("dump"):
        e = by_index.get(a["index"])
        # global addresses only: the guest makes its own link-local ones
        if e is not None and a["scope"] == 0 and a.get_attr("IFA_ADDRESS"):
            e.addresses.append((a.get_attr("IFA_ADDRESS"), a["prefixlen"]))
    for family in (socket.AF_INET, socket.AF_INET6):
        async for r in await ipr.route("dump", family=family):
            oif = r.get_attr("RTA_OIF")
            if (r.get_attr("RTA_TABLE", r["table"]) != MAIN_TABLE or r["proto"] == RTPROT_KERNEL
                    or r["type"] != 1 or oif not in by_index):
                continue
            dst = r.get_attr("RTA_DST")
            route: dict[str, Any] = {
                "dest": f"{dst}/{r['dst_len']}" if dst else "default", "device": names[oif],
                "gateway": r.get_attr("RTA_GATEWAY") or "", "source": r.get_attr("RTA_PREFSRC") or "",
                "scope": r["scope"], "metric": r.get_attr("RTA_PRIORITY") or 0,
                "family": agent_pb2.IP_FAMILY_V4 if family == socket.AF_INET else agent_pb2.IP_FAMILY_V6}
            net.routes.append(route)


async def detach(net: PodNetwork) -> None:
    """Undo attach(): close pykata's tap fds, remove the taps (if QEMU still held them) and the ingress
    qdiscs with their filters. A namespace already removed (CNI's teardown) is fine. Never raises."""
    from pyroute2 import AsyncIPRoute

    net.close_fds()
    if not net.endpoints or not os.path.exists(net.netns):
        return
    try:
        async with AsyncIPRoute(fileno=netlink_socket(net.netns)) as ipr:
            for e in net.endpoints:
                with contextlib.suppress(Exception):
                    await ipr.tc("del", "ingress", index=e.link_index, handle=INGRESS)
                for tap in await ipr.link_lookup(ifname=e.tap_name):
                    with contextlib.suppress(Exception):
                        await ipr.link("del", index=tap)
    except Exception as exc:  # the namespace went away under us, or netlink refused: log, go on
        log.warning("pod network %s: cleanup: %s", net.netns, exc)


def spec_netns(spec: dict[str, Any]) -> str | None:
    """The network namespace path an OCI spec joins (linux.namespaces[type=network].path): the pod's,
    made by the CRI for CNI. None when the container would get a new, empty one (plain `ctr run`)."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    if not isinstance(namespaces, list):
        return None
    for ns in namespaces:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            return path if isinstance(path, str) and path.startswith("/") else None
    return None
