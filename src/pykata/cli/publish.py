"""`pykata run -p/--publish`: docker's port publishing, on a container with `--network egress`.

`-p [IP:][HOSTPORT:]CONTAINERPORT[/tcp|/udp]` forwards the host's IP:HOSTPORT to the container's port
through the VM's user-mode network (pykata.network.egress; QEMU's hostfwd). Where docker binds every
address of the host by default, pykata binds 127.0.0.1 unless an address is given: a forward on the
node's own addresses publishes the sandbox to the network, which is for the user to ask for. A host port
below 1024 is refused unless pykata runs as root (as binding one would be); HOSTPORT left out (or 0)
picks a free port, printed once forwarded. Port ranges are not taken.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from pykata.sandbox import SpecError

FLAG = "--publish"
PRIVILEGED = 1024


@dataclass(frozen=True)
class Publish:
    """One forward: `host_ip`:`host_port` (0: a free one) on the host to `container_port`/`protocol`."""

    host_ip: str
    host_port: int
    container_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port} -> {self.container_port}/{self.protocol}"


def parse_publish(text: str, *, euid: int | None = None) -> Publish:
    """One -p value. Raises SpecError naming --publish (a bad form, address, port or protocol, a port
    range, a privileged host port without root)."""
    spec, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    if protocol not in ("tcp", "udp") or "\0" in text:
        raise SpecError(FLAG, f"{text[:80]!r}: the protocol must be tcp or udp")
    parts = spec.rsplit(":", 2)
    if len(parts) == 3:
        host_ip, host, container = parts
    elif len(parts) == 2:
        host_ip, (host, container) = "127.0.0.1", parts
    else:
        host_ip, host, container = "127.0.0.1", "", parts[0]
    host_ip = host_ip.removeprefix("[").removesuffix("]") or "127.0.0.1"
    try:
        host_ip = str(ipaddress.IPv4Address(host_ip))
    except ValueError:
        raise SpecError(FLAG, f"{text[:80]!r}: {host_ip[:64]!r} is not an IPv4 address of this host") from None
    container_port = _port(text, container, "container port")
    host_port = _port(text, host, "host port") if host else 0
    if container_port == 0:
        raise SpecError(FLAG, f"{text[:80]!r}: the container port must be 1-65535")
    if 0 < host_port < PRIVILEGED and (os.geteuid() if euid is None else euid) != 0:
        raise SpecError(FLAG, f"{text[:80]!r}: host port {host_port} is privileged (below {PRIVILEGED}): "
                              "only root may publish it")
    return Publish(host_ip, host_port, container_port, protocol)


def parse_all(values: tuple[str, ...] | list[str], *, euid: int | None = None) -> list[Publish]:
    """Every -p value, checked against each other too (one host address and port, one forward).
    Raises SpecError naming --publish."""
    out = [parse_publish(v, euid=euid) for v in values]
    seen: set[tuple[str, int, str]] = set()
    for p in out:
        key = (p.host_ip, p.host_port, p.protocol)
        if p.host_port and key in seen:
            raise SpecError(FLAG, f"{p.host_ip}:{p.host_port}/{p.protocol} is published twice")
        seen.add(key)
    return out


def _port(text: str, value: str, what: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 5 or int(value) > 65535:
        hint = " (port ranges are not supported)" if "-" in value else ""
        raise SpecError(FLAG, f"{text[:80]!r}: {what} {value[:16]!r} is not a port number{hint}")
    return int(value)


def free_port(host_ip: str, protocol: str) -> int:
    """A port nothing is bound to on `host_ip` now (QEMU binds it a moment later; a race is retried)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host_ip, 0))
        return int(s.getsockname()[1])
