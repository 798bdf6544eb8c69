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
Usually `start` never gets that far: the console script hands the whole `start` (and `delete`) to
the server over a second socket (pykata.shim.handoff), and a child of the server runs it and becomes
the pod's shim. When there is no server, `start` launches one (`containerd-shim-pykata-v2 -address A
fork-server`, detached) and waits for it; whenever anything fails, `start` forks the shim itself.
A pod's shim that refills the warm pool asks the server for the waiting shims too
(pykata.shim.forkclient.fork_pool_entry): each forked child enters a mount namespace of its own and
waits in the pool (pykata.shim.pooled) without redoing the imports (~0.35 CPU s each).

The server holds <socket>.lock while it lives (a second one exits at once), answers only its own
uid, refuses to fork code older than the files on disk (it exits, and the next `start` launches a
fresh one), and exits once it has had no live child for IDLE_EXIT seconds or its containerd's socket
is gone. Its children are their own sessions: killing the server leaves the pods' shims running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from pykata.errors import PykataError
from pykata.fsutil import read_all
from pykata.shim import bootstrap, handoff
from pykata.shim.detach import become_daemon
from pykata.shim.flags import Flags, parse_flags
from pykata.shim.forkclient import (
    FLAG_FIELDS,
    MAX_REQUEST_BYTES,
    POOL_ENTRY,
    REQUEST_TIMEOUT,
    server_path,
)
from pykata.timing import mark

IDLE_EXIT = 30.0
# Imported after the first fork (not on the first pod's path): used by some pods only (pyroute2:
# networked pods, ~8 MiB of objects each) or late in a pod's start.
# concurrent.futures.thread and email.parser: what every pod's shim still imported after its fork
# (asyncio.to_thread's executor; importlib.metadata reading a package's metadata).
_LATE_IMPORTS = ("pyroute2", "pykata.guestimage.kernel", "pykata.guestimage.rootfs", "pykata.shim.pooled",
                 "concurrent.futures.thread", "email.parser")
# pykata.factory.pool.ENTRY_ID (not imported at module level: `start`'s server child is lean)
_ENTRY_ID = re.compile(r"pool-[0-9a-f]{12}")
CLONE_NEWNS = 0x00020000


def serve(flags: Flags) -> None:
    """Run the fork server of `flags.address` until it is idle (see the module's docstring). Never returns."""
    code = 0
    try:
        from pykata.config import load_config

        runtime = load_config().runtime
        if runtime.shim_mem_merge:
            _offer_to_ksm()
        code = _serve(runtime.runtime_dir, flags.address)
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
    files = _module_files()
    sources = _source_stamp(files)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}.new")
    os.chmod(f"{path}.new", 0o600)
    listener.listen(64)
    os.rename(f"{path}.new", path)  # connectable only once listening
    ours = os.stat(path).st_ino
    starts = _start_listener(address)
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
            waiting = [listener.fileno(), wake_r] + ([starts.fileno()] if starts is not None else [])
            ready, _, _ = select.select(waiting, [], [], 1.0)
            with contextlib.suppress(OSError):
                os.read(wake_r, 512)
            _reap(children)
            for sock in (listener, starts):
                if sock is None or sock.fileno() not in ready:
                    continue
                conn, _ = sock.accept()
                with conn:
                    if _source_stamp(files) != sources:
                        why = "the installed code changed since this server started"
                        if sock is listener:
                            _answer(conn, ok=False, error=why)
                        else:
                            _answer_handoff(conn, b"decline", why)
                        return 0
                    listeners = [s for s in (listener, starts) if s is not None]
                    if sock is listener:
                        pid = _handle(conn, listeners, (wake_r, wake_w, lock))
                    else:
                        pid = _handle_handoff(conn, listeners, (wake_r, wake_w, lock))
                if pid is not None:
                    children.add(pid)
            if children and not late_done:
                late_done = True
                _import_late()
                files = _module_files()
                sources = _source_stamp(files)
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
        if starts is not None:
            _stop_listener(starts, address)
    return 0


def _offer_to_ksm() -> None:
    """runtime.shim_mem_merge: this server and every shim it forks offer their pages to the host's KSM.
    The shims' private copies of this server's pages differ from it (reference counts, the
    interpreter's warm-up counters) but mostly not from each other, so ksmd keeps one of each."""
    from pykata.hypervisor import ksm

    with contextlib.suppress(OSError):  # a kernel before 6.4: the shims run unmerged, as with false
        ksm.merge_this_process()


_handoff_lock = -1  # the flock on the handoff socket's name this server holds (closed in its children)


def _start_listener(address: str) -> socket.socket | None:
    """The socket of handed-over `start` and `delete` commands (pykata.shim.handoff), or None when
    another server of this installation and containerd holds its name (they are then served there, or
    run in full, a full `start` using this server's other socket). The name is a file in root's
    handoff.HANDOFF_DIR (0700), held by an flock beside it: a socket file a dead server left is
    replaced."""
    global _handoff_lock
    path = os.fsdecode(handoff.socket_name(address))
    lock = -1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(handoff.HANDOFF_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(handoff.HANDOFF_DIR)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise OSError(errno.EPERM, f"{handoff.HANDOFF_DIR} is not a directory only this user can open")
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(lock).st_ino != os.stat(f"{path}.lock").st_ino:  # removed by a server that just ended
            raise OSError(errno.EAGAIN, "the lock was replaced")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s.bind(path)
        s.listen(64)
    except OSError:
        s.close()
        if lock >= 0:
            os.close(lock)
        return None
    _handoff_lock = lock
    return s


def _stop_listener(starts: socket.socket, address: str) -> None:
    """Close the handoff socket and remove its name and lock file (still ours: we hold the lock)."""
    global _handoff_lock
    path = os.fsdecode(handoff.socket_name(address))
    for name in (path, f"{path}.lock"):
        with contextlib.suppress(OSError):
            os.unlink(name)
    starts.close()
    if _handoff_lock >= 0:
        os.close(_handoff_lock)
        _handoff_lock = -1


def _freeze() -> None:
    gc.collect()
    gc.freeze()  # the collector skips these objects from now on: it never dirties their pages


def _import_late() -> None:
    import importlib

    for name in _LATE_IMPORTS:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    _freeze()


def _module_files() -> tuple[bytes, ...]:
    """The files of the pykata modules this process has imported, as copies: _source_stamp runs at every
    request, and going through sys.modules (or the modules' own path strings) there would write the
    reference counts of ~600 module objects each time, so each shim forked before would keep private
    copies of those pages instead of sharing them with this process."""
    out = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.startswith("pykata") and isinstance(file, str):
            out.append(os.fsencode(file))
    return tuple(sorted(out))


def _source_stamp(files: tuple[bytes, ...]) -> tuple[int, ...]:
    """The modification times of `files` (0 for one that is gone)."""
    out = []
    for file in files:
        try:
            out.append(os.stat(file).st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)


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


def _handle(conn: socket.socket, listeners: list[socket.socket], server_fds: tuple[int, int, int]) -> int | None:
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
        data += read_all(conn, MAX_REQUEST_BYTES - len(data))
        request = json.loads(data)
        pool_entry = isinstance(request, dict) and request.get("kind") == POOL_ENTRY
        why = _check_pool_entry(request, fds) if pool_entry else _check(request, fds)
    except (OSError, ValueError) as e:
        why = f"unreadable request: {e}"
    if why is not None:
        for f in fds:
            os.close(f)
        _answer(conn, ok=False, error=why)
        return None
    child = os.fork()
    if child == 0:
        if pool_entry:
            _become_pool_entry(request, [*listeners, conn], server_fds)  # never returns
        _become_shim(request, fds[0], [*listeners, conn], server_fds)  # never returns
    if not pool_entry:
        os.close(fds[0])
    _answer(conn, ok=True, pid=child)
    return child


def _answer_handoff(conn: socket.socket, kind: bytes, message: str, out: bytes = b"") -> None:
    """Answer a handed-over command: `kind` (ok, error, decline), its stdout, its stderr or error."""
    with contextlib.suppress(OSError):
        conn.sendall(handoff.pack([kind, out, message.encode()]))


def _handle_handoff(conn: socket.socket, sockets: list[socket.socket], server_fds: tuple[int, int, int]) -> int | None:
    """Fork a child that runs one handed-over `start` or `delete` (_run_handoff); its pid, or None (another
    user's request)."""
    _pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.geteuid():
        _answer_handoff(conn, b"decline", f"uid {uid} may not ask for shims")
        return None
    child = os.fork()
    if child == 0:
        _run_handoff(conn, sockets, server_fds)  # never returns
    return child


def _run_handoff(conn: socket.socket, sockets: list[socket.socket], server_fds: tuple[int, ...]) -> NoReturn:
    """In a child of the server: read one request (pykata.shim.handoff), run its `start` or `delete`,
    answer; when a `start`'s pod needs a new shim, become it. Never returns."""
    code = 1
    try:
        _leave_server(sockets, server_fds)
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            data = read_all(conn, MAX_REQUEST_BYTES + handoff.MAX_OPTIONS_BYTES)
            argv_b, env_b, cwd_b, options = handoff.unpack(data, 4)
            argv = argv_b.decode().split("\0")
            env = dict(item.split("=", 1) for item in env_b.decode().split("\0") if "=" in item)
            os.chdir(cwd_b.decode())
            flags = parse_flags(argv[2:])
            if flags.action not in ("start", "delete"):
                raise ValueError(f"action {flags.action!r}")
        except (OSError, ValueError, PykataError) as e:  # nothing done yet: the client runs the full `start`
            _answer_handoff(conn, b"decline", f"unreadable request: {e}")
            os._exit(1)
        from setproctitle import setproctitle

        # what ps shows: containerd's command line for this pod's shim, set before the environment is
        # replaced (setproctitle finds the space it rewrites from the process's initial environment)
        setproctitle(" ".join(argv))
        os.environ.clear()
        os.environ.update(env)
        mark(f"{flags.action}.forked")
        mark(f"{flags.action}.id@{flags.id}")
        if flags.action == "delete":
            _run_delete(conn, flags)  # never returns
        try:
            address, new = bootstrap.start_in_fork_server(flags, options)
        except bootstrap.NotHere as e:
            _answer_handoff(conn, b"decline", str(e))
            os._exit(0)
        except PykataError as e:
            _answer_handoff(conn, b"error", str(e))
            os._exit(1)
        except Exception as e:  # the full `start` would fail the same way: report it, do not retry it
            _answer_handoff(conn, b"error", f"start failed: {type(e).__name__}: {e}")
            os._exit(1)
        if new is None:  # the pod's shim runs already, or a pooled shim took the pod
            _answer_handoff(conn, b"ok", "", address.encode())
            os._exit(0)
        _answer_handoff(conn, b"ok", "", address.encode())
        conn.close()
        flags.action = "start"
        become_daemon(flags, new.listener, new.bundle, new.sandbox_id, new.path)
    finally:
        os._exit(code)


def _run_delete(conn: socket.socket, flags: Flags) -> NoReturn:
    """`delete` in a child of the server: its DeleteResponse and what it said on stderr go back."""
    import io

    err = io.StringIO()
    sys.stderr = err
    try:
        out = bootstrap.delete(flags)
    except PykataError as e:
        _answer_handoff(conn, b"error", str(e))
        os._exit(1)
    except Exception as e:  # as the full `delete` would: report it, do not retry it
        _answer_handoff(conn, b"error", f"delete failed: {type(e).__name__}: {e}")
        os._exit(1)
    _answer_handoff(conn, b"ok", err.getvalue(), out)
    os._exit(0)


def _leave_server(sockets: list[socket.socket], server_fds: tuple[int, ...]) -> None:
    """In a forked child: drop the server's signal handling, sockets and descriptors."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    for s in sockets:
        s.close()
    for fd in (*server_fds, _handoff_lock):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


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
    if not isinstance(flags, dict) or not all(isinstance(flags.get(k, ""), str) for k in FLAG_FIELDS):
        return "bad request: flags"
    argv = request.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or len(argv) > 64:
        return "bad request: argv"
    return None


def _check_pool_entry(request: dict[str, Any], fds: list[int]) -> str | None:
    """Why a request for a waiting shim of the pool cannot be served, or None."""
    if fds:
        return "a pool entry's request carries no socket"
    if not isinstance(request.get("entry"), str) or not _ENTRY_ID.fullmatch(request["entry"]):
        return "bad request: entry"
    if not isinstance(request.get("address"), str):
        return "bad request: address"
    env = request.get("env")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        return "bad request: env"
    return None


def _become_pool_entry(request: dict[str, Any], sockets: list[socket.socket], server_fds: tuple[int, ...]) -> None:
    """In the forked child: drop the server's state, enter a mount namespace of its own (as `unshare
    --mount --propagation slave` gives a fresh waiting shim: its mounts never reach the host's table;
    it exits if it cannot) and wait in the pool as pykata.shim.pooled. Never returns."""
    try:
        _leave_server(sockets, server_fds)
        from pykata.resources import mountapi

        if mountapi.libc.unshare(CLONE_NEWNS) != 0:
            os._exit(1)
        mountapi.mount(None, "/", None, mountapi.MS_REC | mountapi.MS_SLAVE)
        from setproctitle import setproctitle

        from pykata.factory.pool import ENTRY_ENV, entry_argv

        setproctitle(" ".join(entry_argv()))
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[ENTRY_ENV] = request["entry"]
        os.chdir("/")
        from pykata.shim.pooled import main as wait_in_pool

        wait_in_pool(Flags(address=request["address"], action=POOL_ENTRY))
    finally:
        os._exit(1)


def _become_shim(request: dict[str, Any], listen_fd: int, sockets: list[socket.socket],
                 server_fds: tuple[int, ...]) -> None:
    """In the forked child: drop the server's state and become the pod's shim. Never returns."""
    try:
        _leave_server(sockets, server_fds)
        from setproctitle import setproctitle

        # what ps shows: containerd's command line for this pod's shim, not the server's
        setproctitle(" ".join(request["argv"]))
        os.environ.clear()
        os.environ.update(request["env"])
        given = request["flags"]
        flags = Flags(namespace=given.get("namespace", ""), address=given.get("address", ""),
                      publish_binary=given.get("publish_binary", ""), id=given.get("id", ""),
                      bundle=given.get("bundle", ""), debug=bool(given.get("debug")), action="start")
        become_daemon(flags, socket.socket(fileno=listen_fd), Path(request["bundle"]), request["sandbox_id"],
                      Path(request["socket"]))
    finally:
        os._exit(1)
