#!/usr/bin/env python3
"""`pykata monitor` scrape cost: wall time of one HTTP scrape of /metrics (end to end: request, render of
the last background collection, exposition, response) and the series it yields, with 0..N running
sandboxes owned by another process (like shims: pykata.AsyncSandbox, busybox, a private runtime dir).

Beside it: one background collection of every sandbox (`collect`: host /proc figures, GetGuestMetrics,
StatsContainer per container and the owner's counters, concurrently over kept connections) and the old way,
a scrape that collects while the client waits on fresh connections (`collect_on_request`, what
`pykata monitor` did before it collected in the background). Medians of --repeat; load average printed.

    .venv/bin/python bench/monitor_bench.py [--counts 0,1,10] [--repeat 11]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pykata.config import Config, load_config
from pykata.monitor.collector import Collector
from pykata.monitor.scrape import Scraper
from pykata.monitor.server import serve

HOLDER = """
import asyncio, dataclasses, sys
import pykata
from pykata.config import load_config

async def main() -> None:
    base = load_config()
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=sys.argv[1]))
    boxes = []
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            for _ in range(int(line)):
                boxes.append(await pykata.AsyncSandbox(image="busybox", config=config).__aenter__())
            print("ready", flush=True)
    finally:
        for b in boxes:
            await b.close()

asyncio.run(main())
"""


async def collect_on_request(config: Config) -> float:
    scraper = Scraper(config)
    try:
        t = time.perf_counter()
        await scraper.scrape()
        return time.perf_counter() - t
    finally:
        await scraper.close()


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="0,1,10")
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    d = Path(tempfile.mkdtemp(prefix="pkmb", dir="/tmp"))
    base = load_config()
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(d / "run")))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d / "run")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    collector = Collector(Scraper(config), interval=3600)  # collections here are the bench's own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, thread = serve(collector, f"127.0.0.1:{port}")
    collector.start()
    url = f"http://127.0.0.1:{port}/metrics"
    have = 0
    try:
        for n in counts:
            holder.stdin.write(f"{n - have}\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "ready"
            have = n
            urllib.request.urlopen(url, timeout=60).read()  # the set changed: this one collects first
            scrapes, series = [], 0
            for _ in range(args.repeat):
                t = time.perf_counter()
                text = urllib.request.urlopen(url, timeout=60).read().decode()
                scrapes.append(time.perf_counter() - t)
                series = sum(len(f.samples) for f in text_string_to_metric_families(text))
            collects, cpu = [], []
            for _ in range(max(3, args.repeat // 3)):
                before = time.process_time()
                c = collector._collect_now(60)
                cpu.append(time.process_time() - before)  # the monitor's own CPU (not the guests')
                assert c is not None
                collects.append(c.seconds)
            old = [asyncio.run(collect_on_request(config)) for _ in range(max(3, args.repeat // 3))]
            print(f"sandboxes={n:<3} scrape={statistics.median(scrapes) * 1000:6.1f} ms  series={series:<5} "
                  f"collect={statistics.median(collects) * 1000:6.1f} ms "
                  f"(monitor cpu {statistics.median(cpu) * 1000:5.1f} ms)  "
                  f"collect_on_request={statistics.median(old) * 1000:6.1f} ms  load={loadavg()}", flush=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        collector.close()
        holder.stdin.close()
        holder.wait(120)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
