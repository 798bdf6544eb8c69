#!/usr/bin/env python3
"""`pykata monitor` scrape cost: wall time of one whole scrape and the series it yields, with 0..N
running sandboxes (pykata.AsyncSandbox, busybox, in a private runtime dir), median of --repeat scrapes.

The scrape reads /proc for each sandbox's owner and VMM, and asks each agent (through the owner's agent
proxy) for guest details and per-container stats, concurrently. Reported split: host-only (the /proc
part with a fresh PSS, agents skipped), full with the PSS cache (the default, `--pss-max-age 30`), and full
reading PSS every scrape, so the guest round trip (TCG-slow here) and the PSS walk are visible on their own.

    .venv/bin/python bench/monitor_bench.py [--counts 0,1,3] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pykata
from pykata.config import load_config
from pykata.monitor import scrape as scrape_mod
from pykata.monitor.scrape import Scraper
from pykata.monitor.server import to_metrics


async def measure(scraper: Scraper, repeat: int) -> tuple[float, int]:
    times = []
    series = 0
    for _ in range(repeat):
        t = time.perf_counter()
        families = await scraper.scrape()
        times.append(time.perf_counter() - t)
        series = sum(len(m.samples) for m in to_metrics(families))
    return statistics.median(times), series


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="0,1,3")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    d = Path(tempfile.mkdtemp(prefix="pkmb", dir="/tmp"))
    base = load_config()
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(d / "run")))
    boxes: list[pykata.AsyncSandbox] = []
    try:
        for n in counts:
            while len(boxes) < n:
                boxes.append(await pykata.AsyncSandbox(image="busybox", config=config).__aenter__())
            full, series = await measure(Scraper(config), args.repeat)
            uncached, _ = await measure(Scraper(config, pss_max_age=0), args.repeat)
            real = scrape_mod._guest_figures

            async def skip(*_: object) -> None:
                return None
            scrape_mod._guest_figures = skip  # type: ignore[assignment]
            try:
                host, _ = await measure(Scraper(config, pss_max_age=0), args.repeat)
            finally:
                scrape_mod._guest_figures = real
            print(f"sandboxes={n:<3} scrape={full * 1000:7.1f} ms  with_fresh_pss={uncached * 1000:7.1f} ms  "
                  f"host_only(fresh pss)={host * 1000:6.1f} ms  "
                  f"series={series}")
    finally:
        for b in boxes:
            await b.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
