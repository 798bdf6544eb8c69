"""The agent's side of copied volumes (pykata.agent.volumesync), on a temp directory of the host (plain
file operations only: no mount): the checks of what the host sends, and updates applied in kubelet's
order, so that a reader never sees a mix of two versions."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from pykata.agent import volumesync
from pykata.errors import InvalidArgument
from pykata.protocols.agent import agent_pb2
from pykata.resources import watchable
from tests.kubeletvolume import write_volume

D, F, L = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK


def _e(path: str, kind: int, data: bytes = b"", perm: int = 0o644) -> agent_pb2.VolumeEntry:
    return agent_pb2.VolumeEntry(path=path, mode=kind | perm, uid=os.getuid(), gid=os.getgid(), data=data)


@pytest.mark.parametrize(("entries", "field"), [
    ([_e("a", F, b"x")], "root"),
    ([_e("", D), _e("../x", F)], "entries[1].path"),
    ([_e("", D), _e("a/./b", F)], "entries[1].path"),
    ([_e("", D), _e("/abs", F)], "entries[1].path"),
    ([_e("", D), _e("a/b", F)], "no parent"),
    ([_e("", D), _e("f", F), _e("f/x", F)], "no parent"),
    ([_e("", D), _e("x", F, perm=0o4755)], "entries[1].mode"),
    ([_e("", D), agent_pb2.VolumeEntry(path="dev", mode=stat.S_IFCHR | 0o600)], "entries[1].mode"),
    ([_e("", D), _e("l", L, b"")], "entries[1].data"),
    ([_e("", D), _e("l", L, b"a\0b")], "entries[1].data"),
    ([_e("", D), _e("x", F), _e("x", F)], "twice"),
    ([_e("", D), _e(".pykata-sync.x", F)], "entries[1].path"),
    ([_e("", D), _e("big", F, b"x" * (volumesync.MAX_BYTES + 1))], "bytes"),
])
def test_bad_trees_are_refused_naming_the_entry(entries: list[agent_pb2.VolumeEntry], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        volumesync.check_entries(entries)


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = os.fsencode(os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else b""
            out[str(p.relative_to(root))] = (st.st_mode, data)
    return out


def test_updates_follow_the_host_and_readers_never_see_a_mix(tmp_path: Path) -> None:
    host, guest = tmp_path / "host", tmp_path / "guest"
    guest.mkdir()
    versions = [{"a": b"a%d" % i, "b": b"b%d" % i, **({"extra": b"e"} if i % 3 == 0 else {})} for i in range(30)]
    write_volume(host, versions[0])
    volumesync.apply(guest, volumesync.check_entries(watchable.scan(str(host), 64, 1 << 20)[0]))
    assert _tree(guest) == _tree(host)
    assert (guest / "a").read_bytes() == b"a0"
    mixes: list[tuple[bytes, bytes]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            # kubelet's promise: what `..data` names, taken once, is one whole version
            try:
                fd = os.open(guest / "..data", os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                mixes.append((b"no ..data", b""))
                continue
            try:
                version = Path(f"/proc/self/fd/{fd}")
                a, b = (version / "a").read_bytes(), (version / "b").read_bytes()
            except FileNotFoundError:
                continue  # the old version went after it was taken (so under kubelet too)
            finally:
                os.close(fd)
            if a[1:] != b[1:]:
                mixes.append((a, b))
            # and a key read by its own name is always there
            if not (guest / "a").exists():
                mixes.append((b"a missing", b""))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for files in versions[1:]:
            write_volume(host, files)
            volumesync.apply(guest, volumesync.check_entries(watchable.scan(str(host), 64, 1 << 20)[0]))
            assert _tree(guest) == _tree(host)
    finally:
        done.set()
        reader.join()
    assert mixes == []
    # nothing left over: exactly one version directory, no part files
    assert len([p for p in guest.iterdir() if p.name.startswith("..20")]) == 1
    assert not [p for p in guest.rglob("*") if p.name.startswith(volumesync.PART_PREFIX)]


def test_type_changes_and_unchanged_files(tmp_path: Path) -> None:
    root = tmp_path / "g"
    root.mkdir()
    volumesync.apply(root, volumesync.check_entries([_e("", D, perm=0o755), _e("d", D, perm=0o755),
                                                     _e("d/f", F, b"1"), _e("x", F, b"x")]))
    ino = (root / "x").stat().st_ino
    assert volumesync.apply(root, volumesync.check_entries([_e("", D, perm=0o755), _e("d", F, b"now a file"),
                                                            _e("x", F, b"x")])) == 1
    assert (root / "d").read_bytes() == b"now a file" and (root / "x").stat().st_ino == ino
    volumesync.apply(root, volumesync.check_entries([_e("", D, perm=0o750), _e("d", L, b"/etc")]))
    assert os.readlink(root / "d") == "/etc" and not (root / "x").exists()
    assert stat.S_IMODE(root.stat().st_mode) == 0o750


_OVER_THE_BOUND = r"""
import os, resource, signal, sys
from pathlib import Path
from pykata.agent import volumesync
from pykata.protocols.agent import agent_pb2
D, F = 0o040000, 0o100000
def tree(*entries):
    return volumesync.check_entries([agent_pb2.VolumeEntry(path=p, mode=k | 0o644 | (0o111 if k == D else 0),
                                     uid=os.getuid(), gid=os.getgid(), data=d) for p, k, d in entries])
