"""bench/claim_cpu.py checks its --variant settings before it makes anything: a bad one is refused with
an error naming the flag and the key, and leaves no runtime directory behind (it left /tmp/pkcc* and a
traceback). Run as a user runs it, in a mount namespace of its own with a fresh /tmp, so what it leaves
there is all its own (other engineers' benchmarks use /tmp at the same time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "claim_cpu.py"
# the script's output, its exit status, then what /tmp holds once it ended
RUNNER = 'mount -t tmpfs tmpfs /tmp || exit 99; "$0" "$@"; echo "status=$?"; echo "left=$(ls -A /tmp)"'


def _run(*args: str) -> tuple[int, str, str]:
    p = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", RUNNER, sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    status = next(line for line in p.stdout.splitlines() if line.startswith("status="))
    left = next(line for line in p.stdout.splitlines() if line.startswith("left="))
    return int(status.removeprefix("status=")), left.removeprefix("left="), p.stderr


@pytest.mark.parametrize(
    ("variant", "named"),
    [
        ("tb=hypervisor.qemu.no_such_key=1", "hypervisor.qemu.no_such_key: unknown key"),
        ("tb=nosection.tcg_tb_size=64", "nosection: unknown section"),
        ("tb=hypervisor.qemu.tcg_tb_size=lots", "hypervisor.qemu.tcg_tb_size"),
        ("tb=hypervisor.qemu.tcg_tb_size=-5", "hypervisor.qemu.tcg_tb_size"),
        ("tb=hypervisor.qemu.default_vcpus.x=1", "hypervisor.qemu.default_vcpus"),
        ("tb=tcg_tb_size=64", "is not SECTION.KEY=VALUE"),
        ("justaname", "is not SECTION.KEY=VALUE"),
        ("=hypervisor.qemu.tcg_tb_size=64", "NAME must be given"),
    ],
)
def test_a_bad_variant_is_refused_naming_it_and_leaves_nothing(variant: str, named: str) -> None:
    status, left, err = _run("-n", "1", "--variant", variant)
    assert status == 2, err
    error = err.splitlines()[-1]  # after argparse's usage
    assert error.startswith("claim_cpu.py: error: --variant") and named in error, err
    assert "Traceback" not in err, err
    assert left == "", f"left in /tmp: {left}"


def test_a_good_variant_is_taken() -> None:
    """The same path with a good value goes on to the measurement (stopped here by a bad image of
    --throwaway, also checked before anything is made): only the image is refused."""
    status, left, err = _run(
        "-n",
        "1",
        "--variant",
        "tb64=hypervisor.qemu.tcg_tb_size=64",
        "--variant",
        "cpu=hypervisor.qemu.cpu_model=max,-erms",
        "--throwaway",
        "/no/such/image",
    )
    error = err.splitlines()[-1]
    assert status == 2 and error.startswith("claim_cpu.py: error: image '/no/such/image'"), err
    assert "Traceback" not in err, err
    assert left == "", f"left in /tmp: {left}"
