"""Per-method call counts, errors and wall time of RPCs, kept cheaply (two clock reads and one dict
update per call) for `pykata monitor`.

    stats = RpcStats()
    server = Server(stats=stats)          # what a server handled
    stats.snapshot()                      # [(method, calls, errors, seconds), ...]

`PROCESS` holds what the process as a whole reports to the monitor (the shim registers its task
server's stats and its event counters there); the agent proxy serves it.
"""

from __future__ import annotations

from collections.abc import Callable

from pykata.record import Record

MAX_METHODS = 256  # methods are names from a service spec; the cap only guards against misuse


class RpcStats:
    def __init__(self) -> None:
        self._by_method: dict[str, list[float]] = {}

    def record(self, method: str, seconds: float, ok: bool) -> None:
        entry = self._by_method.get(method)
        if entry is None:
            if len(self._by_method) >= MAX_METHODS:
                return
            entry = self._by_method[method] = [0, 0, 0.0]
        entry[0] += 1
        if not ok:
            entry[1] += 1
        entry[2] += seconds

    def snapshot(self) -> list[tuple[str, int, int, float]]:
        return [(m, int(e[0]), int(e[1]), e[2]) for m, e in sorted(self._by_method.items())]


class ProcessStats(Record):
    """What this process reports about itself: the RPCs it served, and named counters."""

    __slots__ = ("counters", "served")
    __match_args__ = ("served", "counters")

    def __init__(self, served: RpcStats | None = None, counters: dict[str, Callable[[], int]] | None = None) -> None:
        self.served = served
        self.counters: dict[str, Callable[[], int]] = {} if counters is None else counters


PROCESS = ProcessStats()
