"""asyncio adapters: move bytes between a transport and a sans-IO `Connection`.

`ConnectionProtocol` is an asyncio.Protocol; client and server subclass it and implement only
`handle_event` (and optionally `handle_protocol_error`). It works over a stream socket (unix, vsock)
or over a pair of pipe transports for one character device (virtio-serial port).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import select
from collections.abc import Callable

from pykata.ttrpc.connection import Connection, Event, Role
from pykata.ttrpc.errors import RemoteProtocolError
from pykata.ttrpc.frames import MAX_MESSAGE_SIZE

log = logging.getLogger("pykata.ttrpc")


class ConnectionProtocol(asyncio.Protocol):
    """Feeds received bytes to a Connection and dispatches its events; handles write flow control."""

    def __init__(self, role: Role, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.conn = Connection(role, max_message_size=max_message_size)
        self._transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # set when the transport has really let go of the socket (connection_lost), after `closed`
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_reason: BaseException | None = None
        # bytes and refused headers since the protocol error that began the garbage being skipped now
        # (None while the stream is in step): one warning when it begins, one when a frame comes again
        self._skipping: list[int] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._transport is None:
            self._transport = transport
        if self._writer is None and isinstance(transport, asyncio.WriteTransport):
            self._writer = transport

    def data_received(self, data: bytes | memoryview) -> None:
        self.conn.receive_data(data)
        self._drain_events()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self._drain_events()
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        self._finish(exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- for subclasses ----------------------------------------------------------------------------

    def handle_event(self, event: Event) -> None:
        raise NotImplementedError

    def handle_protocol_error(self, error: RemoteProtocolError) -> bool:
        """Called when the peer broke the protocol. Return True to resynchronise and go on,
        False (the default) to close the connection."""
        return False

    def on_closed(self, exc: BaseException | None) -> None:
        """Called once when the connection is finished, for whatever reason."""

    # -- helpers -----------------------------------------------------------------------------------

    def _drain_events(self) -> None:
        while not self.closed.done():
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as e:
                if self.handle_protocol_error(e):
                    self._resync(e)
                    continue
                log.warning("ttrpc: protocol error from peer, closing the connection: %s", e)
                self.abort(e)
                return
            if event is None:
                return
            if self._skipping is not None:
                log.warning("ttrpc: in step again after skipping %d bytes (%d refused headers)", *self._skipping)
                self._skipping = None
            self.handle_event(event)

    def _resync(self, error: RemoteProtocolError) -> None:
        """Skip to the next plausible frame. Logged once per run of garbage, not once per read: a host's
        flush (pykata.ttrpc.session, 4 MiB of 0xFF) arrives in as many reads as the host's VMM makes
        of it, each failing at its first header (`frame length 4294967295`), and under load a warning
        per read filled the guest's serial console (each byte an emulated UART write)."""
        dropped = self.conn.resync()
        if self._skipping is None:
            log.warning("ttrpc: %s; skipping to the next frame", error)
            self._skipping = [0, 0]
        self._skipping[0] += dropped
        self._skipping[1] += 1

    def write(self, data: bytes) -> None:
        """Queue bytes; frames are written whole, so concurrent callers never interleave."""
        if self._writer is None or self._writer.is_closing():
            raise ConnectionResetError("connection is closed")
        self._writer.write(data)

    async def drain(self) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()

    def is_closing(self) -> bool:
        return self.closed.done()

    def abort(self, reason: BaseException | None = None) -> None:
        """Close the connection now; pending work learns `reason`."""
        self._finish(reason)
        for t in {self._transport, self._writer}:
            if t is not None:
                t.close()

    def _finish(self, exc: BaseException | None) -> None:
        if self.closed.done():
            return
        self.close_reason = exc
        self.closed.set_result(None)
        self._can_write.set()
        self.on_closed(exc)


class FdWriter(asyncio.WriteTransport):
    """Write side of a character device or pipe that writes until the kernel says EAGAIN.

    asyncio's pipe transport makes one write(2) per loop iteration; a virtio-serial port takes at
    most 32 KiB per write, so a 1 MiB answer would cost 32 loop iterations, each milliseconds long
    under TCG. Here one iteration writes as much as the device accepts.
    """

    HIGH_WATER = 1 << 20
    LOW_WATER = 256 << 10

    def __init__(self, fd: int, protocol: ConnectionProtocol) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._protocol = protocol
        self._buf = bytearray()
        self._closing = False
        self._paused = False
        self._writing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise ConnectionResetError("connection is closed")
        if not self._buf and not self._writing:
            # write what the device takes now straight from `data`; only the rest is copied
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._fail(exc)
                return
            if not view:
                return
            data = view
        self._buf += data
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._buf:
                n = os.write(self._fd, self._buf)
                del self._buf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(exc)
            return
        if self._buf and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._buf and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if not self._paused and len(self._buf) > self.HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()
        elif self._paused and len(self._buf) <= self.LOW_WATER:
            self._paused = False
            self._protocol.resume_writing()

    def _fail(self, exc: Exception) -> None:
        self.close()
        self._protocol.connection_lost(exc)

    def discard_pending(self) -> None:
        """Drop what is not written yet (a new host session on a virtio-serial port: the old one's
        answers, maybe half a frame, are nobody's; its host drops anything before its echo)."""
        self._buf.clear()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._paused:
            self._paused = False
            self._protocol.resume_writing()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._buf.clear()
        os.close(self._fd)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return len(self._buf)


