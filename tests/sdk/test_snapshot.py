"""Sandbox snapshots: save a running sandbox, restore it in other processes, side by side; refuse a
tampered, truncated or hostile snapshot directory with an error naming the field, leaving nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pykata
from pykata.config import load_config
from pykata.sandbox import sandbox as sandbox_module
from pykata.sandbox.snapshot import MANIFEST, STATE, SnapshotError
from pykata.sandbox.snapshotdir import KnownDigests

pytestmark = [pytest.mark.vm]

BOOT_ID = "/proc/sys/kernel/random/boot_id"
ROOT = Path(__file__).resolve().parents[2]

# what a restoring process reports (run with this checkout's interpreter)
RESTORE_SCRIPT = r"""
import json, sys, time
import pykata
with pykata.Sandbox.restore(sys.argv[1], timeout=120) as sb:
    out = {"id": sb.id}
    out["file"] = sb.files.read("/data/hello.txt")
    out["cwd"] = sb.run("pwd; echo $GREETING").text
    out["boot_id"] = sb.run(["cat", "/proc/sys/kernel/random/boot_id"]).text.strip()
    out["urandom"] = sb.run("head -c 16 /dev/urandom | od -An -tx1").text.split()
    n1 = int(sb.run("wc -l < /data/ticks").text)
    time.sleep(1.5)
    out["ticks_grew"] = int(sb.run("wc -l < /data/ticks").text) > n1
    sb.files.write("/data/hello.txt", "changed by " + sb.id)
    out["after_write"] = sb.files.read("/data/hello.txt")
print(json.dumps(out))
"""


@contextlib.contextmanager
def _ids_made() -> Iterator[list[str]]:
    """The sandbox ids this process draws meanwhile (a spy on the real `new_id`, which names every
    sandbox directory a restore makes): a leak check scoped to them never counts another engineer's
    or another test's half-made sandbox on this shared host as ours."""
    made: list[str] = []
    real = sandbox_module.new_id

    def spy() -> str:
        made.append(real())
        return made[-1]

    sandbox_module.new_id = spy
    try:
        yield made
    finally:
        sandbox_module.new_id = real


