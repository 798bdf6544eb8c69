"""A CRI pod's configmap/secret volumes are copied into the guest and follow kubelet's updates
(pykata.resources.watchable, pykata.agent.volumesync); volumes that cannot be copied safely stay
shared from the host.

kubelet is played by the test (tests/kubeletvolume.py writes as its AtomicWriter does) under a temp
directory that the admin configuration names as runtime.kubelet_root_dir."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import Cri, CriContainerd
from tests.cri.test_pod_config import _container, _pod, _pod_config, _sh
from tests.kubeletvolume import write_volume

pytestmark = [pytest.mark.vm]


KUBELET_RUNTIME_CONFIG = {"watchable_max_files": "4"}  # for tests/cri/conftest.py's kubelet_containerd


@pytest.fixture(scope="module")
def ctd(kubelet_containerd: CriContainerd) -> CriContainerd:
    return kubelet_containerd


def _volume(kubelet_root: Path, uid: str, plugin: str, name: str, files: dict[str, bytes]) -> Path:
    d = kubelet_root / "pods" / uid / "volumes" / plugin / name
    write_volume(d, files)
    d.chmod(0o755)
    return d


def _wait_for(cri: Cri, cid: str, script: str, want: str, timeout: float = 30, log: Path | None = None) -> float:
    """Seconds until `script` prints `want` (and exits 0) in the container. A probe that races an
    update may fail while waiting, as under runc: busybox `ls` stats every entry, the old `..<timestamp>`
    among them, which kubelet's writer (and the guest's copy of it) removes once `..data` is swapped.
    When it never does, the shim's warnings about the volumes in containerd's `log` go with the failure
    (a failed SyncVolume says there which step on which path failed)."""
    start = time.monotonic()
    while True:
        reply = cri.exec_sync(cid, ["sh", "-c", script])
        got = reply.stdout.decode()
        if reply.exit_code == 0 and got == want:
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            shim = [line for line in (log.read_text(errors="replace") if log else "").splitlines()
                    if "volume" in line and "level=warning" in line]
            raise AssertionError(f"{script!r} still prints {got!r} (exit {reply.exit_code}: {reply.stderr!r}), "
                                 f"not {want!r}; the shim's warnings: {shim[-5:]}")
        time.sleep(0.2)


def test_configmap_and_secret_are_copied_and_follow_updates(ctd: CriContainerd, kubelet_root: Path,
                                                             tmp_path: Path) -> None:
    name = f"wv-{uuid.uuid4().hex[:6]}"
    uid = f"uid-{name}"
    config = _pod_config(name)
    host_secret = tmp_path / "host-secret"
    host_secret.write_text("host only\n")
    cfg = _volume(kubelet_root, uid, "kubernetes.io~configmap", "cfg", {"a": b"one\n", "b": b"two\n"})
    sec = _volume(kubelet_root, uid, "kubernetes.io~secret", "sec", {"token": b"s3cret\n"})
    # the attack: entries pointing at host files; the host copies the link, never its target
    os.symlink(str(host_secret), sec / "evil")
    os.symlink("/", sec / "root")
    # a volume that cannot be copied (a FIFO in it, which kubelet never makes): shared from the host
    odd = _volume(kubelet_root, uid, "kubernetes.io~configmap", "odd", {"k": b"v\n"})
    os.mkfifo(odd / "pipe")
    # more files than runtime.watchable_max_files (4 here): shared from the host too
    big = _volume(kubelet_root, uid, "kubernetes.io~configmap", "big", {f"k{i}": b"v\n" for i in range(5)})
    mounts = [api_pb2.Mount(container_path=p, host_path=str(h), readonly=True)
              for p, h in (("/cfg", cfg), ("/sec", sec), ("/odd", odd), ("/big", big))]
    with Cri(ctd.socket) as cri, _pod(ctd, cri, "pykata", config) as pod_id:
        c0 = _container(cri, pod_id, config, "c0", mounts=mounts)
        c1 = _container(cri, pod_id, config, "c1", mounts=mounts[:1])
        # copied: a guest tmpfs, kubelet's layout, contents and modes
        # (9p reports the host file system's type)
        assert _sh(cri, c0, "stat -f -c %T /cfg /sec /odd").split()[:2] == ["tmpfs", "tmpfs"]
        assert _sh(cri, c0, "stat -f -c %T /odd /big").split() != ["tmpfs", "tmpfs"]
        assert _sh(cri, c0, "cat /big/k4") == "v\n"
        assert _sh(cri, c0, "cat /cfg/a /cfg/b /sec/token /odd/k") == "one\ntwo\ns3cret\nv\n"
        assert _sh(cri, c0, "readlink /cfg/a; stat -L -c %a /cfg/a") == "..data/a\n644\n"
        assert _sh(cri, c0, "readlink /sec/evil; cat /sec/evil 2>&1 || true; ls /sec/root/ | head -1") \
            .startswith(f"{host_secret}\ncat: can't open")
        # read-only, as under runc
        assert "Read-only file system" in _sh(cri, c0, "touch /cfg/x", ok=False)
        # kubelet updates: a changed key, a new one, a removed one; both containers see it. The guest
        # passes through kubelet's own intermediate states (the shim copies whatever held still while
        # read: `..data` swapped with the old keys' links still there, or the old `..<timestamp>` not
        # yet removed), so the wait is for the last one, which the other container must then show at once
        final = "cat /cfg/a /cfg/c 2>&1; ls /cfg; ls -a /cfg | grep -c '^\\.\\.20'"
        write_volume(cfg, {"a": b"one v2\n", "c": b"three\n"})
        took = _wait_for(cri, c1, final, "one v2\nthree\na\nc\n1\n", log=ctd.log)
        assert _sh(cri, c0, final) == "one v2\nthree\na\nc\n1\n"
        print(f"update seen in the guest after {took:.2f} s")
        # (to the end: the test's links evil and root go; the next update is not applied, see below)
        write_volume(sec, {"token": b"rotated\n"})
        _wait_for(cri, c0, "cat /sec/token; ls /sec; ls -a /sec | grep -c '^\\.\\.20'", "rotated\ntoken\n1\n",
                  log=ctd.log)
        # an update past the bounds is not applied: the guest keeps its last copy (the shim logs it once)
        write_volume(sec, {f"t{i}": b"x\n" for i in range(5)})
        time.sleep(3)
        assert _sh(cri, c0, "cat /sec/token; ls /sec") == "rotated\ntoken\n"
    # the host directories are as kubelet left them: the guest never wrote there
    assert (cfg / "a").read_bytes() == b"one v2\n"
    assert sorted(p.name for p in cfg.iterdir() if not p.name.startswith("..")) == ["a", "c"]
    assert host_secret.read_text() == "host only\n"
