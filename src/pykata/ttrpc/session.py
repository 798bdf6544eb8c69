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
- the agent takes a hello only where a frame begins (its Connection decodes it as a frame:
  `parse_hello`), cancels the old session's calls, drops their answers and what it had not written
  yet, starts a fresh protocol state and writes the echo before any answer of the new session.
  The same bytes inside a frame are that frame's data: a container's stdin is written by a pod's
  exec/attach user, who must not be able to end the host's session or speak in a new one (agent
  protocol 8 at first searched the whole input, payloads included, for a hello);
- a host cut off in the middle of a frame leaves half of it in the port, and that frame would take
  the next host's hello as its data: a host that got no echo reconnects with a flush before its
  hello (`flush_bytes`, Agent.connect), which completes any such frame and leaves the agent's parser
  at the hello.

The hello is a ttrpc REQUEST on stream 0xFFFFFFFF for a method named after the nonce, so an agent
that predates sessions (agent protocol < 8) answers it UNIMPLEMENTED with the nonce in its message:
the host recognises that answer (`EchoHunter` returns OLD_AGENT) and refuses the agent clearly.
"""

from __future__ import annotations

import enum
import os

from google.protobuf.message import DecodeError

from pykata.ttrpc._pb import ttrpc_pb2
from pykata.ttrpc.frames import HEADER_SIZE, MAX_MESSAGE_SIZE, Flags, Frame, FrameType, encode_frame

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


def parse_hello(frame: Frame) -> bytes | None:
    """The nonce of a hello frame, or None when `frame` is anything else. The agent's Connection
    asks this of each whole frame it decodes, so a hello counts only where a frame begins: the same
    bytes inside a frame (a container's stdin in a WriteStdin request) are that frame's data."""
    if frame.stream_id != SESSION_STREAM or frame.type is not FrameType.REQUEST or len(frame.data) > 256:
        return None
    req = ttrpc_pb2.Request()
    try:
        req.ParseFromString(frame.data)
    except DecodeError:
        return None
    digits = req.method.removeprefix(_METHOD_PREFIX)
    if (req.service != SESSION_SERVICE or digits == req.method or len(digits) != 2 * NONCE_SIZE
            or not set(digits) <= _HEX):
        return None
    return bytes.fromhex(digits)


_HEX = frozenset("0123456789abcdef")
# A flush: bytes no frame header can begin with (a header's length is at most 4 MiB, so its first
# byte is 0), enough to complete the longest frame a host before us may have cut in half. The agent's
# parser takes the rest of such a frame from it, then skips what is left (FrameDecoder.resync jumps
# to the next 0 byte) and finds the hello right after it.
FLUSH_BYTE = 0xFF
FLUSH_SIZE = HEADER_SIZE + MAX_MESSAGE_SIZE
# A flush that completes any frame of at most 4 KiB: enough after a host whose frames were all that small
# (Agent.connect's own hellos and probes: under 300 bytes each). A full flush is 4 MiB, which crosses a
# virtio-serial port in seconds under TCG, over 20 s at load 30 (the guest reads it 4 KiB at a time).
SMALL_FLUSH_SIZE = HEADER_SIZE + (4 << 10)


def flush_bytes(size: int = FLUSH_SIZE) -> bytes:
    """`size` flush bytes: they complete a half frame of at most `size - HEADER_SIZE` bytes."""
    return bytes([FLUSH_BYTE]) * size


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
