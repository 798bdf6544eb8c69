"""The shims' fork server: one process per containerd (its address) and installation that has done the
long-lived shim's imports once and forks each new pod's shim from there (`runtime.shim_fork_server`).

Why: a shim's imports (protobuf descriptors, the sandbox and hypervisor stack, asyncio, psutil) are
~18 MiB of Python objects, the same in every shim. Forked from one process that imported them and
froze them for the garbage collector (gc.freeze: the collector never writes to them again), the shims
share those pages copy-on-write, and PSS divides them among the shims alive. It also takes the imports
off each pod start (the shim is ready the moment it is forked).

`start` (pykata.shim.bootstrap) connects to <runtime_dir>/s/fork-<digest>, sends a request (JSON:
containerd's flags, the bundle, the sandbox id, the socket path, the environment containerd gave
`start`) with the pod's listening socket, and reads back the new shim's pid. The server forks; the
child becomes that pod's daemon exactly as a shim forked by `start` would (setsid, log FIFO, serve).
When there is no server, `start` launches one (`containerd-shim-pykata-v2 -address A fork-server`,
detached) and waits for it; whenever anything fails, `start` forks the shim itself, as before.

The server holds <socket>.lock while it lives (a second one exits at once), answers only its own
uid, refuses to fork code older than the files on disk (it exits, and the next `start` launches a
fresh one), and exits once it has had no live child for IDLE_EXIT seconds or its containerd's socket
is gone. Its children are their own sessions: killing the server leaves the pods' shims running.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pykata.fsutil import process_alive
from pykata.shim.flags import Flags

ACTION = "fork-server"
MAX_REQUEST_BYTES = 1 << 20
REQUEST_TIMEOUT = 5.0
# How long `start` waits for a server it launched to have done its imports (a loaded host: seconds).
LAUNCH_WAIT = 20.0
IDLE_EXIT = 30.0
_FLAG_FIELDS = ("namespace", "address", "publish_binary", "id", "bundle")
# Imported after the first fork (not on the first pod's path): used by some pods only (pyroute2:
# networked pods, ~8 MiB of objects each) or late in a pod's start.
_LATE_IMPORTS = ("pyroute2", "pykata.guestimage.kernel", "pykata.guestimage.rootfs")


def server_path(runtime_dir: str, address: str) -> Path:
    """The server's socket for this containerd and this installation (two checkouts or two containerds
    sharing a runtime_dir never fork each other's shims)."""
    import pykata

    digest = hashlib.sha256(f"{sys.prefix}\n{pykata.__file__}\n{address}".encode()).hexdigest()[:24]
    return Path(runtime_dir) / "s" / f"fork-{digest}"


def server_argv(address: str) -> list[str]:
    script = Path(sys.executable).parent / "containerd-shim-pykata-v2"
    return [sys.executable, str(script), "-address", address, ACTION]


# ----- the client side: `start` -----


def fork_shim(runtime_dir: str, flags: Flags, bundle: Path, sandbox_id: str, socket_path: Path,
              listener: socket.socket) -> int | None:
    """Have the fork server fork this pod's shim (launching the server when there is none); the shim's
    pid, or None when that did not work (the caller forks the shim itself). Never raises."""
    path = server_path(runtime_dir, flags.address)
    request = {"flags": {k: getattr(flags, k) for k in _FLAG_FIELDS} | {"debug": flags.debug},
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
    with conn:
        try:
            socket.send_fds(conn, [body], [listener.fileno()])
            conn.shutdown(socket.SHUT_WR)
            reply = json.loads(_read_all(conn, 4096) or b"{}")
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


def _read_all(s: socket.socket, limit: int) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = s.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


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


# ----- the server side -----


def serve(flags: Flags) -> None:
    """Run the fork server of `flags.address` until it is idle (see the module's docstring). Never returns."""
    code = 0
    try:
        from pykata.config import load_config

        code = _serve(load_config().runtime.runtime_dir, flags.address)
    except BaseException:  # nobody reads this process's output: `start` falls back to forking itself
        code = 1
    os._exit(code)


def _serve(runtime_dir: str, address: str) -> int:
    path = server_path(runtime_dir, address)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another server is (being) started
    try:  # an installation without it (not reinstalled since): no server, `start` forks the shims
        import setproctitle  # noqa: F401  (each child names itself with it)
    except ImportError:
        return 1
    from pykata.shim import daemon  # noqa: F401  (the imports every shim shares)

    _freeze()
    sources = _source_stamp()
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}.new")
    os.chmod(f"{path}.new", 0o600)
    listener.listen(64)
    os.rename(f"{path}.new", path)  # connectable only once listening
    ours = os.stat(path).st_ino
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    ending = False

    def end(*_: object) -> None:
        nonlocal ending
        ending = True

    signal.signal(signal.SIGTERM, end)
    children: set[int] = set()
    idle_since = time.monotonic()
    late_done = False
    containerd_socket = address.removeprefix("unix://")
    try:
        while not ending:
            ready, _, _ = select.select([listener.fileno(), wake_r], [], [], 1.0)
            with contextlib.suppress(OSError):
                os.read(wake_r, 512)
            _reap(children)
            if listener.fileno() in ready:
                conn, _ = listener.accept()
                with conn:
                    if _source_stamp() != sources:
                        _answer(conn, ok=False, error="the installed code changed since this server started")
                        return 0
                    pid = _handle(conn, listener, (wake_r, wake_w, lock))
                if pid is not None:
                    children.add(pid)
                if not late_done:
                    late_done = True
                    _import_late()
                    sources = _source_stamp()
            if children:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_EXIT or (
                    containerd_socket.startswith("/") and not os.path.exists(containerd_socket)):
                return 0
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ours:  # not a successor's
                path.unlink()
        listener.close()
    return 0


