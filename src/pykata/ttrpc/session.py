"""Host sessions on a byte stream without connection boundaries (a virtio-serial port), sans-IO.

A virtio-serial port is one byte stream for the life of the VM: when a host closes QEMU's chardev
socket and another connects, the guest sees a disconnect only if its agent reads the port while no
host is there. A host that reconnects quickly (Agent.connect after a silence, a shim or a client
that went away and came back) meets an agent still in the first host's session: requests of that
session the agent had not read yet, answers its handlers are still computing, the rest of a frame
cut in half. Those answers carry the first session's stream ids, so the new host either refused them
("server sent a RESPONSE frame on stream 7, which we never opened") or, worse, took one as the answer
to its own call on the same stream id.

So each host session starts with a hello the agent echoes:
- the host writes `hello_frame(nonce)` (16 random bytes) as its first bytes, then its requests, and
  reads nothing as ttrpc until it has seen `echo_frame(nonce)`: whatever comes before it belongs to
  an earlier session and is dropped (bounded: `EchoHunter.max_stale`);
- the agent finds the hello anywhere in its input (`find_hello`, even after half a frame of the old
  session), cancels the old session's calls, drops their answers and what it had not written yet,
  starts a fresh protocol state and writes the echo before any answer of the new session.

The hello is a ttrpc REQUEST on stream 0xFFFFFFFF for a method named after the nonce, so an agent
that predates sessions (agent protocol < 8) answers it UNIMPLEMENTED with the nonce in its message:
the host recognises that answer (`EchoHunter` returns OLD_AGENT) and refuses the agent clearly.
"""

from __future__ import annotations

import enum
import os

from pykata.ttrpc._pb import ttrpc_pb2
from pykata.ttrpc.frames import Flags, FrameType, encode_frame

SESSION_SERVICE = "pykata.session.v1.Session"
SESSION_STREAM = 0xFFFFFFFF
NONCE_SIZE = 16
_METHOD_PREFIX = "Hello."
_ECHO_TAG = b"pykata-session-echo:"
# Bytes from an earlier session a host drops while it waits for its echo: an agent has at most its
# write buffer and a few frames of answers in flight (FdWriter drops its buffer at a hello).
MAX_STALE_BYTES = 32 << 20


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def hello_frame(nonce: bytes) -> bytes:
    """The host's first bytes of a session."""
    req = ttrpc_pb2.Request(service=SESSION_SERVICE, method=_METHOD_PREFIX + nonce.hex())
    return encode_frame(SESSION_STREAM, FrameType.REQUEST, Flags.NONE, req.SerializeToString())


def echo_frame(nonce: bytes) -> bytes:
    """The agent's answer to the hello: the first bytes of the new session on its side."""
    resp = ttrpc_pb2.Response(payload=_ECHO_TAG + nonce)
    return encode_frame(SESSION_STREAM, FrameType.RESPONSE, Flags.NONE, resp.SerializeToString())


_HELLO_SIZE = len(hello_frame(bytes(NONCE_SIZE)))
# Every hello starts with these bytes (its length, stream id, type, and its request up to the nonce).
HELLO_MARKER = hello_frame(bytes(NONCE_SIZE))[:_HELLO_SIZE - 2 * NONCE_SIZE]
HELLO_SIZE = _HELLO_SIZE
_HEX = frozenset(b"0123456789abcdef")


def find_hello(buf: bytes | bytearray, start: int = 0) -> tuple[int, bytes] | None:
    """The first complete hello in `buf` at or after `start`: (its offset, its nonce), or None.
    A marker followed by anything but lower-case hex is not a hello (skipped)."""
    pos = start
    while (i := buf.find(HELLO_MARKER, pos)) >= 0:
        end = i + HELLO_SIZE
        if end > len(buf):
            return None
        digits = bytes(buf[i + len(HELLO_MARKER):end])
        if all(c in _HEX for c in digits):
            return i, bytes.fromhex(digits.decode())
        pos = i + 1
    return None


class HelloScanner:
    """The agent's side: splits its input into (bytes of the current session, hello nonce) pieces,
    finding a hello that spans two reads too."""

    def __init__(self) -> None:
        self._tail = b""  # the last HELLO_SIZE-1 bytes seen (already handed on as data)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | tuple[bytes]]:
        """Pieces in order: `bytes` are session data; `(nonce,)` is a hello (a new session)."""
        chunk = bytes(data)
        out: list[bytes | tuple[bytes]] = []
        pos = 0  # bytes of chunk handed on
        if self._tail:
            # a hello that began in the last read: only the joint is searched (no copy of the chunk)
            joint = self._tail + chunk[:HELLO_SIZE - 1]
            found = find_hello(joint)
            if found is not None and found[0] < len(self._tail):
                i, nonce = found
                out.append((nonce,))
                pos = i + HELLO_SIZE - len(self._tail)
        while (found := find_hello(chunk, pos)) is not None:
            i, nonce = found
            if i > pos:
                out.append(chunk[pos:i])
            out.append((nonce,))
            pos = i + HELLO_SIZE
        if pos < len(chunk):
            out.append(chunk[pos:] if pos else chunk)
        keep = HELLO_SIZE - 1
        if len(chunk) - pos >= keep:
            self._tail = chunk[len(chunk) - keep:]
        else:
            self._tail = (self._tail + chunk)[-keep:] if pos == 0 else chunk[pos:]
        return out


class Hunt(enum.Enum):
    WAITING = "waiting"
    FOUND = "found"
    OLD_AGENT = "old agent"
    TOO_MUCH = "too much"


class EchoHunter:
    """The host's side: drops what precedes this session's echo."""

    def __init__(self, nonce: bytes, *, max_stale: int = MAX_STALE_BYTES) -> None:
        self._echo = echo_frame(nonce)
        self._old = f"/{SESSION_SERVICE}/{_METHOD_PREFIX}{nonce.hex()}".encode()
        self._buf = b""
        self.max_stale = max_stale
        self.dropped = 0

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[Hunt, bytes]:
        """(FOUND, the bytes after the echo) once it came; OLD_AGENT when the agent answered the hello
        UNIMPLEMENTED; TOO_MUCH past `max_stale` bytes without it; else (WAITING, b"")."""
        buf = self._buf + bytes(data)
        i = buf.find(self._echo)
        if i >= 0:
            self.dropped += i
            self._buf = b""
            return Hunt.FOUND, buf[i + len(self._echo):]
        if self._old in buf:
            return Hunt.OLD_AGENT, b""
        keep = max(len(self._echo), len(self._old)) - 1
        self.dropped += max(0, len(buf) - keep)
        self._buf = buf[-keep:]
        if self.dropped > self.max_stale:
            return Hunt.TOO_MUCH, b""
        return Hunt.WAITING, b""
