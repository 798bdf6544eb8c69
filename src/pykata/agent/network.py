"""Guest networking over rtnetlink (pyroute2): the host's UpdateInterface/UpdateRoutes, and listings.

The host (pykata.network) gives the guest NIC the pod's identity, as the container would have had on
the host: the veth's MAC, MTU, addresses and the pod's routes. pyroute2 is imported on first use, so
an agent that never configures a network pays nothing for it.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

from pykata.agent.validation import invalid
from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code, RpcError

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MIN_MTU, MAX_MTU = 68, 65535
MAX_ADDRESSES = 64
MAX_ROUTES = 256
MAIN_TABLE = 254
# Routes the kernel makes for an address (proto kernel) and local/broadcast ones are its own.
RTPROT_KERNEL = 2
RT_SCOPES = (0, 200, 253, 254)  # universe, site, link, host
_FAMILIES = {agent_pb2.IP_FAMILY_V4: socket.AF_INET, agent_pb2.IP_FAMILY_V6: socket.AF_INET6}


def _ipr() -> Any:
    from pyroute2 import AsyncIPRoute

    return AsyncIPRoute()


def _netlink_error(what: str, exc: Exception) -> RpcError:
    code = getattr(exc, "code", 0)
    text = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    return RpcError(Code.INTERNAL, f"{what}: {exc} {text}".strip())


# -- checks -----------------------------------------------------------------------------------------

def _check_mac(field: str, mac: str) -> str:
    mac = mac.lower()
    if not _MAC.match(mac):
        raise invalid(field, f"bad MAC address {mac!r} (want aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise invalid(field, f"{mac} is a multicast address")
    return mac


def _check_address(field: str, a: agent_pb2.IPAddress) -> tuple[str, int]:
    try:
        addr = ipaddress.ip_address(a.address)
    except ValueError:
        raise invalid(f"{field}.address", f"not an IP address: {a.address[:64]!r}") from None
    want = 4 if a.family == agent_pb2.IP_FAMILY_V4 else 6 if a.family == agent_pb2.IP_FAMILY_V6 else addr.version
    if addr.version != want:
        raise invalid(f"{field}.family", f"{a.address} is not an IPv{want} address")
    if not 0 < a.prefix_length <= addr.max_prefixlen:
        raise invalid(f"{field}.prefix_length", f"{a.prefix_length} is not in 1..{addr.max_prefixlen}")
    return str(addr), a.prefix_length


def check_interface(iface: agent_pb2.Interface) -> None:
    """Raises RpcError(INVALID_ARGUMENT) naming the bad field."""
    if iface.name and not _IFNAME.match(iface.name):
        raise invalid("interface.name", f"bad link name {iface.name[:32]!r}")
    if iface.device and not _IFNAME.match(iface.device):
        raise invalid("interface.device", f"bad link name {iface.device[:32]!r}")
    if not (iface.device or iface.hw_addr or iface.current_hw_addr):
        raise invalid("interface", "give device, hw_addr or current_hw_addr to find the link")
    if iface.hw_addr:
        _check_mac("interface.hw_addr", iface.hw_addr)
    if iface.current_hw_addr:
        _check_mac("interface.current_hw_addr", iface.current_hw_addr)
    if iface.mtu and not MIN_MTU <= iface.mtu <= MAX_MTU:
        raise invalid("interface.mtu", f"{iface.mtu} is not in {MIN_MTU}..{MAX_MTU}")
    if len(iface.addresses) > MAX_ADDRESSES:
        raise invalid("interface.addresses", f"more than {MAX_ADDRESSES}")
    for i, a in enumerate(iface.addresses):
        _check_address(f"interface.addresses[{i}]", a)


def _check_route(i: int, r: agent_pb2.Route) -> dict[str, Any]:
    field = f"routes[{i}]"
    spec: dict[str, Any] = {"table": MAIN_TABLE}
    family = 0
    if r.dest and r.dest != "default":
        try:
            net = ipaddress.ip_network(r.dest, strict=False)
        except ValueError:
            raise invalid(f"{field}.dest", f"not 'default' or a CIDR: {r.dest[:64]!r}") from None
        spec.update(dst=str(net.network_address), dst_len=net.prefixlen)
        family = net.version
    if r.gateway:
        try:
            gw = ipaddress.ip_address(r.gateway)
        except ValueError:
            raise invalid(f"{field}.gateway", f"not an IP address: {r.gateway[:64]!r}") from None
        if family and gw.version != family:
            raise invalid(f"{field}.gateway", f"{r.gateway} is not of the family of {r.dest}")
        spec["gateway"] = str(gw)
        family = gw.version
    if r.source:
        try:
            spec["prefsrc"] = str(ipaddress.ip_address(r.source))
        except ValueError:
            raise invalid(f"{field}.source", f"not an IP address: {r.source[:64]!r}") from None
    if r.device and not _IFNAME.match(r.device):
        raise invalid(f"{field}.device", f"bad link name {r.device[:32]!r}")
    if r.scope not in RT_SCOPES:
        raise invalid(f"{field}.scope", f"{r.scope} is not one of {RT_SCOPES}")
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
    bring it up. Raises RpcError: INVALID_ARGUMENT, NOT_FOUND (no such link) or INTERNAL."""
    check_interface(iface)
    async with _ipr() as ipr:
        index = await _find_link(ipr, iface)
        try:
            changes: dict[str, Any] = {}
            if iface.hw_addr:
                changes["address"] = iface.hw_addr.lower()
            if iface.mtu:
                changes["mtu"] = iface.mtu
            if iface.name:
                changes["ifname"] = iface.name
            if changes:
                # MAC and name change only while the link is down
                await ipr.link("set", index=index, state="down")
                await ipr.link("set", index=index, **changes)
            for a in await _addresses(ipr, index):
                if a.get_attr("IFA_ADDRESS") and a["scope"] == 0:
                    await ipr.addr("del", index=index, address=a.get_attr("IFA_ADDRESS"),
                                   prefixlen=a["prefixlen"])
            for i, a in enumerate(iface.addresses):
                address, prefix = _check_address(f"interface.addresses[{i}]", a)
                await ipr.addr("add", index=index, address=address, prefixlen=prefix)
            await ipr.link("set", index=index, state="up")
        except RpcError:
            raise
        except Exception as exc:  # pyroute2 raises NetlinkError (an OSError) and others
            raise _netlink_error(f"interface {iface.name or iface.device or iface.hw_addr}", exc) from None
        return (await _describe(ipr, [index]))[0]