class FdReader(asyncio.ReadTransport):
    """Read side of a character device or pipe that reads until the kernel says EAGAIN.

    asyncio's pipe transport makes one read(2) per loop iteration, and a guest's virtio-serial port
    hands out one 4 KiB buffer per read: a 1 MiB request cost 256 loop iterations of the agent,
    each about a millisecond under TCG, which was what bounded stdin throughput. Here one
    iteration reads everything queued (up to MAX_BATCH) and feeds it to the protocol at once.
    """

    READ_SIZE = 256 << 10
    MAX_BATCH = 4 << 20  # then yield to the loop, so writers and timers get their turn

    # With peer_present, an end of file is believed once the peer was absent for this long (guest time:
    # a guest handles the control message saying a host connected within a few ms of its first bytes).
    EOF_GRACE = 0.05
    EOF_RECHECK = 0.002

    def __init__(self, fd: int, protocol: ConnectionProtocol,
                 peer_present: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._protocol = protocol
        self._closing = False
        self._reading = False
        self._peer_present = peer_present
        self._eof_since: float | None = None
        self._eof_checks = 0
        # Anonymous memory, so only the pages a read fills are ever backed: bytearray(MAX_BATCH)
        # zero-filled all 4 MiB, and in a VM cloned from a template those were 4 MiB of fresh guest
        # pages the host backs for each clone's agent (bench/pod_memory.py --guest-pages). Private
        # (mmap's default is shared: shmem, a fault path nothing else in the guest agent runs), and
        # its first page is touched now: a template is saved with the agent waiting on a reader for
        # its clone's first bytes, whose read would otherwise begin with a page fault (translated
        # afresh by TCG in each clone: ~5% of the guest code of its first answer).
        self._mem = mmap.mmap(-1, self.MAX_BATCH, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mem[0] = 0
        self._view = memoryview(self._mem)
        # Asked after a short read whether more is queued: a read that finds nothing raises
        # BlockingIOError, and making, raising and catching it is C code a template clone's TCG
        # translates afresh for its first answer (and CPU on every wakeup of the loop).
        self._more = select.poll()
        self._more.register(fd, select.POLLIN)

    def start(self) -> None:
        self._protocol.connection_made(self)
        self.resume_reading()

    def _on_readable(self) -> None:
        # straight into one buffer (readv): no bytes object per 4 KiB read and no join to copy them
        view = self._view
        size = 0
        eof = False
        asked = False
        try:
            while size < self.MAX_BATCH:
                n = os.readv(self._fd, [view[size:size + self.READ_SIZE]])
                if not n:
                    eof = True
                    break
                size += n
                if n < self.READ_SIZE and not asked:
                    # once per wakeup: a single request ends here; a stream of buffers reads on to EAGAIN
                    # (a poll per 4 KiB buffer would cost more than one exception per batch)
                    asked = True
                    if not self._more.poll(0):
                        break  # drained (an end of file or an error shows in poll too: read on then)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if size:
                self._protocol.data_received(view[:size])
            self._fail(exc)
            return
        if size:
            self._protocol.data_received(view[:size])  # the protocol copies what it keeps
            if size > self.READ_SIZE:  # a large batch: give back what a small one never uses
                self._mem.madvise(mmap.MADV_DONTNEED, self.READ_SIZE, _page_up(size) - self.READ_SIZE)
        if eof and not self._closing:
            self.pause_reading()
            if self._peer_present is not None:
                self._eof_since = self._loop.time()
                self._eof_checks = 0
                self._loop.call_later(self.EOF_RECHECK, self._confirm_eof)
                return
            self._end()

    def _confirm_eof(self) -> None:
        """An end of file read from a port whose peer comes and goes (a virtio-serial port) may be stale:
        a guest learns that a host connected from a control message that can come after that host's
        first bytes, so it reads them and then an end of file. Believed only once `peer_present` has said
        no for EOF_GRACE; a peer that is there means: read on."""
        if self._closing or self._eof_since is None:
            return
        assert self._peer_present is not None
        self._eof_checks += 1
        if self._peer_present():
            self._eof_since = None
            self.resume_reading()
        elif (self._loop.time() - self._eof_since < self.EOF_GRACE
              or self._eof_checks < self.EOF_GRACE / self.EOF_RECHECK):
            # counted too, not only timed: a guest whose vCPU the host did not run for the grace finds
            # it over at its first look, before its kernel has handled the control message of a host
            # that connected meanwhile (a host's answer was then dropped with this connection: 2 of 150
            # quick reconnects at load 13); each look lets the guest's kernel run in between
            self._loop.call_later(self.EOF_RECHECK, self._confirm_eof)
        else:
            self._eof_since = None
            self._end()

    def _end(self) -> None:
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def _fail(self, exc: Exception) -> None:
        self.close(exc)

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and self._eof_since is None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def is_closing(self) -> bool:
        return self._closing

    def close(self, exc: Exception | None = None) -> None:
        if self._closing:
            return
        self.pause_reading()
        self._closing = True
        os.close(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, exc)


def _page_up(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


async def attach_fd(fd: int, protocol: ConnectionProtocol, *, peer_present: Callable[[], bool] | None = None) -> None:
    """Attach `protocol` to an open read/write file descriptor (socket, character device or pipe).

    The descriptor is duplicated; the caller keeps ownership of `fd`. `peer_present` (a character
    device): asked before an end of file is believed (FdReader._confirm_eof).
    Raises OSError if the descriptor cannot be used.
    """
    import socket
    import stat

    loop = asyncio.get_running_loop()
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: protocol, sock)
        return
    rfd, wfd = os.dup(fd), os.dup(fd)
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    writer = FdWriter(wfd, protocol)
    protocol._writer = writer
    try:
        FdReader(rfd, protocol, peer_present).start()
    except BaseException:
        writer.close()
        os.close(rfd)
        raise


