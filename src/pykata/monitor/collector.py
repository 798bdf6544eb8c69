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
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from pykata.config import Config
from pykata.monitor.defaults import DEFAULT_INTERVAL
from pykata.monitor.exposition import render
from pykata.monitor.scrape import FAMILIES, Family, Sample, Scraper
from pykata.sandbox import state
from pykata.sandbox.sandbox import sandboxes_dir

log = logging.getLogger(__name__)

# Families that change with every scrape: rendered per scrape, the rest once per collection.
PER_SCRAPE = ("pykata_monitor_sample_age_seconds", "pykata_monitor_scrape_seconds")


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie (a killed VMM its owner has not reaped yet): one read of /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read(512).rpartition(b")")[2].split()[:1]
    except OSError:
        return False
    return state not in ([b"Z"], [b"X"], [])


Live = dict[str, tuple[object, ...]]


class LiveSandboxes:
    """Which sandboxes live, looked up for every scrape: a record is parsed again only when its file
    changed (records are replaced by rename), and a pid is one read of /proc/PID/stat. ~0.1 ms a sandbox."""

    def __init__(self, config: Config) -> None:
        self.directory = sandboxes_dir(config)
        self._records: dict[str, tuple[tuple[int, int, int], state.SandboxRecord | None]] = {}

    def _record(self, path: str) -> state.SandboxRecord | None:
        try:
            st = os.stat(os.path.join(path, state.STATE_FILE))
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._records.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        record = state.load(Path(path))
        self._records[path] = (key, record)
        return record

    def __call__(self) -> Live:
        """The sandboxes whose owner and VMM run, each with what its record says of it (status, VM,
        containers and theirs), so that a change is seen."""
        live: Live = {}
        seen = set()
        try:
            entries = [e.path for e in os.scandir(self.directory) if e.is_dir()]
        except OSError:
            entries = []
        for path in entries:
            seen.add(path)
            rec = self._record(path)
            if rec is None or rec.status not in ("creating", "running") or not _pid_alive(rec.owner_pid):
                continue
            if rec.vmm_pid and not _pid_alive(rec.vmm_pid):
                continue
            live[rec.id] = (rec.status, rec.vmm_pid,
                            tuple(sorted((c.id, c.status) for c in rec.containers.values())))
        self._records = {p: v for p, v in self._records.items() if p in seen}
        return live


def live_sandboxes(config: Config) -> Live:
    """LiveSandboxes(config)() once (without its cache)."""
    return LiveSandboxes(config)()


@dataclass
class Collection:
    live: Live                           # the sandboxes that lived when it started
    samples: dict[str, Sample]
    errors: dict[tuple[str, str], int]
    at: float                            # time.monotonic() when it ended
    seconds: float                       # how long it took
    text: bytes | None = None            # its families but the per-scrape ones, rendered (once)


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
        self._live = LiveSandboxes(scraper.config)
        self._live_lock = threading.Lock()
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
        live = self.live()
        try:
            samples = await self.scraper.collect()
        except Exception:
            log.exception("collection failed")
            raise
        now = time.monotonic()
        result = Collection(live, samples, dict(self.scraper.errors), now, time.perf_counter() - start)
        result.text = render(self._static(result, live))  # here, not in the next scrape
        with self._lock:
            self._last = result
        return result

    def live(self) -> Live:
        with self._live_lock:  # scrapes run in threads of their own, collections in the loop's
            return self._live()

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

    def _current(self) -> tuple[Collection | None, Live]:
        """The last collection, collected again first when the live sandboxes or their records changed
        since (a bounded wait), and the live sandboxes."""
        live = self.live()
        with self._lock:
            last = self._last
        if last is None or last.live != live:
            last = self._collect_now(self.scraper.timeout + 1.0) or last
        return last, live

    def _static(self, last: Collection | None, live: Live) -> dict[str, Family]:
        """The families but the per-scrape ones, of the sandboxes that live."""
        samples = {} if last is None else {sid: s for sid, s in last.samples.items() if sid in live}
        errors = {} if last is None else {k: n for k, n in last.errors.items() if k[0] in live}
        families = self.scraper.families(samples, None, errors)
        if last is not None:
            families["pykata_monitor_collect_seconds"].samples.append(((), last.seconds))
        for name in PER_SCRAPE:
            del families[name]
        return families

    def _per_scrape(self, last: Collection | None, live: Live, start: float) -> dict[str, Family]:
        now = time.monotonic()
        families = {name: Family(*FAMILIES[name]) for name in PER_SCRAPE}
        if last is not None:
            families["pykata_monitor_sample_age_seconds"].samples.extend(
                ((("sandbox_id", sid),), now - last.at) for sid in last.samples if sid in live)
        families["pykata_monitor_scrape_seconds"].samples.append(((), time.perf_counter() - start))
        return families

    def families(self) -> dict[str, Family]:
        """What a scrape serves, as families (tests; `exposition()` is the same as text)."""
        start = time.perf_counter()
        last, live = self._current()
        return {**self._static(last, live), **self._per_scrape(last, live, start)}

    def exposition(self) -> bytes:
        """What a scrape serves, as Prometheus text: the last collection's text, rendered once per
        collection, and the few per-scrape series (ages, this scrape's time)."""
        start = time.perf_counter()
        last, live = self._current()
        if last is None or last.live != live:  # no fresh collection in time: leave out the dead ones
            static = render(self._static(last, live))
        else:
            if last.text is None:
                last.text = render(self._static(last, live))
            static = last.text
        return static + render(self._per_scrape(last, live, start))

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
