"""`containerd-shim-pykata-v2 delete` cleans up with the configuration its shim ran with.

containerd passes the runtime options (ConfigPath) to `start` only. A node whose options name a
configuration with another runtime_dir used to keep its dead shims' VMs, mounts, sandbox directories and
cgroups: `delete` looked for them under the default runtime_dir. `start` now records the configuration in
the bundle (pykata.shim.configrecord) and `delete` believes the record only when the shim could have
written it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pykata.config import CONFIG_PATH_ANNOTATION, load_config
from pykata.config.load import find_config_path, packaged_default_text
from pykata.shim.configrecord import (
    MAX_RECORD_BYTES,
    POD_CONFIG_ANNOTATION,
    RECORD_NAME,
    ConfigRecord,
    load_for_delete,
    load_recorded,
    may_have_leftovers,
    read_record,
)
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd, missing_prerequisites, running_with_busybox


def _config_with_runtime_dir(directory: Path, runtime_dir: Path) -> Path:
    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    assert '\nruntime_dir = "/run/pykata"\n' in text
    path = directory / "configuration.toml"
    path.write_text(text.replace('\nruntime_dir = "/run/pykata"\n', f'\nruntime_dir = "{runtime_dir}"\n'))
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Containerd, Path, Path]]:
    """A private containerd, started with the default configuration in its environment; its pods name
    another configuration (own runtime_dir) through the runtime options, as ConfigPath does."""
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the shim tests need {missing}")
    directory = tmp_path_factory.mktemp("delcfg")
    runtime_dir = directory / "run"
    config = _config_with_runtime_dir(directory, runtime_dir)
    assert load_config().runtime.runtime_dir != str(runtime_dir)  # what `delete` read before the record
    with running_with_busybox(Containerd(directory / "ctd"), tmp_path_factory.mktemp("cache")) as ctd:
        yield ctd, config, runtime_dir
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if str(runtime_dir) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers


def _vm_processes(sandbox_dir: Path, cid: str) -> list[psutil.Process]:
    marks = (str(sandbox_dir) + "/", f"pykata-{cid},")
    return [p for p in psutil.process_iter(["cmdline"])
            if any(m in " ".join(p.info["cmdline"] or []) for m in marks)
            and any(k in " ".join(p.info["cmdline"] or []) for k in ("qemu-system", "virtiofsd"))]


def _mounts(under: Path) -> list[str]:
    return [ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {under}/" in ln]


def _wait_for(cond: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(cond())  # type: ignore[operator]


@pytest.mark.vm
@pytest.mark.usefixtures("prerequisites")
def test_dead_shim_of_a_config_path_pod_is_cleaned_up(node: tuple[Containerd, Path, Path]) -> None:
    ctd, config, runtime_dir = node
    cid = f"delcfg-{uuid.uuid4().hex[:8]}"
    sandbox_dir = runtime_dir / "sandboxes" / cid
    try:
        ctd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, "--runtime-config-path", str(config), IMAGE, cid,
                "sleep", "1000")
        bundle = ctd.bundle(cid)
        record = bundle / RECORD_NAME
        assert stat.S_IMODE(record.stat().st_mode) == 0o600 and record.stat().st_uid == os.geteuid()
        assert json.loads(record.read_text())["config"] == str(config)
        assert sandbox_dir.is_dir() and _vm_processes(sandbox_dir, cid)
        cgroup_record = runtime_dir / "cgroups" / f"{cid}.json"
        assert cgroup_record.exists()
        cgroups = [Path(d) for d in json.loads(cgroup_record.read_text())]
        assert cgroups and all(d.is_dir() for d in cgroups)
        shim_pid = int((bundle / "shim.pid").read_text())
        os.kill(shim_pid, signal.SIGKILL)
        # containerd sees the shim's connection drop and runs `delete` (no runtime options) itself
        assert _wait_for(lambda: not _vm_processes(sandbox_dir, cid)), "the VM outlived its shim"
        assert _wait_for(lambda: not _mounts(sandbox_dir)), _mounts(sandbox_dir)
        assert _wait_for(lambda: not sandbox_dir.exists()), sorted(os.listdir(sandbox_dir))
        # `delete` removes the sandbox directory first, then the cgroups and their record
        assert _wait_for(lambda: not cgroup_record.exists()), cgroup_record
        assert not [d for d in cgroups if d.exists()], cgroups
        ctd.ctr("task", "rm", "-f", cid, check=False)
        ctd.ctr("container", "rm", cid)
        assert cid not in ctd.ctr("container", "ls", "-q").stdout.decode().split()
        assert not _mounts(runtime_dir) and not _vm_processes(sandbox_dir, cid)
    finally:
        ctd.remove(cid)


def _record(bundle: Path, body: object, mode: int = 0o600) -> Path:
    path = bundle / RECORD_NAME
    path.write_text(json.dumps(body))
    path.chmod(mode)
    return path


GOOD = {"config": "", "sha256": "", "runtime_dir": "/run/pykata-elsewhere", "pool": False}


def test_record_believed_only_as_the_shim_writes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert read_record(tmp_path)[0] is None  # none at all
    _record(tmp_path, GOOD)
    record, why = read_record(tmp_path)
    assert record is not None and record.runtime_dir == "/run/pykata-elsewhere" and why == ""
    assert load_recorded(tmp_path, *read_record(tmp_path)).runtime.runtime_dir == "/run/pykata-elsewhere"

    _record(tmp_path, GOOD, mode=0o622)  # writable by others: anyone could have put it there
    assert "not written by the shim" in read_record(tmp_path)[1]
    (tmp_path / RECORD_NAME).unlink()
    (tmp_path / "elsewhere").mkdir()
    target = _record(tmp_path / "elsewhere", GOOD)
    (tmp_path / RECORD_NAME).symlink_to(target)  # a symlink to a file the pod chose
    assert read_record(tmp_path)[0] is None
    (tmp_path / RECORD_NAME).unlink()
    for bad in ({**GOOD, "runtime_dir": "relative"}, {**GOOD, "config": 7}, {**GOOD, "pool": 1}, ["x"],
                {**GOOD, "pad": "x" * MAX_RECORD_BYTES}):
        _record(tmp_path, bad)
        assert read_record(tmp_path)[0] is None, bad
    capsys.readouterr()
    default = load_config().runtime.runtime_dir
    assert load_recorded(tmp_path, *read_record(tmp_path)).runtime.runtime_dir == default
    assert f"{RECORD_NAME}: larger than {MAX_RECORD_BYTES} bytes; using the default configuration" \
        in capsys.readouterr().err


def test_record_of_a_config_that_no_longer_loads_keeps_its_runtime_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = tmp_path / "gone.toml"
    _record(tmp_path, {"config": str(gone), "sha256": "0" * 64, "runtime_dir": "/run/pykata-gone", "pool": False})
    assert load_recorded(tmp_path, *read_record(tmp_path)).runtime.runtime_dir == "/run/pykata-gone"
    assert "no longer loads" in capsys.readouterr().err


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_delete_loads_the_configuration_only_when_something_may_be_left(tmp_path: Path) -> None:
    run = tmp_path / "run"
    record = ConfigRecord("", "", str(run), pool=False)
    assert not may_have_leftovers(record, "sb")  # an orderly exit removed all of it
    pooled = ConfigRecord("", "", str(run), pool=True)
    assert not may_have_leftovers(pooled, "sb")  # no pool directory
    (run / "pool" / "pool-a").mkdir(parents=True)  # a waiting entry: refills prune those
    (run / "pool" / "pool-a.json").write_text("{}")
    (run / "pool" / "pool-a.sock").write_text("")  # its socket
    (run / "pool" / "pool-b").mkdir()  # a claimed VM whose owner lives
    (run / "pool" / "pool-b" / "state.json").write_text(json.dumps({"owner_pid": os.getpid()}))
    assert not may_have_leftovers(pooled, "sb")
    (run / "pool" / "pool-c").mkdir()  # a claimed VM whose shim died before it had a sandbox id
    (run / "pool" / "pool-c" / "state.json").write_text(json.dumps({"owner_pid": _dead_pid()}))
    assert may_have_leftovers(pooled, "sb")
    (run / "pool" / "pool-c" / "state.json").write_text("{")  # unreadable: the full cleanup judges it
    assert may_have_leftovers(pooled, "sb")
    shutil.rmtree(run / "pool" / "pool-c")
    (run / "cgroups").mkdir(parents=True)
    (run / "cgroups" / "sb.json").write_text("[]")
    assert may_have_leftovers(record, "sb")
    (run / "cgroups" / "sb.json").unlink()
    (run / "sandboxes").mkdir()
    (run / "sandboxes" / "sb").symlink_to(tmp_path / "nowhere")  # lexists: the full cleanup judges it
    assert may_have_leftovers(record, "sb")


def test_a_pods_own_allowed_configuration_is_used_as_the_shim_used_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert POD_CONFIG_ANNOTATION == CONFIG_PATH_ANNOTATION
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o755)
    allowed.chmod(0o755)
    node = _config_with_runtime_dir(tmp_path, tmp_path / "node-run")
    text = node.read_text()
    node.write_text(text.replace("\nvalid_config_paths = []\n", f'\nvalid_config_paths = ["{allowed}"]\n'))
    pod = _config_with_runtime_dir(allowed, tmp_path / "pod-run")
    pod.chmod(0o644)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _record(bundle, {"config": str(node), "sha256": "", "runtime_dir": str(tmp_path / "node-run"), "pool": False})
    record, why = read_record(bundle)
    assert load_for_delete(bundle, record, why, {}).runtime.runtime_dir == str(tmp_path / "node-run")
    chosen = load_for_delete(bundle, record, why, {POD_CONFIG_ANNOTATION: str(pod)})
    assert chosen.runtime.runtime_dir == str(tmp_path / "pod-run")
    capsys.readouterr()
    # a file outside the allowed directories: the shim refused it, so the pod ran under the node's
    refused = load_for_delete(bundle, record, why, {POD_CONFIG_ANNOTATION: str(node)})
    assert refused.runtime.runtime_dir == str(tmp_path / "node-run")
    assert "the pod's configuration is not used" in capsys.readouterr().err


def test_a_sandbox_id_annotation_that_leaves_the_runtime_dir_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pykata.errors import InvalidArgument
    from pykata.shim.bootstrap import CRI_CONTAINER_TYPE, CRI_SANDBOX_ID, DELETED_STATUS, delete, sandbox_id_of
    from pykata.shim.flags import Flags

    evil = {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "../../victim"}
    with pytest.raises(InvalidArgument, match=CRI_SANDBOX_ID):
        sandbox_id_of("c1", evil)  # `start` fails naming the annotation
    run = tmp_path / "run"
    (run / "sandboxes").mkdir(parents=True)
    victim = tmp_path / "victim"  # run/sandboxes/../../victim
    victim.mkdir()
    (victim / "state.json").write_text("{}")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": evil}))
    _record(bundle, {"config": "", "sha256": "", "runtime_dir": str(run), "pool": False})
    reply = delete(Flags(id="c1", namespace="ns", address=str(tmp_path / "ctd.sock"), bundle=str(bundle)))
    assert reply.startswith(b"\x10" + bytes([DELETED_STATUS]))  # the DeleteResponse all the same
    assert (victim / "state.json").exists()
    assert CRI_SANDBOX_ID in capsys.readouterr().err


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether `pid` is gone or a zombie within `seconds` (the kill's psutil wait may reap this test's
    child itself, so Popen.wait would see no status)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_delete_kills_a_dead_shims_vm_before_loading_the_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd kills `delete` after 5 s; on a loaded host the configuration's load and the cleanup's
    imports could take all of them, and the dead shim's QEMU and virtiofsd then ran on (bench/churn.py,
    virtio-fs pods whose shim was SIGKILLed at load 15). The VM's recorded processes die first."""
    from pykata.hypervisor import owned
    from pykata.shim import bootstrap
    from pykata.shim.flags import Flags

    run = tmp_path / "run"
    vm = run / "sandboxes" / "sb1" / "vm"
    vm.mkdir(parents=True)
    dead_owner = {"id": "sb1", "owner_pid": _dead_pid(), "created_at": 0.0}
    (run / "sandboxes" / "sb1" / "state.json").write_text(json.dumps(dead_owner))
    stand_in = subprocess.Popen(["sleep", "60"])  # stands in for the VM's QEMU
    try:
        owned.record(vm, stand_in.pid)
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
        _record(bundle, {"config": "", "sha256": "", "runtime_dir": str(run), "pool": False})
        (bundle / "shim.pid").write_text(str(_dead_pid()))
        at_load: list[bool] = []

        def fake_slow_load(*args: object) -> None:  # a fake: the load that containerd's 5 s ran out in
            at_load.append(_ends_within(stand_in.pid, 10))
            raise TimeoutError("fake: containerd killed delete here")

        monkeypatch.setattr(bootstrap, "load_for_delete", fake_slow_load)
        with pytest.raises(TimeoutError, match="fake"):
            bootstrap.delete(Flags(id="sb1", namespace="ns", address=str(tmp_path / "ctd.sock"), bundle=str(bundle)))
        assert at_load == [True]  # ended before the load began
    finally:
        stand_in.kill()
        stand_in.wait()


def test_delete_leaves_a_live_owners_vm_of_the_same_id(tmp_path: Path) -> None:
    """The same sandbox id in another namespace, its owner alive: the early kill leaves its VM alone."""
    from pykata.hypervisor import owned
    from pykata.shim.bootstrap import _kill_vm_first

    directory = tmp_path / "run" / "sandboxes" / "sb1"
    (directory / "vm").mkdir(parents=True)
    (directory / "state.json").write_text(json.dumps({"id": "sb1", "owner_pid": os.getpid(), "created_at": 0.0}))
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        owned.record(directory / "vm", stand_in.pid)
        _kill_vm_first(directory, _dead_pid())
        assert not _ends_within(stand_in.pid, 0.5)
        _kill_vm_first(directory, os.getpid())  # the owner itself died: its VM goes
        assert _ends_within(stand_in.pid, 10)
    finally:
        stand_in.kill()
        stand_in.wait()