root = Path(sys.argv[1])
v1 = tree(("", D, b""), ("a", F, b"a1"), ("b", F, b"b1"), ("d", D, b""), ("d/x", F, b"x1"))
v2 = tree(("", D, b""), ("a", F, b"a2"), ("b", F, b"B" * (2 << 20)), ("c", F, b"new"), ("d", D, b""))
volumesync.apply(root, v1)
# the room of this process's files: 1 MiB (as a full tmpfs would refuse the write), an update over it
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    volumesync.apply(root, v2, v1)
except OSError as exc:
    print("refused:", exc.strerror)
"""


def test_an_update_over_the_bound_is_all_or_nothing(tmp_path: Path) -> None:
    """kubelet's AtomicWriter makes an update whole or not at all. An update that could not be written
    whole (a file over the room it has: here a 2 MiB key under a 1 MiB RLIMIT_FSIZE, in a child process)
    was left half applied (`a` new, `b` old, the part file left), and stayed so when the next update was
    too big to copy. Now the last tree applied is put back exactly."""
    import subprocess
    import sys

    root = tmp_path / "vol"
    root.mkdir()
    src = str(Path(__file__).resolve().parents[2] / "src")
    child = subprocess.run([sys.executable, "-c", _OVER_THE_BOUND, str(root)], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": src})
    assert child.returncode == 0, child.stderr
    assert "refused: File too large (file 'b')" in child.stdout  # the step and path: all the host's log shows
    got = {k: v[1] for k, v in _tree(root).items()}
    assert got == {"a": b"a1", "b": b"b1", "d": b"", "d/x": b"x1"}, got  # v1 exactly: no half, no leftovers


class FakeStorages:
    """A fake of the agent's Storages: the volume's tmpfs is a plain directory."""

    def has_pod_volume(self, where: str) -> bool:
        return Path(where).exists()

    def mount(self, storage: agent_pb2.Storage, owner: str) -> None:
        Path(storage.mount_point).mkdir(parents=True, exist_ok=True)


def test_a_sync_cancelled_mid_apply_finishes_before_the_next_one_applies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SyncVolume handler cancelled while its worker thread writes (the host's session gone) must
    not let the next call's tree be applied beside that thread, or before it: the newer tree wins."""
    import asyncio

    from pykata.agent.service import AgentService
    from pykata.agent.settings import AgentSettings

    svc = AgentService(AgentSettings(state_dir=tmp_path / "state", shared_dir=tmp_path / "shared"))
    svc._storages = FakeStorages()  # type: ignore[assignment]
    requests = []
    for version in (1, 2):
        host = tmp_path / f"host{version}"
        # over volumesync.INLINE_BYTES: applied in a worker thread
        write_volume(host, {"key": b"v%d" % version, "big": b"x" * (volumesync.INLINE_BYTES + 1)})
        entries = watchable.scan(str(host), 64, 1 << 20)[0]
        requests.append(agent_pb2.SyncVolumeRequest(name="cfg", size=1 << 20, entries=entries))
    events: list[str] = []
    first_started, release = threading.Event(), threading.Event()
    real_apply = volumesync.apply

    def slow_first_apply(where: Path, tree: dict[str, agent_pb2.VolumeEntry],
                         previous: dict[str, agent_pb2.VolumeEntry] | None = None, *, fresh: bool = False) -> None:
        n = sum(e.startswith("start") for e in events) + 1
        events.append(f"start{n}")
        if n == 1:
            first_started.set()
            release.wait(10)
        real_apply(where, tree, previous, fresh=fresh)
        events.append(f"end{n}")

    monkeypatch.setattr(volumesync, "apply", slow_first_apply)

    async def main() -> None:
        first = asyncio.ensure_future(svc.SyncVolume(requests[0], None))  # type: ignore[arg-type]
        assert await asyncio.to_thread(first_started.wait, 10)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(svc.SyncVolume(requests[1], None))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        assert events == ["start1"]  # the second waits for the first call's thread
        release.set()
        await asyncio.wait_for(second, 10)

    asyncio.run(main())
    assert events == ["start1", "end1", "start2", "end2"]
    assert (svc.settings.pod_volume_dir / "cfg" / "key").read_bytes() == b"v2"


