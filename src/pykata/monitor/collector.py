"""Background collection for `pykata monitor`: a scrape serves the last collection instead of asking every
guest while Prometheus waits.

Asking the guests is what a scrape used to spend its time on: one GetGuestDetails and one StatsContainer
per container, each a round trip through the owner's proxy into a TCG guest (10-60 ms each here), plus a
fresh connection per sandbox. Now a thread of the monitor collects every `interval` seconds over
connections it keeps, and a scrape only renders the result (with each sandbox's age), after a cheap
check of which sandboxes live (their records and two pids each): when that set changed since the last
collection (a sandbox started or stopped), the scrape waits for a new collection first (bounded by the
per-sandbox timeout), and a sandbox whose owner or VM died is left out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from pykata.config import Config
from pykata.monitor.scrape import Family, Sample, Scraper
from pykata.sandbox import status

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie (a killed VMM its owner has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read(512).rpartition(b")")[2].split()[:1]
    except OSError:
        return False
    return state not in ([b"Z"], [b"X"], [])


Live = dict[str, tuple[object, ...]]


def live_sandboxes(config: Config) -> Live:
    """The sandboxes whose owner and VMM run, each with what its record says of it (status, VM, containers
    and theirs), so that a change is seen (records and /proc only: ~0.1 ms per sandbox)."""
    return {rec.id: (rec.status, rec.vmm_pid, tuple(sorted((c.id, c.status) for c in rec.containers.values())))
            for _, rec in status.running(config) if not rec.vmm_pid or _pid_alive(rec.vmm_pid)}


@dataclass
class Collection:
    live: Live                           # the sandboxes that lived when it started
    samples: dict[str, Sample]
    errors: dict[tuple[str, str], int]
    at: float                            # time.monotonic() when it ended
    seconds: float                       # how long it took


class Collector:
    """Runs `scraper.collect()` every `interval` seconds on an event loop thread of its own."""

    def __init__(self, scraper: Scraper, *, interval: float = DEFAULT_INTERVAL) -> None:
        self.scraper = scraper
        self.interval = interval
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pykata-monitor-collect", daemon=True)
        self._lock = threading.Lock()
        self._last: Collection | None = None
        self._running: Future[Collection] | None = None
        self._task: Future[None] | None = None

    def start(self) -> None:
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._every_interval(), self._loop)

    async def _every_interval(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._collect()
            await asyncio.sleep(self.interval)

    async def _collect(self) -> Collection:
        start = time.perf_counter()
        live = live_sandboxes(self.scraper.config)
        try:
            samples = await self.scraper.collect()
        except Exception:
            log.exception("collection failed")
            raise
        now = time.monotonic()
        result = Collection(live, samples, dict(self.scraper.errors), now, time.perf_counter() - start)
        with self._lock:
            self._last = result
        return result

    def _collect_now(self, wait: float) -> Collection | None:
        """A new collection (joining one under way), waiting at most `wait` seconds; None on timeout."""
        with self._lock:
            running = self._running
            if running is None or running.done():
                running = self._running = asyncio.run_coroutine_threadsafe(self._collect(), self._loop)
        try:
            return running.result(wait)
        except Exception:  # a timeout (the collection goes on), or a failed collection
            return None

    def families(self) -> dict[str, Family]:
        """What a scrape serves: the last collection, collected again first when the live sandboxes or
        their records changed since (a bounded wait)."""
        start = time.perf_counter()
        live = live_sandboxes(self.scraper.config)
        with self._lock:
            last = self._last
        if last is None or last.live != live:
            last = self._collect_now(self.scraper.timeout + 1.0) or last
        now = time.monotonic()
        samples = {} if last is None else {sid: s for sid, s in last.samples.items() if sid in live}
        ages = dict.fromkeys(samples, 0.0 if last is None else now - last.at)
        errors = {} if last is None else {k: n for k, n in last.errors.items() if k[0] in live}
        families = self.scraper.families(samples, ages, errors)
        if last is not None:
            families["pykata_monitor_collect_seconds"].samples.append(((), last.seconds))
        families["pykata_monitor_scrape_seconds"].samples.append(((), time.perf_counter() - start))
        return families

    def close(self) -> None:
        """Stop collecting and close the connections. Idempotent."""
        if not self._thread.is_alive():
            return
        if self._task is not None:
            self._task.cancel()

        async def shutdown() -> None:
            await self.scraper.close()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
