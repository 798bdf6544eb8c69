"""A small rtnetlink client for the guest: links, addresses and main-table routes.

The host uses pyroute2; the guest cannot: pyroute2 imports ssl and sqlite3 at package load (the guest
image ships neither library) and costs about a second of import under TCG. The agent needs only these
few requests, so they are written here over the stdlib's AF_NETLINK socket. Blocking calls: the agent
runs them in a thread.

    with Rtnl() as nl:
        idx = nl.link_by_mac("02:50:4b:00:00:01").index
        nl.set_link(idx, up=False); nl.set_link(idx, mac="0a:58:0a:fe:00:07", mtu=1450)
        nl.address("add", idx, "10.254.0.7", 24)
        nl.route("replace", dst="default", gateway="10.254.0.1", oif=idx)
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from pykata.record import Record

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x100, 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
IFF_UP = 0x1
RTN_UNICAST = 1
RTPROT_BOOT = 3
MAIN_TABLE = 254

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
RECV_SIZE = 1 << 16
# A guest has a handful of links; a dump that never ends is a bug or an attack on the agent.
MAX_DUMP_MESSAGES = 100_000


class Link(Record):
    __slots__ = ("flags", "index", "mac", "mtu", "name")
    __match_args__ = ("index", "name", "mac", "mtu", "flags")

    def __init__(self, index: int, name: str, mac: str, mtu: int, flags: int) -> None:
        self.index = index
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.flags = flags


class Address(Record):
    __slots__ = ("address", "family", "index", "prefixlen", "scope")
    __match_args__ = ("index", "family", "address", "prefixlen", "scope")

    def __init__(self, index: int, family: int, address: str, prefixlen: int, scope: int) -> None:
        self.index = index
        self.family = family
        self.address = address
        self.prefixlen = prefixlen
        self.scope = scope


class Route(Record):
    __slots__ = ("dst", "dst_len", "family", "gateway", "oif", "prefsrc", "priority", "protocol", "scope",
                 "table", "type")
    __match_args__ = ("family", "dst", "dst_len", "gateway", "oif", "prefsrc", "priority", "table", "protocol",
                      "scope", "type")

    def __init__(self, family: int, dst: str | None, dst_len: int, gateway: str | None, oif: int | None,
                 prefsrc: str | None, priority: int | None, table: int, protocol: int, scope: int,
                 type: int) -> None:
        self.family = family
        self.dst = dst
        self.dst_len = dst_len
        self.gateway = gateway
        self.oif = oif
        self.prefsrc = prefsrc
        self.priority = priority
        self.table = table
        self.protocol = protocol
        self.scope = scope
        self.type = type


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size or pos + length > len(data):
            break
        out[kind & 0x3FFF] = data[pos + _RTATTR.size:pos + length]
        pos += (length + 3) & ~3
    return out


def _ip_bytes(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    return (socket.AF_INET if ip.version == 4 else socket.AF_INET6), ip.packed


def _ip_text(family: int, raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return socket.inet_ntop(family, raw)


def _mac_text(raw: bytes | None) -> str:
    return ":".join(f"{b:02x}" for b in raw) if raw else ""


class Rtnl:
    """One NETLINK_ROUTE socket; every request waits for the kernel's answer. Raises OSError."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; return the (type, payload) of each answer message (a dump's parts)."""
        self._seq += 1
        seq = self._seq
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK,
                                       seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(RECV_SIZE)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, mtype, _mflags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size or pos + length > len(data):
                    raise OSError(errno.EPROTO, "truncated netlink message")
                payload = data[pos + _NLMSGHDR.size:pos + length]
                pos += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return out
                if mtype == NLMSG_DONE:
                    return out
                out.append((mtype, payload))
                if len(out) > MAX_DUMP_MESSAGES:
                    raise OSError(errno.E2BIG, "netlink dump too long")

    # -- links --------------------------------------------------------------------------------------

    def links(self) -> list[Link]:
        out = []
        for _, p in self._request(RTM_GETLINK, NLM_F_DUMP, _IFINFOMSG.pack(0, 0, 0, 0, 0)):
            _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(p)
            a = _attrs(p[_IFINFOMSG.size:])
            mtu = struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0
            out.append(Link(index, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
                            _mac_text(a.get(IFLA_ADDRESS)), mtu, flags))
        return out

    def set_link(self, index: int, *, up: bool | None = None, mac: str | None = None, mtu: int | None = None,
                 name: str | None = None) -> None:
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if mac is not None:
            body += _attr(IFLA_ADDRESS, bytes(int(x, 16) for x in mac.split(":")))
        if mtu is not None:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if name is not None:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        self._request(RTM_NEWLINK, 0, body)

    # -- addresses ----------------------------------------------------------------------------------

    def addresses(self) -> list[Address]:
        out = []
        for _, p in self._request(RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(0, 0, 0, 0, 0)):
            family, prefixlen, _flags, scope, index = _IFADDRMSG.unpack_from(p)
            a = _attrs(p[_IFADDRMSG.size:])
            raw = a.get(IFA_LOCAL, a.get(IFA_ADDRESS))
            text = _ip_text(family, raw) if family in (socket.AF_INET, socket.AF_INET6) else None
            if text is not None:
                out.append(Address(index, family, text, prefixlen, scope))
        return out

    def address(self, op: str, index: int, address: str, prefixlen: int) -> None:
        family, raw = _ip_bytes(address)
        # An IPv6 address comes from the pod's network namespace, where CNI set it on the same link, as it does
        # for runc. Duplicate address detection again in the guest would leave it tentative (unreachable,
        # no neighbor answers) for the pod's first second or two.
        flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
        body = _IFADDRMSG.pack(family, prefixlen, flags, 0, index) + _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        if op == "add":
            self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self._request(RTM_DELADDR, 0, body)

    # -- routes -------------------------------------------------------------------------------------

    def routes(self, family: int = socket.AF_UNSPEC) -> list[Route]:
        out = []
        for _, p in self._request(RTM_GETROUTE, NLM_F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, dst_len, _src_len, _tos, table, proto, scope, rtype, _flags = _RTMSG.unpack_from(p)
            if fam not in (socket.AF_INET, socket.AF_INET6):
                continue
            a = _attrs(p[_RTMSG.size:])
            if RTA_TABLE in a:
                table = struct.unpack("=I", a[RTA_TABLE])[0]
            out.append(Route(
                family=fam, dst=_ip_text(fam, a.get(RTA_DST)), dst_len=dst_len,
                gateway=_ip_text(fam, a.get(RTA_GATEWAY)),
                oif=struct.unpack("=i", a[RTA_OIF])[0] if RTA_OIF in a else None,
                prefsrc=_ip_text(fam, a.get(RTA_PREFSRC)),
                priority=struct.unpack("=I", a[RTA_PRIORITY])[0] if RTA_PRIORITY in a else None,
                table=table, protocol=proto, scope=scope, type=rtype))
        return out

    def route(self, op: str, *, family: int, dst: str | None, dst_len: int, gateway: str | None = None,
              oif: int | None = None, prefsrc: str | None = None, priority: int | None = None,
              scope: int = 0, protocol: int = RTPROT_BOOT, rtype: int = RTN_UNICAST) -> None:
        """`op` "replace" (add or change) or "del" a route of the main table."""
        body = _RTMSG.pack(family, dst_len, 0, 0, MAIN_TABLE, protocol, scope, rtype, 0)
        if dst is not None:
            body += _attr(RTA_DST, _ip_bytes(dst)[1])
        if gateway is not None:
            body += _attr(RTA_GATEWAY, _ip_bytes(gateway)[1])
        if oif is not None:
            body += _attr(RTA_OIF, struct.pack("=i", oif))
        if prefsrc is not None:
            body += _attr(RTA_PREFSRC, _ip_bytes(prefsrc)[1])
        if priority is not None:
            body += _attr(RTA_PRIORITY, struct.pack("=I", priority))
        if op == "replace":
            self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self._request(RTM_DELROUTE, 0, body)