def test_a_first_copy_into_a_fresh_volume_is_made_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume's first tree goes into the tmpfs its call just mounted, which nobody sees yet: each entry
    is made at its name (no scan, no aside copy, no rename); a failure still leaves nothing."""
    root = tmp_path / "vol"
    root.mkdir()
    renames: list[str] = []
    real_rename = os.rename

    def counting_rename(src: str, dst: str, **kw: int) -> None:
        renames.append(src)
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", counting_rename)
    cri = volumesync.check_entries([_e("", D, perm=0o755), _e("hostname", F, b"pod\n"),
                                    _e("hosts", F, b"127.0.0.1 localhost\n"), _e("d", D, perm=0o755),
                                    _e("d/..data", L, b"x"), _e("d/k", L, b"..data/k")])
    assert volumesync.apply(root, cri, fresh=True) == 5
    assert renames == []
    got = _tree(root)
    assert {k: v[1] for k, v in got.items()} == {"hostname": b"pod\n", "hosts": b"127.0.0.1 localhost\n", "d": b"",
                                                  "d/..data": b"x", "d/k": b"..data/k"}
    assert stat.S_IMODE(got["hosts"][0]) == 0o644
    # an update is still made aside and renamed into place
    volumesync.apply(root, volumesync.check_entries([_e("", D, perm=0o755), _e("hostname", F, b"other\n")]), cri)
    assert renames and (root / "hostname").read_bytes() == b"other\n" and not (root / "hosts").exists()
    # a fresh copy that fails half way leaves the volume empty
    again = tmp_path / "again"
    again.mkdir()
    monkeypatch.setattr(os, "symlink", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match=r"symlink 'd/\.\.data'"):
        volumesync.apply(again, cri, fresh=True)
    assert list(again.iterdir()) == []


def test_a_small_tree_is_applied_in_the_call_and_never_overtakes_a_large_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SyncVolume applies a small tree (a CRI pod's /etc files) in the loop turn that read the call: it
    answers at once, no worker thread. A large tree goes to a worker thread, and a small call of the
    same volume that comes meanwhile waits behind it (the host's newer tree wins)."""
    import asyncio

    from google.protobuf.empty_pb2 import Empty

    from pykata.agent.service import AgentService
    from pykata.agent.settings import AgentSettings

    svc = AgentService(AgentSettings(state_dir=tmp_path / "state", shared_dir=tmp_path / "shared"))
    svc._storages = FakeStorages()  # type: ignore[assignment]

    def request(name: str, **files: bytes) -> agent_pb2.SyncVolumeRequest:
        return agent_pb2.SyncVolumeRequest(name=name, size=1 << 20, entries=[
            _e("", D, perm=0o755), *(_e(k, F, v) for k, v in files.items())])

    in_loop_thread: list[bool] = []  # per apply, in order
    loop_thread = threading.get_ident()
    real = volumesync.apply

    def noting(*a: object, **kw: object) -> int:
        in_loop_thread.append(threading.get_ident() == loop_thread)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(volumesync, "apply", noting)

    async def main() -> None:
        answer = svc.SyncVolume(request("cri-files", hosts=b"127.0.0.1 localhost\n"), None)
        assert isinstance(answer, Empty) and in_loop_thread == [True]  # answered in this very call and thread
        big = svc.SyncVolume(request("cfg", key=b"x" * (volumesync.INLINE_BYTES + 1)), None)
        assert not isinstance(big, Empty)
        small = svc.SyncVolume(request("cfg", key=b"small"), None)
        assert not isinstance(small, Empty)  # behind the large one
        await asyncio.wait_for(asyncio.gather(big, small), 10)  # type: ignore[arg-type]
        assert in_loop_thread == [True, False, False]

    asyncio.run(main())
    vols = svc.settings.pod_volume_dir
    assert (vols / "cri-files" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert (vols / "cfg" / "key").read_bytes() == b"small"
    assert svc._volume_calls == {"cfg": 0}