async def update_routes(routes: Iterable[agent_pb2.Route]) -> agent_pb2.Routes:
    """Make the main table's routes (other than the kernel's own) exactly `routes`.

    Link-scope routes are added before the gateway routes that need them. Raises RpcError.
    """
    wanted = list(routes)
    if len(wanted) > MAX_ROUTES:
        raise invalid("routes", f"more than {MAX_ROUTES}")
    specs = [_check_route(i, r) for i, r in enumerate(wanted)]
    async with _ipr() as ipr:
        try:
            names = {name: idx for idx, name in await _link_names(ipr)}
            for i, (r, spec) in enumerate(zip(wanted, specs, strict=True)):
                if r.device:
                    if r.device not in names:
                        raise RpcError(Code.NOT_FOUND, f"routes[{i}].device: no link {r.device!r} in the guest")
                    spec["oif"] = names[r.device]
            for old in await _routes(ipr):
                if old["proto"] != RTPROT_KERNEL:
                    await ipr.route("del", **_route_key(old))
            for spec in sorted(specs, key=lambda s: "gateway" in s):
                await ipr.route("replace", **spec)
        except RpcError:
            raise
        except Exception as exc:
            raise _netlink_error("routes", exc) from None
        return agent_pb2.Routes(routes=await _describe_routes(ipr))


async def list_interfaces() -> agent_pb2.Interfaces:
    async with _ipr() as ipr:
        try:
            return agent_pb2.Interfaces(interfaces=await _describe(ipr, None))
        except Exception as exc:
            raise _netlink_error("links", exc) from None


