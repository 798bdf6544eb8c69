"""ttrpc framing, sans-IO: a 10-byte header (length u32 BE, stream id u32 BE, type u8, flags u8)
followed by at most 4 MiB of data. No sockets here: feed bytes in, take frames out.
"""

from __future__ import annotations

import enum
import struct

from pykata.record import Record
from pykata.ttrpc.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE_SIZE = 4 << 20


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x1  # no more data from the sender of this frame
    REMOTE_OPEN = 0x2  # request: the sender will stream data after it
    NO_DATA = 0x4  # data frame carries no payload (only closes)


class Frame(Record):
    __slots__ = ("data", "flags", "stream_id", "type")
    __match_args__ = ("stream_id", "type", "flags", "data")

    def __init__(self, stream_id: int, type: FrameType, flags: Flags, data: bytes) -> None:
        self.stream_id = stream_id
        self.type = type
        self.flags = flags
        self.data = data


def encode_frame(stream_id: int, type_: FrameType, flags: Flags, data: bytes,
                 *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """Render one frame. Raises LocalProtocolError if the data is over `max_size` (at most 4 MiB)."""
    limit = min(max_size, MAX_MESSAGE_SIZE)
    if len(data) > limit:
        raise LocalProtocolError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    if not 0 < stream_id < 1 << 32:
        raise LocalProtocolError(f"stream id {stream_id} out of range")
    return HEADER.pack(len(data), stream_id, type_, flags) + data


def _header_problem(length: int, stream_id: int, type_: int, max_size: int = MAX_MESSAGE_SIZE) -> str | None:
    if length > max_size:
        return f"frame length {length} exceeds the {max_size}-byte limit"
    if type_ not in (1, 2, 3):
        return f"unknown frame type {type_}"
    if stream_id == 0:
        return "stream id 0 is reserved"
    return None


class FrameDecoder:
    """Accumulates bytes and yields complete frames.

    A header that cannot be valid raises RemoteProtocolError and leaves the buffer as it was, so the
    owner may either give up on the connection or call `resync()` (used on byte streams such as a
    virtio-serial port, where a new host connection can start in the middle of an old half-frame).
    `max_size` (at most the protocol's 4 MiB) caps one frame's data, so at most one frame of that
    size (plus what the last read brought) is ever buffered.
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        if not 0 < max_size <= MAX_MESSAGE_SIZE:
            raise ValueError(f"max_size must be in 1..{MAX_MESSAGE_SIZE}, not {max_size}")
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            if self._pos == len(self._buf):
                self._buf.clear()
            else:
                del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises RemoteProtocolError for a header that no valid frame can have.
        """
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return None
        length, stream_id, type_, flags = HEADER.unpack_from(self._buf, self._pos)
        problem = _header_problem(length, stream_id, type_, self.max_size)
        if problem:
            raise RemoteProtocolError(problem)
        if avail < HEADER_SIZE + length:
            return None
        start = self._pos + HEADER_SIZE
        with memoryview(self._buf) as view:  # one copy, not two
            data = bytes(view[start : start + length])
        self._pos = start + length
        return Frame(stream_id, FrameType(type_), Flags(flags), data)

    def resync(self) -> int:
        """Drop bytes up to the next position that could start a valid header; return how many.
        Nothing is dropped when the next bytes already could (the frame before was whole and only its
        content was refused). A header's length is at most 4 MiB, so its first byte is 0: the search
        jumps from one 0 byte to the next (a host's flush, pykata.ttrpc.session, has none)."""
        dropped = 0
        buf = self._buf
        while len(buf) - self._pos >= HEADER_SIZE:
            length, stream_id, type_, _ = HEADER.unpack_from(buf, self._pos)
            if _header_problem(length, stream_id, type_, self.max_size) is None:
                break
            nxt = buf.find(0, self._pos + 1)
            nxt = len(buf) if nxt < 0 else nxt
            dropped += nxt - self._pos
            self._pos = nxt
        return dropped

    def clear(self) -> None:
        self._buf.clear()
        self._pos = 0
