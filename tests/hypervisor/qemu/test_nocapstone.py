"""The libcapstone stand-in of a clone's QEMU (pykata.hypervisor.qemu.nocapstone): a real QEMU process
runs with it and never maps the real library; a binary that does not start with it gets none."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from pykata.config import load_config
from pykata.hypervisor.qemu import nocapstone, ramreadonly
from pykata.hypervisor.qemu.driver import _clone_environment


def _maps(pid: int) -> set[str]:
    return {line.split()[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if len(line.split()) > 5}


def test_qemu_runs_with_the_stand_in_and_not_the_real_capstone(tmp_path: Path) -> None:
    qemu = load_config().qemu.path
    env = _clone_environment(tmp_path / "cache", qemu, tmp_path / "memory")
    assert env is not None
    lib = nocapstone.stub(tmp_path / "cache", qemu)
    assert lib is not None and str(lib) in env["LD_PRELOAD"].split()
    assert str(ramreadonly.library(tmp_path / "cache")) in env["LD_PRELOAD"].split()
    maps = _qemu_maps(qemu, {**os.environ, **env})
    assert str(lib) in maps
    assert not any(p.endswith(f"/{nocapstone.SONAME}") and p != str(lib) for p in maps), sorted(maps)
    # the same QEMU without it maps the real library (the probe is sound)
    assert any(p.endswith(f"/{nocapstone.SONAME}") for p in _qemu_maps(qemu, dict(os.environ)))


def _qemu_maps(qemu: str, env: dict[str, str]) -> set[str]:
    """The files a QEMU with no guest (-machine none) maps once it runs."""
    proc = subprocess.Popen([qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-monitor", "none"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        # in its main loop (asleep in ppoll), so the dynamic linker has mapped every library
        while time.monotonic() < deadline and proc.poll() is None and not (
                Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
                and any("/libc.so" in p for p in _maps(proc.pid))):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        return _maps(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_binary_that_fails_with_it_gets_none(tmp_path: Path) -> None:
    assert nocapstone.stub(tmp_path / "cache", "/bin/false") is None
    assert nocapstone.stub(tmp_path / "cache", str(tmp_path / "no-such-qemu")) is None
