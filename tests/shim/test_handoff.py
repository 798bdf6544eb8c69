"""`start` handed to the shims' fork server (pykata.shim.handoff): the real executable, run as containerd
runs it, against a socket standing in for containerd (no VM: a shim boots one only on Create). The
first `start` has no server (it launches one and forks as before); later ones are run by a child of the
server, which becomes the pod's shim; what the server cannot or may not serve falls back to the full
`start`; its errors are `start`'s; `delete`, handed over the same way, ends a live shim and cleans
up after a dead one."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pykata.config.load import packaged_default_text
from pykata.protocols import shim_pb2
from pykata.shim import handoff
from pykata.shim.bootstrap import DELETED_STATUS
from tests.shim.harness import SHIM

CRI = {"io.kubernetes.cri.container-type": "container"}


class Host:
    """A temp runtime_dir, a configuration naming it, and a listening socket as containerd's address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runtime_dir = root / "run"
        self.runtime_dir.mkdir()
        text = packaged_default_text().replace('\nruntime_dir = "/run/pykata"\n',
                                               f'\nruntime_dir = "{self.runtime_dir}"\n')
        assert str(self.runtime_dir) in text
        self.config = root / "configuration.toml"
        self.config.write_text(text)
        self.no_server_config = root / "no-server.toml"
        self.no_server_config.write_text(text.replace("\nshim_fork_server = true\n", "\nshim_fork_server = false\n"))
        self.address = str(root / "containerd.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.address)
        self.listener.listen(8)
        self.marks = root / "marks"
        self.bundles: list[Path] = []

    def env(self, config: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TTRPC_ADDRESS", "PYKATA_TIMING_FILE")}
        return env | {"PYKATA_CONFIG": str(config or self.config), "PYKATA_TIMING_FILE": str(self.marks)}

    def run(self, cid: str, action: str, annotations: dict[str, str] | None = None,
            config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        bundle = self.root / cid
        if not bundle.exists():
            bundle.mkdir()
            (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": annotations or {}}))
            self.bundles.append(bundle)
        argv = [str(SHIM), "-namespace", "handoff", "-address", self.address, "-id", cid, action]
        return subprocess.run(argv, cwd=bundle, env=self.env(config), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60)

    def server(self) -> int | None:
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if "fork-server" in cmd and self.address in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                return p.pid
        return None

    def forked_by_server(self, pid: int) -> bool:
        """Whether `pid` ran a `start` handed over by pykata.shim.handoff (its timing mark)."""
        return any(line.split()[1:] == [str(pid), "start.forked"] for line in self.marks.read_text().splitlines())

    def deletes_by_server(self) -> int:
        return sum(line.endswith(" delete.forked") for line in self.marks.read_text().splitlines())


def _shim_pid(host: Host, cid: str) -> int:
    return int((host.root / cid / "shim.pid").read_text())


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        for bundle in h.bundles:  # `delete` ends a live shim (Shutdown) and removes what a dead one left
            h.run(bundle.name, "delete")
        pids = [int(p.read_text()) for b in h.bundles if (p := b / "shim.pid").exists()]
        server = h.server()
        if server is not None:
            os.kill(server, signal.SIGTERM)
        h.listener.close()
        assert all(_gone(p) for p in pids), "a shim outlived its delete"
        assert server is None or _gone(server)
        # (the fork server's own socket stays when it was killed: the next server replaces it)
        assert not [p for p in (h.runtime_dir / "s").iterdir() if not p.name.startswith("fork-")], \
            "a shim's socket was left"


def test_start_is_served_by_the_fork_server_and_falls_back_without_it(host: Host) -> None:
    # no server yet: the full `start` forks this shim through a server it launches
    first = host.run("p0", "start")
    assert first.returncode == 0, first.stderr
    server = host.server()
    assert server is not None and psutil.Process(_shim_pid(host, "p0")).ppid() == server

    # now a child of the server runs `start` and becomes the pod's shim, named as containerd ran it
    out = host.run("p1", "start")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"unix://") and out.stdout.decode() == (host.root / "p1" / "address").read_text()
    shim = _shim_pid(host, "p1")
    assert host.forked_by_server(shim) and psutil.Process(shim).ppid() == server
    cmd = psutil.Process(shim).cmdline()
    assert cmd[cmd.index("-id") + 1] == "p1" and cmd[-1] == "start"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(out.stdout.decode().removeprefix("unix://"))  # it listens
    assert json.loads((host.root / "p1" / "pykata-config.json").read_text())["config"] == str(host.config)

    # a container of that pod gets the pod's shim, through a child of the server that then ends
    c1 = host.run("p1-c1", "start", CRI | {"io.kubernetes.cri.sandbox-id": "p1"})
    assert c1.returncode == 0 and c1.stdout == out.stdout, c1.stderr
    assert (host.root / "p1-c1" / "address").read_text() == out.stdout.decode()

    # `start`'s own errors come back as they would from the full `start` (exit 1, the message)
    orphan = host.run("p9-c1", "start", CRI | {"io.kubernetes.cri.sandbox-id": "p9"})
    assert orphan.returncode == 1 and b"its sandbox p9 has no running shim" in orphan.stderr
    bad = host.run("p8-c1", "start", CRI | {"io.kubernetes.cri.sandbox-id": "../x"})
    assert bad.returncode == 1 and b"io.kubernetes.cri.sandbox-id" in bad.stderr

    # a configuration without the fork server: the server declines, `start` forks the shim itself
    own = host.run("p2", "start", config=host.no_server_config)
    assert own.returncode == 0, own.stderr
    pid = _shim_pid(host, "p2")
    assert psutil.Process(pid).ppid() != server and not host.forked_by_server(pid)

    # what is not a request is declined, and the server goes on serving
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(handoff.socket_name(host.address))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        kind, _, why = handoff.unpack(s.recv(4096), 3)
    assert kind == b"decline" and b"unreadable request" in why
    assert host.run("p3", "start").returncode == 0 and host.forked_by_server(_shim_pid(host, "p3"))
    assert host.server() == server

    # the server gone (killed), `start` falls back to the full `start`, which launches a new one
    os.kill(server, signal.SIGKILL)
    assert _gone(server)
    again = host.run("p4", "start")
    assert again.returncode == 0, again.stderr
    assert not host.forked_by_server(_shim_pid(host, "p4")) and host.server() not in (None, server)
    # every shim serves on, whoever forked it
    for cid in ("p0", "p1", "p2", "p3", "p4"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect((host.root / cid / "address").read_text().removeprefix("unix://"))


def test_delete_is_served_by_the_fork_server_for_live_and_dead_shims(host: Host) -> None:
    for cid in ("d0", "d1", "d2"):
        assert host.run(cid, "start").returncode == 0
    assert host.server() is not None
    # a live shim with nothing left: asked to shut down, gone when `delete` returns
    live = _shim_pid(host, "d1")
    out = host.run("d1", "delete")
    assert out.returncode == 0, out.stderr
    assert host.deletes_by_server() == 1 and _gone(live, timeout=1)
    response = shim_pb2.DeleteResponse.FromString(out.stdout)
    assert response.exit_status == DELETED_STATUS and response.exited_at.seconds > 0
    # a shim killed: what it left (its socket) is removed, as containerd's dead-shim cleanup expects
    dead = _shim_pid(host, "d2")
    sock = Path((host.root / "d2" / "address").read_text().removeprefix("unix://"))
    os.kill(dead, signal.SIGKILL)
    assert _gone(dead) and sock.exists()
    out = host.run("d2", "delete")
    assert out.returncode == 0 and host.deletes_by_server() == 2, out.stderr
    assert not sock.exists()
    # what `delete` says on stderr comes back from the server's child
    bad = host.run("d9", "delete", CRI | {"io.kubernetes.cri.sandbox-id": "../x"})
    assert bad.returncode == 0 and host.deletes_by_server() == 3
    assert b"io.kubernetes.cri.sandbox-id" in bad.stderr


HANDOFF_PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    print("reached")
except OSError as e:
    print("refused", e.errno)
"""


def test_only_root_in_the_hosts_mount_namespace_reaches_the_handoff_socket(host: Host) -> None:
    """The attack (CVE-2020-15257's, against containerd's shims): the handoff socket was in the abstract
    namespace, which every process of the host's network namespace reaches, with uid 0 as the only
    check: a root process of a runc container with hostNetwork (uid 0 on the host without a user
    namespace) had the fork server run a `start` with the environment it chose (PYKATA_CONFIG naming
    its own file, whose QEMU "binary" the pod's shim then runs as root), or bound the name first and
    took every pod's `start`. Now the socket is a file in root's 0700 HANDOFF_DIR: a process in another
    mount namespace (a container's, without the host's /run) or of another uid cannot connect, and
    nothing of the fork server is in the abstract namespace."""
    assert host.run("a0", "start").returncode == 0
    assert host.run("a1", "start").returncode == 0 and host.forked_by_server(_shim_pid(host, "a1"))
    path = handoff.socket_name(host.address).decode()
    assert path.startswith(handoff.HANDOFF_DIR + "/")
    st = os.stat(handoff.HANDOFF_DIR)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    digest = path.rsplit("/", 1)[1]  # the name the abstract socket had (others' installations may have theirs)
    assert not [line for line in Path("/proc/net/unix").read_text().splitlines() if line.endswith(digest)
                and "@" in line]
    # root in the host's mount namespace reaches it (the probe works)
    same = subprocess.run([sys.executable, "-c", HANDOFF_PROBE, path], capture_output=True, text=True, timeout=30)
    assert same.stdout.split() == ["reached"], same
    # root in a container's mount namespace (its own /run, as runc gives it) does not
    other_ns = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs /run && exec {sys.executable} -c '{HANDOFF_PROBE}' {path}"],
        capture_output=True, text=True, timeout=30)
    assert other_ns.stdout.split()[0] == "refused", other_ns
    # nor does another uid in the host's mount namespace (the directory is root's, 0700)
    other_uid = subprocess.run([sys.executable, "-c", HANDOFF_PROBE, path], capture_output=True, text=True,
                               timeout=30, user=65534, group=65534)
    assert other_uid.stdout.split()[0] == "refused", other_uid
    # and the server still serves root's `start`
    assert host.run("a2", "start").returncode == 0 and host.forked_by_server(_shim_pid(host, "a2"))
