"""What a guest may not make the admin's terminal do (`pykata sandbox exec`'s output, when it is a terminal).

The debug console writes the guest's output to the admin's terminal, and the guest is untrusted. Colours and
cursor movement are what a shell needs; but a few sequences make a terminal *answer* (the answer arrives as
typed input, so it flows from the host into the guest) or reach outside the terminal:
  - OSC 52: read or set the host's clipboard;
  - CSI 20 t / CSI 21 t: report the window's icon label / title (which may hold host paths, hosts, commands;
    and old terminals let a title set earlier be replayed as input);
  - ENQ (0x05): the terminal's answerback string.
Those are dropped; every other byte passes unchanged, whatever the chunking of the stream.
"""

from __future__ import annotations

ESC = 0x1B
BEL = 0x07
ENQ = 0x05
MAX_PENDING = 256  # an escape sequence we keep to decide on; longer ones pass (they are not ours to drop)


class AnswerbackFilter:
    """feed(chunk) -> what may reach the terminal; keeps at most MAX_PENDING bytes of an unfinished
    sequence between chunks."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._dropping_osc = False  # inside an OSC 52, until BEL or ESC \
        self._osc_esc = False       # the last byte of it was ESC (maybe the start of ST)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        buf = bytes(self._pending) + data
        self._pending.clear()
        i, n = 0, len(buf)
        while i < n:
            if self._dropping_osc:
                i = self._skip_osc(buf, i)
                continue
            b = buf[i]
            if b == ENQ:
                i += 1
                continue
            if b != ESC:
                j = i
                while j < n and buf[j] not in (ESC, ENQ):
                    j += 1
                out += buf[i:j]
                i = j
                continue
            end, keep = self._sequence(buf, i)
            if end is None:  # unfinished: wait for more (bounded)
                if n - i <= MAX_PENDING:
                    self._pending += buf[i:]
                    return bytes(out)
                out += buf[i:]
                return bytes(out)
            if keep:
                out += buf[i:end]
            i = end
        return bytes(out)

    def _skip_osc(self, buf: bytes, i: int) -> int:
        n = len(buf)
        while i < n:
            b = buf[i]
            i += 1
            if b == BEL or (self._osc_esc and b == 0x5C):
                self._dropping_osc = self._osc_esc = False
                return i
            self._osc_esc = b == ESC
        return i

    def _sequence(self, buf: bytes, i: int) -> tuple[int | None, bool]:
        """The end of the escape sequence at buf[i] and whether it passes; (None, _) when unfinished."""
        n = len(buf)
        if i + 1 >= n:
            return None, True
        kind = buf[i + 1]
        if kind == ord("["):  # CSI: parameters, intermediates, one final byte
            j = i + 2
            while j < n and 0x20 <= buf[j] <= 0x3F:
                j += 1
            if j >= n:
                return None, True
            if not 0x40 <= buf[j] <= 0x7E:  # not a final byte (ESC, a control): what came so far passes
                return j, True
            params = buf[i + 2:j]
            if buf[j] == ord("t") and params.split(b";")[0] in (b"20", b"21"):
                return j + 1, False
            return j + 1, True
        if kind == ord("]"):  # OSC: a number, ';', text, then BEL or ST
            j = i + 2
            while j < n and 0x30 <= buf[j] <= 0x39 and j - i < 8:
                j += 1
            if j >= n:
                return None, True
            if buf[i + 2:j] == b"52":
                self._dropping_osc = True
                return j, False
            return i + 2, True  # the rest of an OSC is text: it passes as it comes
        if kind in (ESC, ENQ):  # a lone ESC: the next one starts its own sequence
            return i + 1, True
        return i + 2, True
