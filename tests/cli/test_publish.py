"""`pykata run --network egress -p`: docker's -p forms, checked before a VM boots (each bad one names
--publish), and a real forward: the host reaches a server in the container through 127.0.0.1 only."""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid

import psutil
import pytest

from pykata.cli.publish import Publish, parse_all, parse_publish
from pykata.sandbox import SpecError
from tests.cli.test_run import pykata


@pytest.mark.parametrize("text,want", [
    ("8080:80", Publish("127.0.0.1", 8080, 80)),  # 127.0.0.1 unless an address is given (docker: 0.0.0.0)
    ("80", Publish("127.0.0.1", 0, 80)),  # a free host port
    ("8080:80/udp", Publish("127.0.0.1", 8080, 80, "udp")),
    ("0.0.0.0:8080:80/tcp", Publish("0.0.0.0", 8080, 80)),
    ("192.0.2.1::53/udp", Publish("192.0.2.1", 0, 53, "udp")),
    ("443:443", Publish("127.0.0.1", 443, 443)),  # privileged, as root
])
def test_the_forms_docker_takes(text: str, want: Publish) -> None:
    assert parse_publish(text, euid=0) == want


@pytest.mark.parametrize("text,needle", [
    ("8080:80/sctp", "the protocol must be tcp or udp"),
    ("8080:http", "container port 'http' is not a port number"),
    ("70000:80", "host port '70000' is not a port number"),
    ("8000-8010:8000-8010", "port ranges are not supported"),
    ("localhost:8080:80", "'localhost' is not an IPv4 address"),
    ("::1:8080:80", "is not an IPv4 address"),
    ("8080:0", "the container port must be 1-65535"),
    ("", "container port '' is not a port number"),
])
def test_bad_specs_name_the_flag(text: str, needle: str) -> None:
    with pytest.raises(SpecError, match=r"^--publish: ") as err:
        parse_publish(text, euid=0)
    assert needle in str(err.value)


def test_privileged_ports_need_root_and_one_forward_per_port() -> None:
    with pytest.raises(SpecError, match=r"^--publish: .*host port 80 is privileged .*only root"):
        parse_publish("80:80", euid=1000)
    assert parse_publish("8080:80", euid=1000).host_port == 8080
    with pytest.raises(SpecError, match=r"^--publish: 127.0.0.1:8080/tcp is published twice"):
        parse_all(["8080:80", "127.0.0.1:8080:81"], euid=0)
    assert len(parse_all(["8080:80", "8080:80/udp", "80", "81"], euid=0)) == 4


@pytest.mark.parametrize("args,needle", [
    (["-p", "8080:80"], b"--publish: needs --network egress"),
    (["--network", "host", "-p", "8080:80"], b"--network: 'host': use none"),
    (["--network", "egress", "-p", "8080:http"], b"--publish: '8080:http'"),
    (["-d", "--network", "egress", "-p", "1:2:3:4"], b"--publish:"),
])
def test_bad_flags_fail_before_a_vm_boots(args: list[str], needle: bytes) -> None:
    p = pykata("run", "--rm", *args, "busybox", "true", timeout=60)
    assert p.returncode == 125 and needle in p.stderr and b"Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def _free(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bound_by(port: int, kind: str) -> list[tuple[str, str]]:
    """(address, process name) of the sockets bound to `port` (`kind` "tcp" or "udp") on this host."""
    out = []
    for c in psutil.net_connections(kind=kind):
        if c.laddr and c.laddr.port == port and (kind == "udp" or c.status == psutil.CONN_LISTEN):
            try:
                out.append((c.laddr.ip, psutil.Process(c.pid).name() if c.pid else "?"))
            except psutil.Error:
                out.append((c.laddr.ip, "?"))
    return out


@pytest.mark.vm
def test_published_ports_reach_the_container_on_loopback_only() -> None:
    """A TCP forward reaches httpd in the container (GET through 127.0.0.1:HOSTPORT); it is bound on
    127.0.0.1 alone; a UDP forward is bound by the VM's QEMU too (busybox has no UDP server to answer
    it); a left-out host port is chosen and printed; removing the container closes every forward."""
    name = f"pub-{uuid.uuid4().hex[:6]}"
    tcp, udp = _free(), _free(socket.SOCK_DGRAM)
    try:
        p = pykata("run", "-d", "--name", name, "--network", "egress", "-p", f"{tcp}:8000",
                   "-p", f"{udp}:9000/udp", "-p", "8001", "busybox", "httpd", "-f", "-p", "8000", "-h", "/etc")
        assert p.returncode == 0, p.stderr
        printed = p.stderr.decode()  # the chosen host port, shown by `run -d` too
        assert printed.startswith("pykata: published 127.0.0.1:") and printed.endswith(" -> 8001/tcp\n"), printed
        chosen = int(printed.split(":")[2].split()[0])
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{tcp}/hosts", timeout=10) as r:
                    body = r.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert b"127.0.0.1\tlocalhost" in body
        assert [ip for ip, _ in _bound_by(tcp, "tcp")] == ["127.0.0.1"]
        assert [(ip, who.startswith("qemu")) for ip, who in _bound_by(udp, "udp")] == [("127.0.0.1", True)]
        assert [ip for ip, _ in _bound_by(chosen, "tcp")] == ["127.0.0.1"]
    finally:
        pykata("rm", "-f", name)
    assert not _bound_by(tcp, "tcp") and not _bound_by(udp, "udp") and not _bound_by(chosen, "tcp")
