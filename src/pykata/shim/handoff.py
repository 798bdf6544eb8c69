"""`start` and `delete` handed to the shims' fork server: the common case of containerd's `shim start`
without the imports and configuration parsing of a full `start` (pykata.shim.bootstrap).

containerd runs `containerd-shim-pykata-v2 start` once per container (three times for a 2-container
pod) and waits for its answer. A full `start` imports the configuration code, parses the TOML file,
and only then asks the fork server (pykata.shim.forkserver) to fork the pod's shim. The fork server
has all of that imported already, so this module only forwards the request: the process's command
line, environment, working directory (the bundle) and runtime options (stdin) go to the server over a
unix socket in HANDOFF_DIR (root's, 0700) named after this installation and containerd's address; the
server forks a child that runs the whole `start` there (bootstrap.start_in_fork_server) and, when the
pod needs a new shim, becomes that shim itself. This process prints what it answered.

`delete` (once per task, after every shim exit) goes the same way: the server's child runs it and
sends back what it printed.

When there is no server (the first pod, or `runtime.shim_fork_server = false`), or it is another
user's, or it answers that this request is not for it, `run_via_server` raises NotServed and the
caller runs the command itself (the full `start` launches a server for the next pods).

Stdlib only, and only what a bare interpreter has loaded already (no json, socket, hashlib): this
module is the whole of the common `start`. The wire format is a few length-prefixed byte strings.
"""

from __future__ import annotations

import _socket
import os
import sys

MAGIC = b"pykata-start-1"
MAX_OPTIONS_BYTES = 1 << 20  # bootstrap.MAX_OPTIONS_BYTES
MAX_FIELD_BYTES = 4 << 20
CONNECT_TIMEOUT = 2.0
# The server's child answers once the pod's socket listens (or once a pooled shim took the pod): a
# loaded host's seconds, not more. Past this the request may still be served, so this process fails
# rather than start a second shim for the same pod.
REPLY_TIMEOUT = 30.0
MAX_REPLY_BYTES = 64 << 10


class NotServed(Exception):
    """The server did not take the request (the caller runs the full `start`); the message says why."""


# Not the abstract namespace: an abstract socket has no permissions, and every process of the host's
# network namespace reaches it. A root process of a runc container with hostNetwork is uid 0 there
# too (no user namespace): it passed the uid check, and its handed-over `start` ran with the
# environment it chose (PYKATA_CONFIG naming its own file: its own QEMU "binary" run as root), or it
# bound the name first and took every pod's `start` (CVE-2020-15257, containerd's shims). A file in a
# directory only root on the host can open is out of every container's reach.
HANDOFF_DIR = "/run/pykata-handoff"


def socket_name(address: str) -> bytes:
    """The path of the fork server's socket of `start` requests for containerd `address` and this
    installation (its interpreter prefix and package directory), in HANDOFF_DIR: it depends on no
    configuration, so finding it costs no parsing; two installations or two containerds never meet."""
    try:
        # what hashlib falls back to without OpenSSL: no OpenSSL start-up (~3 ms idle) here
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover (an interpreter without the builtin module)
        from hashlib import sha256
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = str(sha256(f"{sys.prefix}\n{package}\n{address}".encode()).hexdigest())[:32]
    return f"{HANDOFF_DIR}/{digest}".encode()


def pack(fields: list[bytes]) -> bytes:
    """Length-prefixed fields (4 bytes big-endian each) after MAGIC."""
    return MAGIC + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def unpack(data: bytes, count: int) -> list[bytes]:
    """The `count` fields of a `pack`ed message; raises ValueError when it is not one."""
    if not data.startswith(MAGIC):
        raise ValueError("not a start request")
    fields, i = [], len(MAGIC)
    for _ in range(count):
        if i + 4 > len(data):
            raise ValueError("truncated")
        n = int.from_bytes(data[i:i + 4], "big")
        if n > MAX_FIELD_BYTES or i + 4 + n > len(data):
            raise ValueError("truncated")
        fields.append(data[i + 4:i + 4 + n])
        i += 4 + n
    if i != len(data):
        raise ValueError("trailing bytes")
    return fields


def request(argv: list[str], environ: dict[str, str], cwd: str, options: bytes) -> bytes:
    """The request: argv and environment NUL-separated (neither can hold a NUL), cwd, runtime options."""
    return pack(["\0".join(argv).encode(), "\0".join(f"{k}={v}" for k, v in environ.items()).encode(),
                 cwd.encode(), options])


def read_options() -> bytes:
    """containerd's runtime options, on `start`'s stdin (nothing from a terminal)."""
    if os.isatty(0):
        return b""
    try:
        out = b""
        while len(out) < MAX_OPTIONS_BYTES:
            chunk = os.read(0, MAX_OPTIONS_BYTES - len(out))
            if not chunk:
                break
            out += chunk
        return out
    except OSError:
        return b""


def run_via_server(address: str, argv: list[str], options: bytes) -> tuple[bytes, str]:
    """Have this installation's fork server run `start` or `delete` (the action ending `argv`) for
    containerd `address`; what it prints on stdout (`start`: the shim's address; `delete`: the
    DeleteResponse) and on stderr.

    Raises:
        NotServed: no server, another user's, or it declined (the caller runs the command itself).
        ShimStartError: the server ran the command and it failed (the message is the command's), or it
            took the request and did not answer in time.
    """
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(socket_name(address))
            creds = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        except OSError as e:
            raise NotServed(f"no fork server: {e}") from None
        if int.from_bytes(creds[4:8], sys.byteorder) != os.geteuid():
            raise NotServed("the fork server runs as another user")
        try:
            s.sendall(request(argv, dict(os.environ), os.getcwd(), options))
            s.shutdown(_socket.SHUT_WR)
        except OSError as e:
            raise NotServed(f"fork server: {e}") from None
        s.settimeout(REPLY_TIMEOUT)
        reply = b""
        try:
            while len(reply) < MAX_REPLY_BYTES:
                chunk = s.recv(MAX_REPLY_BYTES - len(reply))
                if not chunk:
                    break
                reply += chunk
        except OSError as e:
            if not reply:
                from pykata.shim.starterror import ShimStartError

                raise ShimStartError(f"the shims' fork server did not answer: {e}") from None
    finally:
        s.close()
    try:
        kind, out, err = unpack(reply, 3)
        message = err.decode()
    except (ValueError, UnicodeDecodeError):
        # no answer at all: its child died before it answered (for `start`, nothing listens for the
        # pod: the full `start` removes a socket nobody answers and makes its own)
        raise NotServed("the fork server's child gave no answer") from None
    if kind == b"ok":
        return out, message
    if kind == b"error":
        from pykata.shim.starterror import ShimStartError

        raise ShimStartError(message)
    raise NotServed(message)
