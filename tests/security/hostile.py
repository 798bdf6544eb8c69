"""The hostile-agent harness, host side: a guest initrd whose agent is tests/security/hostile_agent.py,
a configuration that names it, and measurements of what the host does meanwhile.

The initrd is the production one with a second cpio archive appended (the kernel unpacks both, the
later one replacing files): /usr/lib/pykata/hostile_agent.py, and an /init that runs it instead of
`pykata.agent`. Only a test writes this configuration (an admin's file): no annotation, pod field or
guest action can select another agent on a real host.
"""

from __future__ import annotations

import io
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pykata.guestimage.cpio import CpioEntry, write_archive
from tests.guest_assets import guest_initrd_path

HERE = Path(__file__).parent
INIT_SOURCE = Path(__file__).parents[2] / "src" / "pykata" / "guestimage" / "init"
AGENT_EXEC = "\nmain()\n"  # the last line of /init: pykata.agent.pid1.main runs pykata.agent.main


def marker(**attacks: str) -> str:
    """The process argument that arms attacks: marker(StatsContainer="hang") ->
    'pykata-hostile=StatsContainer:hang'."""
    return "pykata-hostile=" + ",".join(f"{rpc}:{kind}" for rpc, kind in attacks.items())


def build_hostile_initrd(out: Path) -> Path:
    """Write the production initrd plus the hostile overlay to `out`; return `out`."""
    init = INIT_SOURCE.read_text()
    if AGENT_EXEC not in init:
        raise AssertionError(f"{INIT_SOURCE} no longer runs the agent with {AGENT_EXEC!r}")
    init = init.replace(AGENT_EXEC, '\nmain("hostile_agent")\n')
    f = stat.S_IFREG | 0o755
    overlay = io.BytesIO()
    write_archive([CpioEntry("init", f, init.encode()),
                   CpioEntry("usr/lib/pykata/hostile_agent.py", stat.S_IFREG | 0o644,
                             (HERE / "hostile_agent.py").read_bytes())], overlay, mtime=0)
    base = guest_initrd_path().read_bytes()
    # archives start on a 4-byte boundary
    out.write_bytes(base + b"\0" * (-len(base) % 4) + overlay.getvalue())
    return out


def hostile_config(dir: Path, initrd: Path, *, request_timeout: float | None = None) -> Path:
    """A configuration.toml for the hostile agent: cold boots (no template: the template's initrd is
    the production one), a private runtime directory, small VMs."""
    agent = f"request_timeout = {request_timeout}\n" if request_timeout is not None else ""
    path = dir / "configuration.toml"
    path.write_text(f"""
[hypervisor.qemu]
initrd = "{initrd}"
default_memory = 512
boot_timeout = 60.0

[agent.pykata]
{agent}
[runtime]
runtime_dir = "{dir / 'run'}"

[factory]
enable_template = false
""")
    return path


@dataclass
class RssSampler:
    """Samples the resident memory of processes whose program (first two arguments) contains
    `match` and whose command line contains `scope` (e.g. our containerd's socket: other shims on the
    machine are not ours) every `interval` seconds in a thread; `peak` is the largest sum seen."""

    match: str
    scope: str = ""
    interval: float = 0.05
    peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _rss(self) -> int:
        total = 0
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            argv = p.info["cmdline"] or []
            if (self.match in " ".join(argv[:2]) and self.scope in " ".join(argv)
                    and p.info["memory_info"] is not None):
                total += p.info["memory_info"].rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def wait_until(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
