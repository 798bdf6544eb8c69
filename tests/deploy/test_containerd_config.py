"""pykata's runtime handler in containerd's configuration: added as one marked block (the admin's text
kept byte-for-byte), idempotent, backed up once, removed back to the backup; versions 1/2/3; bad input
refused naming the file and field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pykata.deploy import containerd_config as cc

CONFIG_PATH = "/opt/pykata/etc/configuration.toml"

V2 = """version = 2
root = "/var/lib/containerd"   # a comment the admin wrote

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
V3 = """version = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
"""
V1 = """[plugins.cri.containerd]
  snapshotter = "overlayfs"
"""


@pytest.mark.parametrize("text,version,plugin", [
    (V2, 2, "io.containerd.grpc.v1.cri"), (V3, 3, "io.containerd.cri.v1.runtime"), (V1, 1, "cri"),
    (V2.rstrip("\n"), 2, "io.containerd.grpc.v1.cri"),  # no final newline
])
def test_merge_is_idempotent_keeps_the_rest_and_removes_back_to_the_backup(
        tmp_path: Path, text: str, version: int, plugin: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    plan = cc.merge(path, CONFIG_PATH)
    assert plan.version == version and plan.text is not None
    merged = path.read_text()
    assert merged.startswith(text) and cc.BEGIN in merged  # the admin's bytes first, untouched
    data = tomllib.loads(merged)
    pykata = data["plugins"][plugin]["containerd"]["runtimes"]["pykata"]
    assert pykata["runtime_type"] == "io.containerd.pykata.v2"
    assert pykata["options"]["ConfigPath"] == CONFIG_PATH
    assert cc.backup_path(path).read_text() == text and path.stat().st_mode & 0o777 == 0o600
    assert cc.backup_path(path).stat().st_mode & 0o777 == 0o600

    # a second install changes nothing, and never touches the backup
    cc.backup_path(path).write_text(text)  # same content, new mtime: it must not be rewritten
    before = cc.backup_path(path).stat().st_mtime_ns
    again = cc.merge(path, CONFIG_PATH)
    assert again.text is None and "already" in again.message
    assert path.read_text() == merged and cc.backup_path(path).stat().st_mtime_ns == before

    # another prefix: the block is replaced in place, the backup stays the original
    cc.merge(path, "/opt/other/etc/configuration.toml")
    assert path.read_text() == merged.replace(CONFIG_PATH, "/opt/other/etc/configuration.toml")
    assert cc.backup_path(path).read_text() == text

    removed = cc.remove(path)
    assert "equals its backup" in removed.message
    assert path.read_bytes() == text.encode() and not cc.backup_path(path).exists()
    assert path.stat().st_mode & 0o777 == 0o600
    assert cc.remove(path).text is None  # a second uninstall is a no-op


def test_missing_config_is_created_and_removed_again(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    cc.merge(path, CONFIG_PATH)
    assert tomllib.loads(path.read_text())["version"] == 2 and cc.created_path(path).exists()
    assert cc.merge(path, CONFIG_PATH).text is None
    cc.remove(path)
    assert not path.exists() and not cc.created_path(path).exists()


def test_an_install_stopped_after_the_backup_reruns(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(V2)
    cc.backup_path(path).write_text(V2)  # the backup was made, the change was not
    cc.merge(path, CONFIG_PATH)
    assert cc.backup_path(path).read_text() == V2
    cc.remove(path)
    assert path.read_text() == V2


def test_an_admin_edit_after_the_install_is_kept_on_removal(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(V2)
    cc.merge(path, CONFIG_PATH)
    path.write_text(path.read_text().replace('level = "info"', "") + '\n[debug]\n  level = "debug"\n')
    plan = cc.remove(path)
    assert "changed since the install" in plan.message and cc.backup_path(path).exists()
    assert path.read_text() == V2 + '\n[debug]\n  level = "debug"\n'


@pytest.mark.parametrize("text,needle", [
    ("version = 4\n", "version = 4: pykata knows containerd configuration versions 1, 2 and 3"),
    ('version = "2"\n', "version = '2'"),
    ("version = 2\n[plugins\n", "not valid TOML"),
    (V2 + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]\n'
          '  runtime_type = "io.containerd.runc.v2"\n',
     'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata.runtime_type is \'io.containerd.runc.v2\''),
    (V2 + cc.BEGIN + "\n", "has no end marker"),
    # an inline table cannot take a table appended below it: refused rather than written
    ('version = 2\nplugins = {"io.containerd.grpc.v1.cri" = {containerd = {snapshotter = "x"}}}\n', "by hand"),
])
def test_bad_configurations_are_refused_naming_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(cc.ContainerdConfigError) as e:
        cc.merge(path, CONFIG_PATH)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)
    assert path.read_text() == text and not cc.backup_path(path).exists()


def test_a_hand_written_pykata_handler_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = V2 + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]\n' \
                '  runtime_type = "io.containerd.pykata.v2"\n'
    path.write_text(text)
    assert "by hand" in cc.merge(path, CONFIG_PATH).message
    assert path.read_text() == text and not cc.backup_path(path).exists()
    assert cc.remove(path).text is None and path.read_text() == text


def test_a_config_path_that_would_break_the_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(V2)
    with pytest.raises(cc.ContainerdConfigError, match="ConfigPath"):
        cc.merge(path, '/opt/x"\n[evil]')
    assert path.read_text() == V2
