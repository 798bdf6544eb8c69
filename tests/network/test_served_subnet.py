"""tests/netns.py's served_subnet, the namespace the egress tests and bench/egress_bench.py send a guest's
connections to: its server answers on each port at both of its addresses, and on exit (an error in the
body included) nothing of it is left: no namespace, no veth, no server."""

from __future__ import annotations

import secrets
import socket
import subprocess

import psutil
import pytest

from tests.netns import SERVER, served_subnet


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _servers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if SERVER in (p.info["cmdline"] or [])}


def _ask(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=10) as s:
        return s.recv(64)


def test_the_server_answers_and_nothing_is_left() -> None:
    before = (_netns(), _servers())
    net_prefix = f"198.18.{216 + secrets.randbelow(35)}"  # (the SDK tests take 198.18.16-215)
    with pytest.raises(RuntimeError, match="the body failed"), served_subnet("pksst", net_prefix, (8080, 8081)) as net:
        assert net.netns in _netns() and net.netns.startswith("pksst-")
        for address in (net.near, net.far):
            assert _ask(address, 8080) == b"port 8080\n" and _ask(address, 8081) == b"port 8081\n"
        raise RuntimeError("the body failed")
    assert (_netns(), _servers()) == before
    veths = subprocess.run(
        ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
    ).stdout
    assert f"pksv{net.netns.removeprefix('pksst-')}" not in veths, veths
