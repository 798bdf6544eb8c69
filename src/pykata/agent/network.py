"""Guest networking over rtnetlink (pykata.agent.rtnl): the host's UpdateInterface/UpdateRoutes, and listings.

The host (pykata.network) gives the guest NIC the pod's identity, as the container would have had on
the host: the veth's MAC, MTU, addresses and the pod's routes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

from pykata.agent.rtnl import MAIN_TABLE, RTN_UNICAST, Rtnl
from pykata.errors import Internal, InvalidArgument, NotFound
from pykata.protocols.agent import agent_pb2

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MIN_MTU, MAX_MTU = 68, 65535
MAX_ADDRESSES = 64
MAX_ROUTES = 256
# Routes the kernel makes for an address (proto kernel) are its own.
RTPROT_KERNEL = 2
IFF_LOOPBACK = 0x8
RT_SCOPES = (0, 200, 253, 254)  # universe, site, link, host


def _netlink_error(what: str, exc: OSError) -> Internal:
    name = errno.errorcode.get(exc.errno or 0, "")
    return Internal(f"{what}: {exc.strerror or exc} {name}".strip())


# -- checks -----------------------------------------------------------------------------------------

def _check_mac(field: str, mac: str) -> str:
    mac = mac.lower()
    if not _MAC.match(mac):
        raise InvalidArgument(field, f"bad MAC address {mac!r} (want aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(field, f"{mac} is a multicast address")
    return mac


def _check_address(field: str, a: agent_pb2.IPAddress) -> tuple[str, int]:
    try:
        addr = ipaddress.ip_address(a.address)
    except ValueError:
        raise InvalidArgument(f"{field}.address", f"not an IP address: {a.address[:64]!r}") from None
    want = 4 if a.family == agent_pb2.IP_FAMILY_V4 else 6 if a.family == agent_pb2.IP_FAMILY_V6 else addr.version
    if addr.version != want:
        raise InvalidArgument(f"{field}.family", f"{a.address} is not an IPv{want} address")
    if not 0 < a.prefix_length <= addr.max_prefixlen:
        raise InvalidArgument(f"{field}.prefix_length", f"{a.prefix_length} is not in 1..{addr.max_prefixlen}")
    return str(addr), a.prefix_length


def check_interface(iface: agent_pb2.Interface) -> None:
    """Raises InvalidArgument naming the bad field."""
    if iface.name and not _IFNAME.match(iface.name):
        raise InvalidArgument("interface.name", f"bad link name {iface.name[:32]!r}")
    if iface.device and not _IFNAME.match(iface.device):
        raise InvalidArgument("interface.device", f"bad link name {iface.device[:32]!r}")
    if not (iface.device or iface.hw_addr or iface.current_hw_addr):
        raise InvalidArgument("interface", "give device, hw_addr or current_hw_addr to find the link")
    if iface.hw_addr:
        _check_mac("interface.hw_addr", iface.hw_addr)
    if iface.current_hw_addr:
        _check_mac("interface.current_hw_addr", iface.current_hw_addr)
    if iface.mtu and not MIN_MTU <= iface.mtu <= MAX_MTU:
        raise InvalidArgument("interface.mtu", f"{iface.mtu} is not in {MIN_MTU}..{MAX_MTU}")
    if len(iface.addresses) > MAX_ADDRESSES:
        raise InvalidArgument("interface.addresses", f"more than {MAX_ADDRESSES}")
    for i, a in enumerate(iface.addresses):
        _check_address(f"interface.addresses[{i}]", a)


def _check_route(i: int, r: agent_pb2.Route) -> dict[str, Any]:
    field = f"routes[{i}]"
    spec: dict[str, Any] = {"dst": None, "dst_len": 0}
    family = 0
    if r.dest and r.dest != "default":
        try:
            net = ipaddress.ip_network(r.dest, strict=False)
        except ValueError:
            raise InvalidArgument(f"{field}.dest", f"not 'default' or a CIDR: {r.dest[:64]!r}") from None
        spec.update(dst=str(net.network_address), dst_len=net.prefixlen)
        family = net.version
    if r.gateway:
        try:
            gw = ipaddress.ip_address(r.gateway)
        except ValueError:
            raise InvalidArgument(f"{field}.gateway", f"not an IP address: {r.gateway[:64]!r}") from None
        if family and gw.version != family:
            raise InvalidArgument(f"{field}.gateway", f"{r.gateway} is not of the family of {r.dest}")
        spec["gateway"] = str(gw)
        family = gw.version
    if r.source:
        try:
            spec["prefsrc"] = str(ipaddress.ip_address(r.source))
        except ValueError:
            raise InvalidArgument(f"{field}.source", f"not an IP address: {r.source[:64]!r}") from None
    if r.device and not _IFNAME.match(r.device):
        raise InvalidArgument(f"{field}.device", f"bad link name {r.device[:32]!r}")
    if r.scope not in RT_SCOPES:
        raise InvalidArgument(f"{field}.scope", f"{r.scope} is not one of {RT_SCOPES}")
    if not family:
        family = 6 if r.family == agent_pb2.IP_FAMILY_V6 else 4
    spec["family"] = socket.AF_INET if family == 4 else socket.AF_INET6
    spec["scope"] = r.scope
    if r.metric:
        spec["priority"] = r.metric
    return spec


# -- RPCs -------------------------------------------------------------------------------------------

async def update_interface(iface: agent_pb2.Interface) -> agent_pb2.Interface:
    """Give a guest link the wanted MAC, MTU, name and addresses (replacing its global ones), and
    bring it up. Raises InvalidArgument, NotFound (no such link) or Internal."""
    check_interface(iface)
    return await asyncio.to_thread(_update_interface, iface)


def _update_interface(iface: agent_pb2.Interface) -> agent_pb2.Interface:
    with Rtnl() as nl:
        index = _find_link(nl, iface)
        try:
            changes: dict[str, Any] = {}
            if iface.hw_addr:
                changes["mac"] = iface.hw_addr.lower()
            if iface.mtu:
                changes["mtu"] = iface.mtu
            if iface.name:
                changes["name"] = iface.name
            if changes:
                # MAC and name change only while the link is down
                nl.set_link(index, up=False)
                nl.set_link(index, **changes)
            for a in nl.addresses():
                if a.index == index and a.scope == 0:
                    nl.address("del", index, a.address, a.prefixlen)
            for i, ip in enumerate(iface.addresses):
                address, prefix = _check_address(f"interface.addresses[{i}]", ip)
                nl.address("add", index, address, prefix)
            nl.set_link(index, up=True)
            return _describe(nl, index)[0]
        except OSError as exc:
            raise _netlink_error(f"interface {iface.name or iface.device or iface.hw_addr}", exc) from None


async def update_routes(routes: Iterable[agent_pb2.Route]) -> agent_pb2.Routes:
    """Make the main table's routes (other than the kernel's own) exactly `routes`.

    Link-scope routes are added before the gateway routes that need them. Raises PykataError.
    """
    wanted = list(routes)
    if len(wanted) > MAX_ROUTES:
        raise InvalidArgument("routes", f"more than {MAX_ROUTES}")
    specs = [_check_route(i, r) for i, r in enumerate(wanted)]
    return await asyncio.to_thread(_update_routes, wanted, specs)


def _update_routes(wanted: list[agent_pb2.Route], specs: list[dict[str, Any]]) -> agent_pb2.Routes:
    with Rtnl() as nl:
        try:
            names = {link.name: link.index for link in nl.links()}
            for i, (r, spec) in enumerate(zip(wanted, specs, strict=True)):
                if r.device:
                    if r.device not in names:
                        raise NotFound(f"routes[{i}].device: no link {r.device!r} in the guest")
                    spec["oif"] = names[r.device]
            for old in _routes(nl):
                if old.protocol != RTPROT_KERNEL:
                    nl.route("del", family=old.family, dst=old.dst, dst_len=old.dst_len, gateway=old.gateway,
                              oif=old.oif, priority=old.priority, scope=old.scope, protocol=old.protocol,
                              rtype=old.type)
            for spec in sorted(specs, key=lambda s: "gateway" in s):
                nl.route("replace", **spec)
            return agent_pb2.Routes(routes=_describe_routes(nl))
        except OSError as exc:
            raise _netlink_error("routes", exc) from None


async def list_interfaces() -> agent_pb2.Interfaces:
    def run() -> agent_pb2.Interfaces:
        with Rtnl() as nl:
            return agent_pb2.Interfaces(interfaces=_describe(nl, None))

    try:
        return await asyncio.to_thread(run)
    except OSError as exc:
        raise _netlink_error("links", exc) from None


async def list_routes() -> agent_pb2.Routes:
    def run() -> agent_pb2.Routes:
        with Rtnl() as nl:
            return agent_pb2.Routes(routes=_describe_routes(nl))

    try:
        return await asyncio.to_thread(run)
    except OSError as exc:
        raise _netlink_error("routes", exc) from None


# -- helpers ----------------------------------------------------------------------------------------

def _find_link(nl: Rtnl, iface: agent_pb2.Interface) -> int:
    links = nl.links()
    if iface.device:
        found = [link.index for link in links if link.name == iface.device]
        what = f"interface.device: no link {iface.device!r}"
    else:
        mac = (iface.current_hw_addr or iface.hw_addr).lower()
        found = [link.index for link in links if link.mac == mac]
        what = f"interface.current_hw_addr: no link with MAC {mac}"
    if not found:
        raise NotFound(f"{what} in the guest")
    return found[0]


def _routes(nl: Rtnl) -> list[Any]:
    return [r for r in nl.routes() if r.table == MAIN_TABLE and r.type == RTN_UNICAST]


def _family(family: int) -> agent_pb2.IPFamily:
    return agent_pb2.IP_FAMILY_V4 if family == socket.AF_INET else agent_pb2.IP_FAMILY_V6


def _describe(nl: Rtnl, index: int | None) -> list[agent_pb2.Interface]:
    addrs = nl.addresses()
    out = []
    for link in nl.links():
        if index is not None and link.index != index:
            continue
        out.append(agent_pb2.Interface(
            device=link.name, name=link.name, hw_addr=link.mac, mtu=link.mtu,
            type="loopback" if link.flags & IFF_LOOPBACK else "", raw_flags=link.flags,
            addresses=[agent_pb2.IPAddress(family=_family(a.family), address=a.address, prefix_length=a.prefixlen)
                       for a in addrs if a.index == link.index]))
    return out


def _describe_routes(nl: Rtnl) -> list[agent_pb2.Route]:
    names = {link.index: link.name for link in nl.links()}
    return [agent_pb2.Route(
        dest=f"{r.dst}/{r.dst_len}" if r.dst else "default", gateway=r.gateway or "",
        device=names.get(r.oif, "") if r.oif is not None else "", source=r.prefsrc or "", scope=r.scope,
        metric=r.priority or 0, family=_family(r.family)) for r in _routes(nl)]
