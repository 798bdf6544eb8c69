"""The shims' fork server (pykata.shim.forkserver), through a real containerd: pods' shims are its
children and share its imported pages, survive its death, and a bad request or a changed installation
is refused without harm (`start` then forks the shim itself)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pykata.config import load_config
from pykata.hypervisor import ksm
from pykata.shim import forkclient, forkserver
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]


def _run(ctd: Containerd) -> tuple[str, int]:
    cid = f"fs-{uuid.uuid4().hex[:8]}"
    ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, IMAGE, cid, "sleep", "1000")
    return cid, int((ctd.bundle(cid) / "shim.pid").read_text())


def _exec_echo(ctd: Containerd, cid: str) -> bytes:
    return ctd.ctr("task", "exec", "--exec-id", f"e{uuid.uuid4().hex[:6]}", cid, "echo", "alive").stdout


def _smaps(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {ln.split()[0].rstrip(":"): int(ln.split()[1]) for ln in lines}


def _ask(path: Path, body: bytes, fds: list[int]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        socket.send_fds(s, [body], fds) if fds else s.sendall(body)
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(s.recv(4096))
    assert isinstance(reply, dict)
    return reply


def test_shims_are_forked_by_one_server_share_its_pages_and_outlive_it(containerd: Containerd) -> None:
    ids: list[str] = []
    try:
        for _ in range(2):
            cid, _pid = _run(containerd)
            ids.append(cid)
        server = containerd.fork_server_pid()
        assert server is not None
        shims = [int((containerd.bundle(c) / "shim.pid").read_text()) for c in ids]
        assert [psutil.Process(p).ppid() for p in shims] == [server, server]
        # ps shows containerd's command line for each (as for a shim `start` forked)
        for c, p in zip(ids, shims, strict=True):
            cmd = psutil.Process(p).cmdline()
            assert cmd[cmd.index("-id") + 1] == c and cmd[-1] == "start" and forkclient.ACTION not in cmd
        # the imported modules are the server's pages, shared copy-on-write: PSS well under RSS
        for p in shims:
            m = _smaps(p)
            assert m["Rss"] - m["Pss"] > 8 * 1024, m
        # runtime.shim_mem_merge = false (the default): nothing offered to the host's KSM
        assert not [p for p in [server, *shims] if ksm.merges(p)]

        # refused requests: the server answers why and keeps serving
        path = forkclient.server_path(load_config().runtime.runtime_dir, str(containerd.socket))
        assert "one JSON object and one socket" in str(_ask(path, b"{}", [])["error"])
        r, w = os.pipe()
        try:
            good = {"bundle": "/x", "sandbox_id": "x", "socket": "/x", "flags": {}, "env": {}, "argv": ["x"]}
            for bad, why in (({"env": {"A": 1}}, "env"), ({"bundle": "relative"}, "bundle"),
                             ({"argv": "x start"}, "argv"), ({"flags": {"id": 3}}, "flags")):
                assert _ask(path, json.dumps(good | bad).encode(), [r])["error"] == f"bad request: {why}"
            assert "unreadable request" in str(_ask(path, b"\xff not json", [r])["error"])
        finally:
            os.close(r)
            os.close(w)
        assert containerd.fork_server_pid() == server

        # the pods' shims are their own sessions: killing the server leaves them serving
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while containerd.fork_server_pid() == server and time.monotonic() < deadline:
            time.sleep(0.05)
        assert containerd.fork_server_pid() is None
        assert [_exec_echo(containerd, c) for c in ids] == [b"alive\n", b"alive\n"]
        # the next pod launches a new server
        cid, pid = _run(containerd)
        ids.append(cid)
        again = containerd.fork_server_pid()
        assert again not in (None, server) and psutil.Process(pid).ppid() == again
        assert _exec_echo(containerd, cid) == b"alive\n"
    finally:
        for c in ids:
            containerd.remove(c)


def test_a_changed_installation_is_not_forked(containerd: Containerd) -> None:
    """The server refuses to fork code older than the files on disk and exits; `start` forks that
    pod's shim itself and the next pod gets a new server."""
    ids: list[str] = []
    source = Path(forkserver.__file__)
    st = source.stat()
    try:
        cid, _pid = _run(containerd)
        ids.append(cid)
        server = containerd.fork_server_pid()
        assert server is not None
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        cid, pid = _run(containerd)
        ids.append(cid)
        assert psutil.Process(pid).ppid() != server
        assert _exec_echo(containerd, cid) == b"alive\n"
        deadline = time.monotonic() + 10
        while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not psutil.pid_exists(server) or psutil.Process(server).status() == psutil.STATUS_ZOMBIE
        cid, pid = _run(containerd)
        ids.append(cid)
        now = containerd.fork_server_pid()
        assert now not in (None, server) and psutil.Process(pid).ppid() == now
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
        for c in ids:
            containerd.remove(c)