def _left_of(made: list[str]) -> set[str]:
    """Which of the sandbox ids `made` still have a directory (or a dangling link) on the host."""
    d = Path(load_config().runtime.runtime_dir) / "sandboxes"
    return {sid for sid in made if os.path.lexists(d / sid)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """One snapshot of a prepared sandbox (a file, a background process, env and cwd), shared by the
    tests of this module; the source sandbox is checked and closed here."""
    path = tmp_path_factory.mktemp("snap") / "prepared"
    with pykata.Sandbox(image="busybox", snapshots=True, env={"GREETING": "hi"}, cwd="/data") as sb:
        sb.files.write("/data/hello.txt", "prepared")
        sb.spawn("while :; do echo tick >> /data/ticks; sleep 0.2; done")
        before = {"id": sb.id, "boot_id": sb.run(["cat", BOOT_ID]).text.strip()}
        with pytest.raises(SnapshotError, match=r"path: .* exists already"):
            sb.snapshot(path.parent)
        assert sb.snapshot(path) == path
        assert sb.run("cat hello.txt").text == "prepared"  # the source runs on after its snapshot
        sb.files.write("/data/hello.txt", "changed in the source after the snapshot")
        # close=True: saved, then the sandbox is gone
        assert sb.snapshot(path.parent / "closed", close=True).is_dir()
        with pytest.raises(pykata.SandboxGoneError):
            sb.run("true")
    shutil.rmtree(path.parent / "closed")
    yield path, before
    shutil.rmtree(path, ignore_errors=True)


def test_two_restores_in_other_processes_run_side_by_side_and_differ(saved: tuple[Path, dict[str, Any]]) -> None:
    path, source = saved
    # private: it holds guest memory
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in (MANIFEST, STATE):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["source_sandbox"] == source["id"]
    assert {"kernel", "initrd"} <= set(manifest["assets"]) and manifest["qemu_version"].count(".") == 2
    # the image's root is a read-only disk in an image slot, named by its content key
    assert [(d["kind"], d["containers"]) for d in manifest["devices"]] == [("root-slot", [source["id"]])]

    procs = [subprocess.Popen([sys.executable, "-c", RESTORE_SCRIPT, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    a, b = results
    for r in (a, b):
        assert r["file"] == "prepared"                      # the guest's files as they were saved
        assert r["cwd"] == "/data\nhi\n"                    # the SDK's cwd and env came along
        assert r["ticks_grew"]                              # a background process runs on
        assert r["after_write"] == "changed by " + r["id"]  # and each restore is its own
        assert r["id"] != source["id"] and r["boot_id"] != source["boot_id"]
    assert a["id"] != b["id"] and a["boot_id"] != b["boot_id"] and a["urandom"] != b["urandom"]
    assert not _left_of([a["id"], b["id"]])  # both closed what they made


def _restore_fails(path: Path, field: str) -> SnapshotError:
    with _ids_made() as made, pytest.raises(SnapshotError) as info:
        pykata.Sandbox.restore(path)
    assert info.value.field == field, str(info.value)
    assert not _left_of(made)
    return info.value


def _copy(saved: Path, tmp_path: Path, edit: Any = None) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(saved, dest)
    if edit is not None:
        m = json.loads((dest / MANIFEST).read_text())
        edit(m)
        (dest / MANIFEST).write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m.update(format=2), "format"),
    (lambda m: m.update(kind="something else"), "kind"),
    (lambda m: m.update(pykata_version="0.0.1-other"), "pykata_version"),
    (lambda m: m["machine"].update(cpu_model="Skylake-Client"), "machine.cpu_model"),
    (lambda m: m["machine"].update(cpu="max"), "machine.cpu"),  # saved under another default -cpu
    (lambda m: m["machine"].update(default_memory=1 << 30), "machine.default_memory"),
    (lambda m: m["assets"]["initrd"].update(sha256="0" * 64), "assets.initrd"),
    (lambda m: m["assets"].update(kernel=None), "assets.kernel"),
    (lambda m: m.update(containers="not a list"), "containers"),
    (lambda m: m["containers"][0].update(id="../../etc"), "containers[0].id"),
    (lambda m: m["containers"][0].update(pid=-1), "containers[0].pid"),
    (lambda m: m["state"].update(size=1), "state.size"),
    (lambda m: m["devices"].append({"key": "x"}), "devices[1].kind"),
    (lambda m: m["devices"][0].update(key="../../../etc/passwd"), "devices[0].key"),
    (lambda m: m["devices"][0].update(key="store-0000-f2-4096m"), "devices[0].key"),  # not in this host's cache
    (lambda m: m["devices"][0].update(slot=63), "devices[0].slot"),
    (lambda m: m["extra"].pop("sdk"), "extra.sdk"),
    (lambda m: m["extra"]["sdk"].update(container="other"), "extra.sdk.container"),
])
def test_a_tampered_manifest_is_refused_naming_the_field(saved: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                        edit: Any, field: str) -> None:
    _restore_fails(_copy(saved[0], tmp_path, edit), field)


def test_hostile_snapshot_directories_are_refused(saved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path = saved[0]
    outside = tmp_path / "outside.json"
    outside.write_text((path / MANIFEST).read_text())
    # the directory, the manifest or the state as a symlink: never followed
    link = tmp_path / "link"
    link.symlink_to(path)
    assert "symlink" in str(_restore_fails(link, "path"))
    bad = _copy(path, tmp_path)
    (bad / MANIFEST).unlink()
    (bad / MANIFEST).symlink_to(outside)
    assert "symlink" in str(_restore_fails(bad, "manifest"))
    shutil.rmtree(bad)
    bad = _copy(path, tmp_path)
    (bad / STATE).unlink()
    (bad / STATE).symlink_to(path / STATE)
    _restore_fails(bad, "state")
    (bad / STATE).unlink()
    os.mkfifo(bad / STATE)  # not a regular file (and opening it must not block)
    _restore_fails(bad, "state")
    shutil.rmtree(bad)
    # a huge manifest, one that is not JSON, or of the wrong shape
    bad = _copy(path, tmp_path)
    (bad / MANIFEST).write_bytes(b" " * (2 << 20))
    _restore_fails(bad, "manifest")
    (bad / MANIFEST).write_bytes(b"{not json")
    _restore_fails(bad, "manifest")
    (bad / MANIFEST).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    _restore_fails(bad, "manifest")
    (bad / MANIFEST).write_text("[1, 2]")
    _restore_fails(bad, "manifest")
    shutil.rmtree(bad)
    # a truncated state
    bad = _copy(path, tmp_path)
    with open(bad / STATE, "r+b") as f:
        f.truncate((bad / STATE).stat().st_size // 2)
    _restore_fails(bad, "state.size")
    _restore_fails(tmp_path / "missing", "path")


def test_a_corrupt_state_is_refused_after_loading_and_the_vm_is_gone(saved: tuple[Path, dict[str, Any]],
                                                                     tmp_path: Path) -> None:
    """Same size, other bytes: QEMU may load it, the hash does not match; the VM is stopped. Also when
    this host remembered the digest of that very file (a verified restore): the bytes changed under
    it, so its ctime did, and the state is hashed again."""
    bad = _copy(saved[0], tmp_path)
    with pykata.Sandbox.restore(bad) as ok:  # verified, so its digest is remembered
        assert ok.files.read("/data/hello.txt") == "prepared"
    known = KnownDigests(load_config().runtime.runtime_path)
    with open(bad / STATE, "rb") as f:
        assert known.get(f.fileno()) == json.loads((bad / MANIFEST).read_text())["state"]["sha256"]
    size = (bad / STATE).stat().st_size
    with open(bad / STATE, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    _restore_fails(bad, "state.sha256")


def test_a_sandbox_whose_guest_never_mounted_the_share_can_be_saved(tmp_path: Path) -> None:
    """Since the lazy share (agent protocol 10) a sandbox whose root is on an image disk and that has no
    host volume never mounts the host's shared directory: it is saved without snapshots=True (it was
    refused as "shares host files"). One with a host volume mounts it, and is refused naming
    snapshots=True, nothing left behind."""
    vol = tmp_path / "vol"
    vol.mkdir()
    with pykata.Sandbox(image="busybox", volumes=[f"{vol}:/v"]) as sb:
        with pytest.raises(SnapshotError, match="snapshots=True"):
            sb.snapshot(tmp_path / "s")
        assert sb.run("echo ok").text == "ok\n"
    assert not (tmp_path / "s").exists() and os.listdir(tmp_path) == ["vol"]
    with pykata.Sandbox(image="busybox") as sb:
        sb.run("echo kept > /tmp/mark")
        sb.snapshot(tmp_path / "plain")
        assert sb.run("cat /tmp/mark").text == "kept\n"  # runs on after the save
    with pykata.Sandbox.restore(tmp_path / "plain") as again:
        assert again.run("cat /tmp/mark").text == "kept\n"
    with pytest.raises(pykata.PykataError, match="volumes"):
        pykata.Sandbox(image="busybox", snapshots=True, volumes=[f"{tmp_path}:/v"]).start()


async def test_async_restore_can_be_snapshotted_again(saved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """AsyncSandbox has the same surface; a restored sandbox is itself a sandbox made for snapshots."""
    first = await pykata.AsyncSandbox.restore(saved[0])
    try:
        assert first._prepared is not None  # a shell saved waiting for the first command takes it
        assert (await first.run("cat hello.txt")).text == "prepared"
        assert first._prepared is None
        await first.files.write("/data/second.txt", "second generation")
        await first.pause()
        await first.snapshot(tmp_path / "again")  # a paused sandbox stays paused
        assert first.paused
        await first.resume()
        # restored while the sandbox it was saved from still runs
        second = await pykata.AsyncSandbox.restore(tmp_path / "again")
        try:
            assert (await second.run("cat hello.txt second.txt")).text == "preparedsecond generation"
            assert second.id != first.id
            assert (await second.metrics()).pids >= 2  # the idle process and the ticking loop
            await second.run("rm second.txt")
            # reached by id as any sandbox (its container keeps the saved sandbox's id)
            other = await pykata.AsyncSandbox.connect(second.id)
            try:
                assert (await other.run("cat hello.txt")).text == "prepared"
            finally:
                await other.close()
        finally:
            await second.close()
        assert (await first.run("cat second.txt")).text == "second generation"
    finally:
        await first.close()


INTERRUPT_DURING_RESTORE = r"""
import asyncio, json, os, signal, sys, threading
import pykata
from pykata.sandbox import sandbox, snapshot

made = []
real_new_id = sandbox.new_id
def spy():
    made.append(real_new_id())
    return made[-1]
sandbox.new_id = spy

async def interrupted(agent):
    # the VM runs and its agent answers; Ctrl-C arrives before the restore is done
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(120)

snapshot.sync_guest_clock = interrupted
try:
    pykata.Sandbox.restore(sys.argv[1])
    outcome = "restored"
except KeyboardInterrupt:
    outcome = "interrupted"
print(json.dumps({"outcome": outcome, "threads": [t.name for t in threading.enumerate()], "made": made}))
"""


def test_ctrl_c_during_restore_leaves_nothing(saved: tuple[Path, dict[str, Any]]) -> None:
    p = subprocess.Popen([sys.executable, "-c", INTERRUPT_DURING_RESTORE, str(saved[0])], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err.decode()[-3000:]
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert got["outcome"] == "interrupted" and got["threads"] == ["MainThread"]
    # its sandbox directory is gone, which the teardown removes only after the VM and the mounts
    assert len(got["made"]) == 1 and not _left_of(got["made"])
