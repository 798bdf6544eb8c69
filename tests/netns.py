"""A network namespace reached from the host over a veth pair, with a server in it: where the egress tests
(tests/sdk/test_network.py, tests/security/test_egress_netns.py) and bench/egress_bench.py send a guest's
connections. Its addresses are private (198.18.0.0/15, for benchmarks): nothing leaves the machine."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# Answers "port <n>" on each port it listens on, then closes.
SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"port %d\\n" % port); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@dataclass
class Subnet:
    """A namespace at `near` (allowed) and `far` (a second address of it), reached from the host over
    a veth whose host end is `host_end` (a local address of this host)."""

    netns: str
    host_end: str
    near: str
    far: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def served_subnet(prefix: str, net: str, ports: Sequence[int]) -> Iterator[Subnet]:
    """A namespace `<prefix>-<random>` with `net`.2 (near) and `net`.3 (far) on its end of a veth (its
    loopback up), the host's end `net`.1/24, and SERVER listening on `ports` on all its addresses.
    The server is killed and the namespace and veth removed on exit, whatever happened.

    Raises:
        subprocess.CalledProcessError: an `ip` command failed (what was made is removed).
    """
    tag = secrets.token_hex(3)
    ns, veth, peer = f"{prefix}-{tag}", f"{prefix[:3]}v{tag}", f"{prefix[:3]}p{tag}"
    subnet = Subnet(ns, f"{net}.1", f"{net}.2", f"{net}.3")
    ip("netns", "add", ns)
    server = None
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns)
        ip("addr", "add", f"{subnet.host_end}/24", "dev", veth)
        ip("link", "set", veth, "up")
        for addr in (subnet.near, subnet.far):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", peer)
        ip("-n", ns, "link", "set", peer, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, *map(str, ports)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield subnet
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        ip("netns", "del", ns)
