"""The client side of the shims' fork server (pykata.shim.forkserver): where it listens, launching it,
and `start`'s request for a pod's shim (the full `start`, pykata.shim.bootstrap; the common `start` is
pykata.shim.handoff). Apart from the server so that `start` imports none of the server's code."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pykata.fsutil import process_alive, read_all
from pykata.shim.flags import Flags

ACTION = "fork-server"
MAX_REQUEST_BYTES = 1 << 20
REQUEST_TIMEOUT = 5.0
# How long `start` waits for a server it launched to have done its imports (a loaded host: seconds).
LAUNCH_WAIT = 20.0
FLAG_FIELDS = ("namespace", "address", "publish_binary", "id", "bundle")
POOL_ENTRY = "pool-entry"  # a request's "kind" for a waiting shim of the warm pool (else a pod's shim)


def server_path(runtime_dir: str, address: str) -> Path:
    """The server's socket for this containerd and this installation (two checkouts or two containerds
    sharing a runtime_dir never fork each other's shims)."""
    import pykata

    digest = hashlib.sha256(f"{sys.prefix}\n{pykata.__file__}\n{address}".encode()).hexdigest()[:24]
    return Path(runtime_dir) / "s" / f"fork-{digest}"


def server_argv(address: str) -> list[str]:
    script = Path(sys.executable).parent / "containerd-shim-pykata-v2"
    return [sys.executable, str(script), "-address", address, ACTION]


def fork_shim(runtime_dir: str, flags: Flags, bundle: Path, sandbox_id: str, socket_path: Path,
              listener: socket.socket) -> int | None:
    """Have the fork server fork this pod's shim (launching the server when there is none); the shim's
    pid, or None when that did not work (the caller forks the shim itself). Never raises."""
    path = server_path(runtime_dir, flags.address)
    request = {"flags": {k: getattr(flags, k) for k in FLAG_FIELDS} | {"debug": flags.debug},
               "bundle": str(bundle), "sandbox_id": sandbox_id, "socket": str(socket_path),
               "env": {k: v for k, v in os.environ.items()}, "argv": [sys.executable, *sys.argv]}
    body = json.dumps(request).encode()
    conn = _connect(path)
    if conn is None:
        launched = _launch(path, flags.address)
        if launched is None:
            return None
        deadline = time.monotonic() + LAUNCH_WAIT
        while conn is None and time.monotonic() < deadline:
            time.sleep(0.02)
            # ours exited (another one holds the lock, or it failed): wait only while a server lives
            if launched.poll() is not None and not _lock_held(path):
                return None
            conn = _connect(path)
        if conn is None:
            return None
    return _ask_for_pid(conn, body, [listener.fileno()])


def fork_pool_entry(runtime_dir: str, address: str, entry_id: str,
                    launched: Callable[[int], None] | None = None, *, launch: bool = True) -> int | None:
    """Have this containerd's fork server fork a waiting shim of the warm pool (pykata.shim.pooled)
    registered as `entry_id` (pykata.factory.pool.fill's `fork`), in a mount namespace of its own; its
    pid, or None (the caller starts a fresh process instead). A forked one skips the imports a fresh
    waiting shim does (~0.35 CPU s of the ~1 s a pooled VM costs to make). When no server runs, one
    is launched for the next ones (unless `launch` is False) and this one is None; `launched` is called
    with its pid (a pod's shim moves it out of the pod's cgroup: the server outlives the pod). Never
    raises."""
    path = server_path(runtime_dir, address)
    conn = _connect(path)
    if conn is None:
        server = _launch(path, address) if launch else None
        if server is not None and launched is not None:
            launched(server.pid)
        return None
    env = {k: v for k, v in os.environ.items() if k != "PYKATA_TIMING_FILE"}
    body = json.dumps({"kind": POOL_ENTRY, "entry": entry_id, "address": address, "env": env}).encode()
    return _ask_for_pid(conn, body, [])


def pool_fork(runtime_dir: str, address: str, launched: Callable[[int], None] | None = None, *,
              launch: bool = True) -> Callable[[str], int | None]:
    """pykata.factory.pool.fill's `fork` through the fork server of the containerd at `address`
    (fork_pool_entry): once a request found no server (or it refused), the rest of that fill starts
    fresh processes."""
    no_server = False

    def forked(entry_id: str) -> int | None:
        nonlocal no_server
        if no_server:
            return None
        pid = fork_pool_entry(runtime_dir, address, entry_id, launched, launch=launch)
        no_server = pid is None
        return pid

    return forked


def _ask_for_pid(conn: socket.socket, body: bytes, fds: list[int]) -> int | None:
    """Send the fork server one request (and `fds`), then read its answer: the forked child's pid, or
    None when it refused or the exchange failed. Closes `conn`."""
    with conn:
        try:
            if fds:
                socket.send_fds(conn, [body], fds)
            else:
                conn.sendall(body)
            conn.shutdown(socket.SHUT_WR)
            reply = json.loads(read_all(conn, 4096) or b"{}")
        except (OSError, ValueError):
            return None
    if isinstance(reply, dict) and reply.get("ok") is True and isinstance(reply.get("pid"), int):
        return int(reply["pid"])
    return None


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(REQUEST_TIMEOUT)
    try:
        s.connect(str(path))
        _pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():  # only a server of our own uid forks our shims
            raise OSError(f"fork server {path} runs as uid {uid}")
    except OSError:
        s.close()
        return None
    return s


def _launch(path: Path, address: str) -> subprocess.Popen[bytes] | None:
    """Start a server (detached; it exits at once if another one holds the lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        env = {k: v for k, v in os.environ.items() if k != "PYKATA_TIMING_FILE"}
        return subprocess.Popen(server_argv(address), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, cwd="/", env=env)
    except OSError:
        return None


def _lock_held(path: Path) -> bool:
    """Whether a server holds <path>.lock (it is alive, importing or serving)."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def stop(runtime_dir: str, address: str, timeout: float = 5.0) -> int | None:
    """End the server of this containerd (the pods' shims it forked live on); its pid, or None when
    there was none. For tests and benchmarks that tear their containerd down. Never raises."""
    conn = _connect(server_path(runtime_dir, address))
    if conn is None:
        return None
    with conn:
        pid: int = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid
