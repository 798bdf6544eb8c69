"""The short-lived commands containerd runs: `start` (spawn or reuse the long-lived shim) and
`delete` (clean up after a shim that is gone).

`start` (cwd = the bundle, stdin = runtime options, output = the shim's address, nothing else):
- A container of an existing pod (CRI annotation io.kubernetes.cri.container-type=container with
  io.kubernetes.cri.sandbox-id, or CRI-O's ContainerType/SandboxID) goes to its sandbox's shim.
- The socket name is a hash of containerd's address, the namespace and the sandbox id, so a second
  `start` for the same sandbox finds the same socket. The listening socket is made here and handed
  to the daemon (a forked child in a new session), so containerd's first connection waits in the
  backlog instead of failing.

`delete` (containerd runs it after every shim disconnect, with a 5 s limit): asks a live shim to
shut down if it has nothing left, and when the shim is dead removes what it left: the VM (QEMU,
virtiofsd), mounts, sandbox directory, socket. It prints a DeleteResponse (status 137, as runc's).
It gets no runtime options, so it works under the configuration `start` recorded in the bundle
(pykata.shim.configrecord), and loads it only when the dead shim may have left something.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from pykata.errors import InvalidArgument
from pykata.ids import check_id
from pykata.shim.configrecord import (
    POD_CONFIG_ANNOTATION,
    RECORD_NAME,
    load_for_delete,
    may_have_leftovers,
    read_record,
    write_record,
)
from pykata.shim.criannotations import CRI_CONTAINER_TYPE, CRI_SANDBOX_ID, CRIO_CONTAINER_TYPE, CRIO_SANDBOX_ID
from pykata.shim.flags import Flags
from pykata.shim.starterror import ShimStartError
from pykata.timing import mark

# `delete` runs at every task teardown, and most of its time is imports: socket, hashlib (OpenSSL),
# tempfile (fsutil) and typing are imported where they are used, not here
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

    from pykata.config import Config

SHIM_NAME = "containerd-shim-pykata-v2"  # also pykata.factory.pool.SHIM_EXECUTABLE
MAX_OPTIONS_BYTES = 1 << 20
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"  # containerd's pkg/runtimeoptions/v1 (Kata's ConfigPath)
MAX_SOCKET_PATH = 107
DELETED_STATUS = 128 + 9
EXIT_WAIT = 4.0  # containerd gives `delete` 5 s
SHUTDOWN_CONNECT_TIMEOUT = 1.0
SHUTDOWN_TIMEOUT = 2.0


def read_annotations(bundle: Path) -> dict[str, str]:
    """The annotations of <bundle>/config.json ({} when there is none or it is unreadable)."""
    try:
        spec = json.loads((bundle / "config.json").read_bytes()[: 16 << 20])
    except (OSError, ValueError):
        return {}
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def _netns_of(bundle: Path) -> str | None:
    """The network namespace the pod joins (CRI/CNI), or None: which kind of pooled VM can serve it
    (factory.pool_nics). The rule of pykata.network.spec_netns, which this short-lived process does not
    import (half a second of imports)."""
    try:
        spec = json.loads((bundle / "config.json").read_bytes()[: 16 << 20])
        for ns in spec["linux"]["namespaces"]:
            if isinstance(ns, dict) and ns.get("type") == "network":
                path = ns.get("path")
                return path if isinstance(path, str) and path.startswith("/") else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def sandbox_id_of(container_id: str, annotations: dict[str, str]) -> str:
    """The sandbox (shim) a container belongs to: its pod's for a CRI container, else its own id.

    Raises InvalidArgument naming the annotation when it is not an id: it comes from the pod spec, and
    `delete` joins it into paths under the runtime directory (`../..` would leave it).
    """
    for kind, key in ((CRI_CONTAINER_TYPE, CRI_SANDBOX_ID), (CRIO_CONTAINER_TYPE, CRIO_SANDBOX_ID)):
        if annotations.get(kind) == "container" and annotations.get(key):
            return check_id(key, annotations[key])
    return container_id


def socket_path(runtime_dir: str, address: str, namespace: str, sandbox_id: str) -> Path:
    import hashlib

    digest = hashlib.sha256(f"{address}/{namespace}/{sandbox_id}".encode()).hexdigest()
    base = Path(runtime_dir) / "s"
    path = base / digest
    if len(str(path)) > MAX_SOCKET_PATH:
        path = base / digest[: max(16, MAX_SOCKET_PATH - len(str(base)) - 1)]
    if len(str(path)) > MAX_SOCKET_PATH:
        raise ShimStartError(f"runtime_dir {runtime_dir!r} is too long for a unix socket path")
    return path


def _connectable(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _runtime_options(data: bytes) -> str | None:
    """config_path from containerd's runtime options (runtimeoptions.v1.Options in an Any), if any.

    Decoded by hand (protobuf_fields): importing protobuf and the generated messages cost every
    `start` 0.07-0.13 s, and containerd runs `start` once per container of a pod."""
    if not data:
        return None
    outer = protobuf_fields(data)
    inner = protobuf_fields(outer.get(2, b"")) if outer is not None else None
    if outer is None or inner is None:
        return None
    try:  # strings are UTF-8, or the message is not one (as protobuf refuses it)
        if outer.get(1, b"").decode().rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
            return None  # options for another runtime type: not ours to interpret
        inner.get(1, b"").decode()
        return inner.get(2, b"").decode() or None
    except UnicodeDecodeError:
        return None


def protobuf_fields(data: bytes) -> dict[int, bytes] | None:
    """The length-delimited fields of a serialized protobuf message by number (the last of a
    repeated number, as protobuf keeps for a singular field); other wire types are skipped. None
    when `data` is not a well-formed message."""
    fields: dict[int, bytes] = {}
    i = 0
    try:
        while i < len(data):
            key, i = _read_varint(data, i)
            number, wire = key >> 3, key & 7
            if number == 0:
                return None
            if wire == 0:
                _, i = _read_varint(data, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length, i = _read_varint(data, i)
                if i + length > len(data):
                    return None
                fields[number] = data[i:i + length]
                i += length
            else:
                return None
    except IndexError:
        return None
    return fields if i == len(data) else None


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    """A varint at `data[i:]` and the index after it. Raises IndexError when it runs past the end
    or past 10 bytes."""
    value = shift = 0
    for _ in range(10):
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    raise IndexError("varint longer than 10 bytes")


class NewShim:
    """What a child of the fork server needs to become the pod's new shim (start_in_fork_server)."""

    __slots__ = ("bundle", "listener", "path", "sandbox_id")

    def __init__(self, listener: socket.socket, bundle: Path, sandbox_id: str, path: Path) -> None:
        self.listener = listener
        self.bundle = bundle
        self.sandbox_id = sandbox_id
        self.path = path


class NotHere(Exception):
    """start_in_fork_server: this request is not for a child of the fork server (the configuration it
    names has `runtime.shim_fork_server = false`); nothing was changed."""


def start(flags: Flags, options: bytes | None = None) -> str:
    """Spawn the long-lived shim (or find the sandbox's) and return its address. `options` are
    containerd's runtime options (read from stdin when None). Raises ShimStartError."""
    address, new = _start(flags, options, here=False)
    assert new is None
    return address


def start_in_fork_server(flags: Flags, options: bytes) -> tuple[str, NewShim | None]:
    """`start`, run in a child of the shims' fork server (pykata.shim.handoff): the shim's address, and
    when the pod needs a new shim, what this process needs to become it (its pid is already in the
    bundle). Raises ShimStartError, or NotHere before it changed anything."""
    return _start(flags, options, here=True)


def _start(flags: Flags, options: bytes | None, here: bool) -> tuple[str, NewShim | None]:
    import socket

    if not flags.id or not flags.namespace:
        raise ShimStartError("start needs -id and -namespace")
    if options is None:
        options = sys.stdin.buffer.read(MAX_OPTIONS_BYTES) if not sys.stdin.isatty() else b""
    config_path = _runtime_options(options)
    if config_path:
        os.environ["PYKATA_CONFIG"] = config_path
    from pykata.config import load_config

    config = load_config()
    if here and not config.runtime.shim_fork_server:
        raise NotHere("runtime.shim_fork_server = false")
    bundle = Path.cwd()
    try:
        write_record(bundle, config)  # for `delete`, which containerd gives no runtime options
    except OSError as e:
        raise ShimStartError(f"cannot write {bundle / RECORD_NAME}: {e.strerror or e}") from None
    sandbox_id = sandbox_id_of(flags.id, read_annotations(bundle))
    path = socket_path(config.runtime.runtime_dir, flags.address, flags.namespace, sandbox_id)
    address = f"unix://{path}"
    if path.exists():
        if _connectable(path):
            _write_bundle_file(bundle, "address", address)
            return address, None
        path.unlink(missing_ok=True)  # a dead shim's socket
    if sandbox_id != flags.id:
        raise ShimStartError(f"container {flags.id}: its sandbox {sandbox_id} has no running shim")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(128)
    except OSError as e:
        listener.close()
        raise ShimStartError(f"cannot listen on {path}: {e}") from None
    netns = _netns_of(bundle) if config.factory.pool_size > 0 else None
    if config.factory.pool_size > 0 and (netns is not None) == (config.factory.pool_nics == 1):
        mark("start.claim")
        pid = _claim_pooled(config, flags, bundle, sandbox_id, path, listener, netns)
        mark("start.claimed" if pid is not None else "start.unclaimed")
        if pid is not None:
            listener.close()
            _write_bundle_file(bundle, "shim.pid", str(pid))
            _write_bundle_file(bundle, "address", address)
            return address, None
    if here:  # this process becomes the shim
        _write_bundle_file(bundle, "shim.pid", str(os.getpid()))
        _write_bundle_file(bundle, "address", address)
        return address, NewShim(listener, bundle, sandbox_id, path)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = None
    if config.runtime.shim_fork_server:
        from pykata.shim.forkclient import fork_shim

        pid = fork_shim(config.runtime.runtime_dir, flags, bundle, sandbox_id, path, listener)
    if pid is None:
        from pykata.shim.detach import become_daemon

        pid = os.fork()
        if pid == 0:
            become_daemon(flags, listener, bundle, sandbox_id, path)  # never returns
    listener.close()
    _write_bundle_file(bundle, "shim.pid", str(pid))
    _write_bundle_file(bundle, "address", address)
    return address, None


def _claim_pooled(config: Config, flags: Flags, bundle: Path, sandbox_id: str, path: Path,
                  listener: socket.socket, netns: str | None) -> int | None:
    """Hand the pod to a waiting shim of the warm pool (pykata.factory.pool); its pid, or None when
    none took it (the pool is then refilled in the background, and this pod's shim is forked).

    The pod's network namespace goes along as an fd, opened here in containerd's mount namespace:
    the waiting shim lives in a mount namespace made before the pod's namespace was mounted."""
    from pykata.factory import pool

    message = {"flags": {"namespace": flags.namespace, "address": flags.address,
                         "publish_binary": flags.publish_binary, "id": flags.id, "bundle": flags.bundle,
                         "debug": flags.debug},
               "bundle": str(bundle), "sandbox_id": sandbox_id, "socket": str(path), "env": dict(os.environ),
               "netns": netns or ""}
    fds = [listener.fileno()]
    if netns is not None:
        try:
            fds.append(os.open(netns, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None  # the pod's Create reports it, naming the namespace
    try:
        pid = pool.claim(config, message, fds)
    finally:
        for fd in fds[1:]:
            os.close(fd)
    if pid is None:
        # forked by the shims' fork server when it runs (no imports of their own, idle priority from
        # their first instruction: factory.pool_fill_idle), else fresh processes
        from pykata.shim.forkclient import fork_pool_entry

        def forked(entry_id: str) -> int | None:
            return fork_pool_entry(config.runtime.runtime_dir, flags.address, entry_id)

        pool.fill(config, pool.entry_argv(), fork=forked if config.runtime.shim_fork_server else None)
    return pid


def _write_bundle_file(bundle: Path, name: str, value: str) -> None:
    from pykata.fsutil import atomic_write

    atomic_write(bundle / name, value, make_parents=False)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_shim(pid: int | None) -> bool:
    """Whether `pid` (the bundle's shim.pid) is still a live shim: a root process whose command line
    runs this shim (is_shim_cmdline), not a zombie. A pid reused by any other process is not, even
    one whose arguments name the shim (`grep containerd-shim-pykata-v2`)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        st = Path(f"/proc/{pid}/stat").read_text()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return uid == os.getuid() and is_shim_cmdline(cmdline) and st.rsplit(")", 1)[-1].split()[0] != "Z"


def is_shim_cmdline(cmdline: bytes) -> bool:
    """Whether a /proc/<pid>/cmdline runs the shim: its program is the shim (argv[0]), or a Python
    interpreter whose script is (argv[1]). A shim forked by the fork server named itself with
    setproctitle (one string, arguments joined by spaces, NUL padding): split at spaces then."""
    argv = [a for a in cmdline.split(b"\0") if a]
    if len(argv) == 1:
        argv = argv[0].split()
    name = SHIM_NAME.encode()

    def base(arg: bytes) -> bytes:
        return arg.rsplit(b"/", 1)[-1]

    if argv and base(argv[0]) == name:
        return True
    return len(argv) > 1 and base(argv[0]).startswith(b"python") and base(argv[1]) == name


def _shutdown(path: Path, container_id: str) -> None:
    """Ask a live shim to end if it has no containers left (Shutdown is a no-op otherwise).

    One ttrpc call framed by hand (shutdown_request) over a blocking socket, waiting for the answer
    but not reading it (any answer, or none, leaves the same thing to do): the ttrpc client, asyncio
    and the generated messages would cost this command 0.1-0.15 s of imports, paid once per task in
    every pod's teardown (containerd waits for each `delete` before it deletes the next task)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SHUTDOWN_CONNECT_TIMEOUT)
        try:
            s.connect(str(path))
            s.settimeout(SHUTDOWN_TIMEOUT)
            s.sendall(shutdown_request(container_id, SHUTDOWN_TIMEOUT))
            header = _recv_exactly(s, 10)
            length = int.from_bytes(header[:4], "big")
            _recv_exactly(s, min(length, 1 << 16))  # our own shim's answer: a status, a few bytes
        except (OSError, EOFError):
            pass


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    """`n` bytes from socket `s`; raises EOFError when the peer hangs up first, OSError on timeout."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("the shim hung up")
        data += chunk
    return data


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + _varint(len(data)) + data


def shutdown_request(container_id: str, timeout: float) -> bytes:
    """The ttrpc frame (stream 1) of containerd.task.v2.Task/Shutdown{id}, serialized by hand as
    delete_response is; tests/shim/test_shim_units.py checks it against the ttrpc client's own."""
    payload = _field(1, container_id.encode()) if container_id else b""
    request = (_field(1, b"containerd.task.v2.Task") + _field(2, b"Shutdown")
               + (_field(3, payload) if payload else b"") + b"\x20" + _varint(math.ceil(timeout * 1e9)))
    return len(request).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01\x00" + request


def delete(flags: Flags) -> bytes:
    """Clean up after the shim of `flags.id`; returns the serialized DeleteResponse to print."""
    if not flags.id:
        raise ShimStartError("delete needs -id")
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    annotations = read_annotations(bundle)
    shim_pid = _read_int(bundle / "shim.pid")
    init_pid = _read_int(bundle / "init.pid") or 0
    try:
        sandbox_id = sandbox_id_of(flags.id, annotations)
    except InvalidArgument as e:  # `start` refused it: no shim ever ran for it, so nothing to remove
        print(f"{SHIM_NAME} delete: {e}", file=sys.stderr)
        return _delete_response(init_pid)
    # the configuration the shim ran with (containerd gives `delete` no runtime options), loaded only
    # when there is something to remove: after an orderly exit there is not, and loading it is most
    # of this command's own work
    record, why = read_record(bundle)
    try:
        sock = Path((bundle / "address").read_text().strip().removeprefix("unix://"))
    except OSError:
        if record is not None:
            runtime_dir = record.runtime_dir
        else:
            # the socket is in the node's runtime_dir, whatever configuration the pod named
            runtime_dir = load_for_delete(bundle, record, why, {}).runtime.runtime_dir
        sock = socket_path(runtime_dir, flags.address, flags.namespace, sandbox_id)
    alive = _is_shim(shim_pid)
    if alive and sock.exists():
        _shutdown(sock, flags.id)  # a no-op while the shim still serves containers (a pod's)
    if alive and not sock.exists():
        # the shim is on its way out (it removes its socket first): containerd's task delete
        # returns once this command has, so a caller that sees the task gone sees the VM gone
        alive = not _wait_exit(shim_pid, EXIT_WAIT)
        mark("delete.shim.gone")
    if not alive:
        if record is not None:
            _kill_vm_first(Path(record.runtime_dir) / "sandboxes" / sandbox_id, shim_pid)
        # a pod's own configuration (io.katacontainers.config_path) may put its sandbox elsewhere
        if record is None or POD_CONFIG_ANNOTATION in annotations or may_have_leftovers(record, sandbox_id):
            _remove_leftovers(load_for_delete(bundle, record, why, annotations), sandbox_id, shim_pid)
            mark("delete.leftovers.removed")
        if sock.exists() and not _connectable(sock):
            sock.unlink(missing_ok=True)
    return _delete_response(init_pid)


def _kill_vm_first(directory: Path, shim_pid: int | None) -> None:
    """SIGKILL what the dead shim's VM runs (QEMU, virtiofsd, the 9p helper: the processes recorded in
    the sandbox's VM directory) before any slow step. containerd kills `delete` after 5 s and runs it
    once per task; on a loaded host the configuration's load and the cleanup's imports could use those
    5 s, and the VM then ran on with nothing left to end it (seen in bench/churn.py with virtio-fs pods
    whose shim was killed at load 15). Never waits, never raises; the full cleanup follows."""
    from pykata.hypervisor import owned
    from pykata.sandbox import state

    try:
        if not directory.is_dir():
            return
        sandbox = state.load(directory)
    except (OSError, ValueError):
        return
    # the same id may be another namespace's sandbox, with a live owner: only the dead shim's own
    if sandbox is not None and sandbox.owner_pid != shim_pid and sandbox.owner_alive():
        return
    owned.kill_recorded(directory / state.VM_DIR, timeout=0)


def _wait_exit(pid: int | None, timeout: float) -> bool:
    """Whether the shim `pid` is gone within `timeout` seconds. Woken by the shim's exit (a pidfd
    becomes readable then), not by polling: containerd waits for this command at every task's teardown."""
    import select
    import time

    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid) if pid else -1
    except OSError:  # gone already (ESRCH), or a kernel without pidfds: poll
        pidfd = -1
    try:
        while _is_shim(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd >= 0:
                if select.select([pidfd], [], [], left)[0]:
                    return True  # that very process ended (a pidfd is never another process's)
            else:
                time.sleep(min(left, 0.02))
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _remove_leftovers(config: Config, sandbox_id: str, shim_pid: int | None) -> None:
    """What a dead shim left: its sandbox directory (and the VM it names), then its cgroups."""
    from pykata.resources import cgroups

    directory = Path(config.runtime.runtime_dir) / "sandboxes" / sandbox_id
    if directory.exists():
        # only here: after an orderly exit the shim removed the directory itself
        from pykata.sandbox import state
        from pykata.sandbox.reaper import remove_sandbox_dir

        record = state.load(directory)
        # only the dead shim's own sandbox: the same id may be another namespace's, with a live owner
        if record is not None and record.owner_pid != shim_pid and record.owner_alive():
            return
        remove_sandbox_dir(directory, record)
    cgroups.remove_leftover(config.runtime, sandbox_id)
    if config.factory.pool_size > 0:
        # a shim claimed from the warm pool that died before its sandbox had an id: its pool directory
        from pykata.factory import pool

        pool.prune(config)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def delete_response(pid: int, exit_status: int, at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid, exit_status, exited_at}, serialized by hand: importing
    the generated containerd messages (compiling their descriptors) would cost every `delete` more
    than all its own work. tests/shim/test_shim_units.py checks the bytes against protobuf's."""
    seconds, nanos = divmod(at_ns, 1_000_000_000)
    stamp = (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")
    return ((b"\x08" + _varint(pid) if pid else b"") + (b"\x10" + _varint(exit_status) if exit_status else b"")
            + b"\x1a" + _varint(len(stamp)) + stamp)


def _delete_response(pid: int) -> bytes:
    import time

    return delete_response(pid & 0xFFFFFFFF, DELETED_STATUS, time.time_ns())
