"""containerd's CRI files (/etc/hosts, /etc/hostname, /etc/resolv.conf) copied into the guest
(pykata.resources.crifiles): which binds qualify, and what is read of them on the host."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pykata.agent.volumesync import check_entries
from pykata.resources import crifiles

SB = "a" * 64
DIR = f"/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SB}"


def _bind(source: str, destination: str) -> dict[str, object]:
    return {"destination": destination, "type": "bind", "source": source, "options": ["rbind", "rprivate", "rw"]}


@pytest.mark.parametrize("name", sorted(crifiles.CRI_FILES))
def test_containerds_binds_of_the_pods_own_files_qualify(name: str) -> None:
    assert crifiles.cri_file(_bind(f"{DIR}/{name}", crifiles.CRI_FILES[name]), SB) == name


@pytest.mark.parametrize("mount", [
    _bind(f"{DIR}/hosts", "/etc/hostname"),                       # another destination
    _bind(f"{DIR}/hosts", "/data/hosts"),
    _bind(DIR.replace(SB, "b" * 64) + "/hosts", "/etc/hosts"),    # another pod's file
    _bind(f"{DIR}/../{SB}/hosts", "/etc/hosts"),                  # not a plain path
    _bind(f"{DIR}/shm", "/dev/shm"),
    _bind("/srv/hosts", "/etc/hosts"),                            # a hostPath volume on /etc/hosts
    {"destination": "/etc/hosts", "type": "tmpfs", "source": f"{DIR}/hosts"},
    "not a mount",
])
def test_any_other_bind_stays_shared(mount: object) -> None:
    assert crifiles.cri_file(mount, SB) is None


def test_the_files_are_read_as_a_volume_tree(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "hostname").write_text("pod\n")
    os.chmod(tmp_path / "hostname", 0o600)
    (tmp_path / "shm").mkdir()  # containerd's other entries are not read
    tree = check_entries(crifiles.entries(str(tmp_path)))
    assert sorted(tree) == ["", "hostname", "hosts"]  # no resolv.conf: none there
    assert tree["hosts"].data == b"127.0.0.1 localhost\n" and tree["hostname"].mode == stat.S_IFREG | 0o600


@pytest.mark.parametrize("make, why", [
    (lambda p: p.symlink_to("/etc/shadow"), "Too many levels of symbolic links"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_bytes(b"x" * (crifiles.MAX_FILE_BYTES + 1)), "larger than"),
])
def test_a_file_that_is_no_plain_small_file_is_not_copied(tmp_path: Path, make: object, why: str) -> None:
    make(tmp_path / "hosts")  # type: ignore[operator]
    with pytest.raises(crifiles.Unsuitable, match=why):
        crifiles.entries(str(tmp_path))


def test_the_volume_name_is_a_pod_volume_name() -> None:
    from pykata.agent.storage import POD_VOLUME_RE

    assert POD_VOLUME_RE.match(crifiles.volume_name(SB))
    assert crifiles.volume_name(SB) != crifiles.volume_name("b" * 64)
