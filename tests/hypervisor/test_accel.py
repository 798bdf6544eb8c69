"""Accelerator choice: capability-based, cached, one log line; plus host facts and small pieces."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.config import QemuConfig
from pykata.errors import HypervisorError
from pykata.hypervisor import BlockDevice, NetDevice, accel
from pykata.hypervisor.busybox_initrd import busybox_initrd_bytes
from pykata.hypervisor.hostinfo import _cpuinfo_khz, parse_tsc_khz
from pykata.hypervisor.readiness import log_tail, wait_for_console_line
from tests.guest_assets import guest_kernel_path


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_forced_tcg_needs_no_probe(tmp: Path) -> None:
    verdict = asyncio.run(accel.resolve_accelerator(QemuConfig(accelerator="tcg"), tmp / "nokernel", tmp))
    assert verdict.accel == "tcg" and verdict.probe_seconds is None


def test_missing_kvm_device_means_tcg_or_error(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake /dev/kvm path that does not exist: the error path of a host without KVM.
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp / "fake-kvm")
    verdict = asyncio.run(accel.resolve_accelerator(QemuConfig(), tmp / "nokernel", tmp))
    assert verdict.accel == "tcg"
    assert "does not exist" in verdict.reason
    with pytest.raises(HypervisorError, match="kvm"):
        asyncio.run(accel.resolve_accelerator(QemuConfig(accelerator="kvm"), tmp / "nokernel", tmp))


def test_kvm_device_usable_reports_reason(tmp: Path) -> None:
    assert "does not exist" in (accel.kvm_device_usable(tmp / "none") or "")
    plain = tmp / "plain"
    plain.write_text("")
    os.chmod(plain, 0)
    # root can open anything; only assert the function answers without raising.
    accel.kvm_device_usable(plain)


@pytest.mark.vm
def test_auto_probe_is_cached_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:

    found = guest_kernel_path()
    with tempfile.TemporaryDirectory(prefix="pkacc") as d:
        cache = Path(d)
        accel._memo.clear()
        accel._logged.clear()
        with caplog.at_level(logging.WARNING, logger="pykata.hypervisor"):
            first = asyncio.run(accel.resolve_accelerator(QemuConfig(), found, cache))
            second = asyncio.run(accel.resolve_accelerator(QemuConfig(), found, cache))
        assert first.accel in ("kvm", "tcg") and first.reason
        assert not first.cached or accel.kvm_device_usable() is not None
        assert second.accel == first.accel
        if accel.kvm_device_usable() is None:
            assert second.cached
            assert list((cache / "accel").glob("*.json")), "verdict not stored"
            # A new process reads the stored verdict instead of probing again.
            accel._memo.clear()
            third = asyncio.run(accel.resolve_accelerator(QemuConfig(), found, cache))
            assert third.cached and third.accel == first.accel
        fallbacks = [r for r in caplog.records if "TCG" in r.getMessage()]
        assert len(fallbacks) == (1 if first.accel == "tcg" else 0)


def test_verdict_key_changes_with_kernel(tmp: Path) -> None:
    qemu = Path("/usr/bin/qemu-system-x86_64")
    k = tmp / "vmlinux"
    k.write_bytes(b"a")
    key1 = accel.verdict_key(qemu, k)
    k.write_bytes(b"ab")
    assert accel.verdict_key(qemu, k) != key1


def test_parse_tsc_khz() -> None:
    log = (b"[    0.000061] tsc: Detected 2596.150 MHz processor\n"
           b"[    1.0] tsc: Refined TSC clocksource calibration: 2596.117 MHz\n")
    assert parse_tsc_khz(log) == 2596117
    assert parse_tsc_khz(b"tsc: Detected 3000.000 MHz processor") == 3000000
    assert parse_tsc_khz(b"nothing") is None
    info = "flags\t\t: fpu tsc constant_tsc tsc_known_freq\ncpu MHz\t\t: 2596.150\n"
    assert _cpuinfo_khz(info) == 2596150
    assert _cpuinfo_khz(info.replace(" tsc_known_freq", "")) is None


def test_busybox_initrd_is_newc_with_init() -> None:
    data = busybox_initrd_bytes("#!/bin/sh\necho hi\n")
    assert data.startswith(b"070701")
    assert b"init\0" in data and b"bin/busybox\0" in data and b"dev/console\0" in data
    assert data.rstrip(b"\0").endswith(b"TRAILER!!!")


async def test_console_marker_split_across_writes(tmp: Path) -> None:
    log = tmp / "console.log"
    log.write_bytes(b"")
    waiter = asyncio.ensure_future(wait_for_console_line(log, b"PYKATA_AGENT_READY"))
    with log.open("ab") as f:
        for part in (b"noise PYKATA_AG", b"ENT_RE", b"ADY\n"):
            f.write(part)
            f.flush()
            await asyncio.sleep(0.02)
            if part != b"ADY\n":
                assert not waiter.done()
    await asyncio.wait_for(waiter, 1)
    assert "PYKATA_AGENT_READY" in log_tail(log)
    assert log_tail(tmp / "missing") == "(no log)"


def test_device_validation() -> None:
    with pytest.raises(HypervisorError, match="device id"):
        BlockDevice("bad id,x", Path("/x"))
    with pytest.raises(HypervisorError, match="MAC"):
        NetDevice("eth0", "zz:00:00:00:00:00", tap_name="tap0")
    with pytest.raises(HypervisorError, match="exactly one"):
        NetDevice("eth0", "02:00:00:00:00:01")
    assert dataclasses.asdict(NetDevice("eth0", "02:00:00:00:00:01", tap_fd=3))["tap_fd"] == 3