async def list_routes() -> agent_pb2.Routes:
    async with _ipr() as ipr:
        try:
            return agent_pb2.Routes(routes=await _describe_routes(ipr))
        except Exception as exc:
            raise _netlink_error("routes", exc) from None


# -- netlink helpers --------------------------------------------------------------------------------

async def _find_link(ipr: Any, iface: agent_pb2.Interface) -> int:
    if iface.device:
        found = await ipr.link_lookup(ifname=iface.device)
        what = f"interface.device: no link {iface.device!r}"
    else:
        mac = (iface.current_hw_addr or iface.hw_addr).lower()
        found = await ipr.link_lookup(address=mac)
        what = f"interface.current_hw_addr: no link with MAC {mac}"
    if not found:
        raise RpcError(Code.NOT_FOUND, f"{what} in the guest")
    return int(found[0])


async def _link_names(ipr: Any) -> list[tuple[int, str]]:
    return [(link["index"], link.get_attr("IFLA_IFNAME")) async for link in await ipr.link("dump")]


async def _addresses(ipr: Any, index: int | None) -> list[Any]:
    return [a async for a in await ipr.addr("dump") if index is None or a["index"] == index]


async def _routes(ipr: Any) -> list[Any]:
    return [r async for r in await ipr.route("dump")
            if r.get_attr("RTA_TABLE", r["table"]) == MAIN_TABLE and r["family"] in _FAMILIES.values()]


def _route_key(r: Any) -> dict[str, Any]:
    key: dict[str, Any] = {"family": r["family"], "table": MAIN_TABLE, "dst_len": r["dst_len"],
                           "scope": r["scope"], "proto": r["proto"], "type": r["type"]}
    for attr, name in (("RTA_DST", "dst"), ("RTA_GATEWAY", "gateway"), ("RTA_OIF", "oif"),
                       ("RTA_PRIORITY", "priority")):
        value = r.get_attr(attr)
        if value is not None:
            key[name] = value
    return key


async def _describe(ipr: Any, indexes: list[int] | None) -> list[agent_pb2.Interface]:
    addrs = await _addresses(ipr, None)
    out = []
    async for link in await ipr.link("dump"):
        if indexes is not None and link["index"] not in indexes:
            continue
        kind = "loopback" if link["flags"] & 0x8 else ""
        mine = [a for a in addrs if a["index"] == link["index"]]
        out.append(agent_pb2.Interface(
            device=link.get_attr("IFLA_IFNAME") or "", name=link.get_attr("IFLA_IFNAME") or "",
            hw_addr=link.get_attr("IFLA_ADDRESS") or "", mtu=link.get_attr("IFLA_MTU") or 0,
            type=kind, raw_flags=link["flags"],
            addresses=[agent_pb2.IPAddress(
                family=agent_pb2.IP_FAMILY_V4 if a["family"] == socket.AF_INET else agent_pb2.IP_FAMILY_V6,
                address=a.get_attr("IFA_ADDRESS"), prefix_length=a["prefixlen"]) for a in mine]))
    return out


async def _describe_routes(ipr: Any) -> list[agent_pb2.Route]:
    names = dict(await _link_names(ipr))
    out = []
    for r in await _routes(ipr):
        if r["type"] != 1:  # unicast only: local/broadcast routes are the kernel's
            continue
        dst = r.get_attr("RTA_DST")
        out.append(agent_pb2.Route(
            dest=f"{dst}/{r['dst_len']}" if dst else "default", gateway=r.get_attr("RTA_GATEWAY") or "",
            device=names.get(r.get_attr("RTA_OIF"), ""), source=r.get_attr("RTA_PREFSRC") or "",
            scope=r["scope"], metric=r.get_attr("RTA_PRIORITY") or 0,
            family=agent_pb2.IP_FAMILY_V4 if r["family"] == socket.AF_INET else agent_pb2.IP_FAMILY_V6))
    return out
