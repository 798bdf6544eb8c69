"""`pykata monitor`: Prometheus metrics of every running sandbox (Kata's kata-monitor)."""

from __future__ import annotations

import signal
import sys
import threading

import click

from pykata.config import load_config
from pykata.errors import PykataError
from pykata.monitor.defaults import DEFAULT_INTERVAL, DEFAULT_LISTEN, DEFAULT_TIMEOUT, PSS_MAX_AGE


@click.command("monitor")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve /metrics on.")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds one sandbox's agent has to answer a scrape.")
@click.option("--pss-max-age", type=click.FloatRange(0, 3600), default=PSS_MAX_AGE, show_default=True,
              help="Seconds a VM's PSS is reused before it is read again (reading it walks the VM's page tables).")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=DEFAULT_INTERVAL, show_default=True,
              help="Seconds between two collections of every sandbox (a scrape serves the last one, with its age; "
                   "a sandbox that starts or stops makes the next scrape collect first).")
def monitor(listen: str, timeout: float, pss_max_age: float, interval: float) -> None:
    """Serve Prometheus metrics of every running sandbox on http://LISTEN/metrics until SIGINT/SIGTERM."""
    # here, not at the top: every other pykata command would import prometheus_client for nothing
    from pykata.monitor.collector import Collector
    from pykata.monitor.scrape import Scraper
    from pykata.monitor.server import serve

    collector = Collector(Scraper(load_config(), timeout=timeout, pss_max_age=pss_max_age), interval=interval)
    try:
        server, thread = serve(collector, listen)
    except PykataError as e:
        click.echo(f"pykata: monitor: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # a port in use, an address not this host's: name the option and value
        click.echo(f"pykata: monitor: --listen {listen}: {e.strerror or e}", err=True)
        sys.exit(1)
    collector.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"pykata monitor: serving http://{listen}/metrics", err=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join(5)
    collector.close()