def _freeze() -> None:
    gc.collect()
    gc.freeze()  # the collector skips these objects from now on: it never dirties their pages


def _import_late() -> None:
    import importlib

    for name in _LATE_IMPORTS:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    _freeze()


def _source_stamp() -> tuple[tuple[str, int], ...]:
    """The files of the pykata modules this process has imported, with their modification times."""
    out = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.startswith("pykata") and file:
            try:
                out.append((file, os.stat(file).st_mtime_ns))
            except OSError:
                out.append((file, 0))
    return tuple(sorted(out))


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


def _answer(conn: socket.socket, **reply: Any) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(reply).encode())


def _handle(conn: socket.socket, listener: socket.socket, server_fds: tuple[int, int, int]) -> int | None:
    """Read one request and fork its shim; the child's pid, or None (refused: the reply says why)."""
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        _pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():
            raise ValueError(f"uid {uid} may not ask for shims")
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 4)
    except (OSError, ValueError) as e:
        _answer(conn, ok=False, error=str(e))
        return None
    try:
        while len(data) < MAX_REQUEST_BYTES:
            more = conn.recv(MAX_REQUEST_BYTES - len(data))
            if not more:
                break
            data += more
        request = json.loads(data)
        why = _check(request, fds)
    except (OSError, ValueError) as e:
        why = f"unreadable request: {e}"
    if why is not None:
        for f in fds:
            os.close(f)
        _answer(conn, ok=False, error=why)
        return None
    child = os.fork()
    if child == 0:
        _become_shim(request, fds[0], [listener, conn], server_fds)  # never returns
    os.close(fds[0])
    _answer(conn, ok=True, pid=child)
    return child


def _check(request: Any, fds: list[int]) -> str | None:
    """Why `request` cannot be served, or None."""
    if not isinstance(request, dict) or len(fds) != 1:
        return "a request is one JSON object and one socket"
    for key in ("bundle", "sandbox_id", "socket"):
        if not isinstance(request.get(key), str) or (key != "sandbox_id" and not request[key].startswith("/")):
            return f"bad request: {key}"
    env, flags = request.get("env"), request.get("flags")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        return "bad request: env"
    if not isinstance(flags, dict) or not all(isinstance(flags.get(k, ""), str) for k in _FLAG_FIELDS):
        return "bad request: flags"
    argv = request.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or len(argv) > 64:
        return "bad request: argv"
    return None


def _become_shim(request: dict[str, Any], listen_fd: int, sockets: list[socket.socket],
                 server_fds: tuple[int, ...]) -> None:
    """In the forked child: drop the server's state and become the pod's shim. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        for s in sockets:
            s.close()
        for fd in server_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        from setproctitle import setproctitle

        # what ps shows: containerd's command line for this pod's shim, not the server's
        setproctitle(" ".join(request["argv"]))
        os.environ.clear()
        os.environ.update(request["env"])
        given = request["flags"]
        flags = Flags(namespace=given.get("namespace", ""), address=given.get("address", ""),
                      publish_binary=given.get("publish_binary", ""), id=given.get("id", ""),
                      bundle=given.get("bundle", ""), debug=bool(given.get("debug")), action="start")
        from pykata.shim.detach import become_daemon

        become_daemon(flags, socket.socket(fileno=listen_fd), Path(request["bundle"]), request["sandbox_id"],
                      Path(request["socket"]))
    finally:
        os._exit(1)
