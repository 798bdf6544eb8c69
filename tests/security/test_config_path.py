"""Attacks through `io.katacontainers.config_path`, at the loader (the shim-level ones are in
test_pod_config_attacks.py): a pod author names a file it made appear on the node, or a host file whose
parse error would show its content. Each is refused naming the annotation, nothing is read beyond what
the check needs, and the error never quotes the file."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.config import load_for_annotations, load_pod_config_file
from pykata.errors import ConfigError

FIELD = "io.katacontainers.config_path"
GOOD = "[hypervisor.qemu]\ndefault_memory = 512\n"


@pytest.fixture
def allowed(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "allowed"
    directory.mkdir(mode=0o755)
    (directory / "ok.toml").write_text(GOOD)
    before = _tree(tmp_path)
    yield directory
    # no attack may create anything (the loader only reads)
    assert _tree(tmp_path) == before


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _refused(path: str | Path, allowed_dirs: tuple[str, ...], *why: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_pod_config_file(str(path), allowed_dirs)
    assert info.value.field == FIELD, info.value
    message = str(info.value)
    for word in why:
        assert word in message, message
    return message


def test_accepted_file(allowed: Path) -> None:
    config = load_pod_config_file(str(allowed / "ok.toml"), (str(allowed),))
    assert config.qemu.default_memory == 512


def test_refused_without_an_allow_list(allowed: Path, tmp_path: Path) -> None:
    _refused(allowed / "ok.toml", (), "runtime.valid_config_paths")
    admin = tmp_path / "admin.toml"
    admin.write_text("")  # the admin lists no directory: the default
    with pytest.raises(ConfigError) as info:
        load_for_annotations({FIELD: str(allowed / "ok.toml")}, {"PYKATA_CONFIG": str(admin)})
    assert info.value.field == FIELD and "valid_config_paths" in str(info.value)
    admin.unlink()


def test_outside_the_allow_list(allowed: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.toml").write_text(GOOD)
    for path in (tmp_path / "evil.toml", f"{allowed}/../evil.toml", f"{allowed}2/ok.toml", "/etc/passwd",
                 "relative.toml", f"{allowed}/", str(allowed)):
        _refused(path, (str(allowed),))
    (tmp_path / "evil.toml").unlink()


def test_symlinks(allowed: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.toml").write_text(GOOD)
    # the file itself a symlink, even to a good file in the same directory (O_NOFOLLOW)
    (allowed / "link.toml").symlink_to(allowed / "ok.toml")
    _refused(allowed / "link.toml", (str(allowed),), "symlink")
    (allowed / "out.toml").symlink_to(tmp_path / "evil.toml")
    _refused(allowed / "out.toml", (str(allowed),), "symlink")
    # a directory on the way a symlink out of the allowed directory: resolved, then outside
    (allowed / "sub").symlink_to(tmp_path)
    _refused(allowed / "sub" / "evil.toml", (str(allowed),), "not in a directory listed")
    for name in ("link.toml", "out.toml", "sub"):
        (allowed / name).unlink()
    (tmp_path / "evil.toml").unlink()


def test_fifo_does_not_block(allowed: Path) -> None:
    os.mkfifo(allowed / "fifo.toml")
    done = threading.Event()
    result: list[BaseException] = []

    def load() -> None:
        try:
            load_pod_config_file(str(allowed / "fifo.toml"), (str(allowed),))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)
        done.set()

    start = time.monotonic()
    threading.Thread(target=load, daemon=True).start()
    if not done.wait(5):
        with open(allowed / "fifo.toml", "wb"):  # unblock the reader before failing
            pass
        pytest.fail("opening a FIFO named by config_path blocked")
    assert time.monotonic() - start < 1
    assert isinstance(result[0], ConfigError) and result[0].field == FIELD
    assert "not a regular file" in str(result[0])
    (allowed / "fifo.toml").unlink()


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_group_or_world_writable_file(allowed: Path, mode: int) -> None:
    os.chmod(allowed / "ok.toml", mode)
    _refused(allowed / "ok.toml", (str(allowed),), "writable by group or others")


def test_world_writable_directory(allowed: Path) -> None:
    os.chmod(allowed, 0o777)
    _refused(allowed / "ok.toml", (str(allowed),), "writable by group or others")
    os.chmod(allowed, 0o1777)  # sticky does not help: anyone may still add files
    _refused(allowed / "ok.toml", (str(allowed),), "writable by group or others")


def test_not_owned_by_root(allowed: Path) -> None:
    os.chown(allowed / "ok.toml", 65534, 65534)
    _refused(allowed / "ok.toml", (str(allowed),), "not owned by root")
    os.chown(allowed / "ok.toml", 0, 0)
    os.chown(allowed, 65534, 65534)
    _refused(allowed / "ok.toml", (str(allowed),), "not owned by root")
    os.chown(allowed, 0, 0)


def test_too_big(allowed: Path) -> None:
    (allowed / "big.toml").write_text("#" * (1024 * 1024 + 1))
    _refused(allowed / "big.toml", (str(allowed),), "larger than")
    (allowed / "big.toml").unlink()


def test_etc_shadow_parse_error_shows_nothing_of_it() -> None:
    # even an admin who lists /etc: /etc/shadow is root's, mode 0640, so only parsing refuses it, and
    # neither its text nor a line/column of it may reach the pod author
    shadow = Path("/etc/shadow").read_text()
    message = _refused("/etc/shadow", ("/etc",), "not a valid pykata configuration")
    assert "line" not in message and "column" not in message
    for token in {t for line in shadow.splitlines() for t in line.split(":") if len(t) >= 3}:
        assert token not in message.replace("/etc/shadow", ""), token


@pytest.mark.parametrize("text", [
    'secret_token = "hunter2-abcdef"\n',                   # an unknown key and its value
    '[hypervisor.qemu]\nmachine_type = "hunter2-abcdef"\n',  # a bad value
    "hunter2-abcdef: x\n",                                 # not TOML
    "[hypervisor.qemu]\npath = 'hunter2-abcdef'\n",        # a relative path
])
def test_bad_file_is_not_quoted(allowed: Path, text: str) -> None:
    (allowed / "secret.toml").write_text(text)
    message = _refused(allowed / "secret.toml", (str(allowed),), "not a valid pykata configuration")
    assert "hunter2" not in message and "secret_token" not in message
    (allowed / "secret.toml").write_bytes(b"\xff\xfe hunter2-abcdef")  # not UTF-8
    message = _refused(allowed / "secret.toml", (str(allowed),), "not a valid pykata configuration")
    assert "hunter2" not in message
    (allowed / "secret.toml").unlink()


def test_bad_known_key_is_named(allowed: Path) -> None:
    (allowed / "bad.toml").write_text('[hypervisor.qemu]\nenable_annotations = ["virtio_fs_extra_args"]\n')
    _refused(allowed / "bad.toml", (str(allowed),), "bad hypervisor.qemu.enable_annotations[0]")
    (allowed / "bad.toml").write_text("[hypervisor.qemu]\ndefault_memory = 1099511627776\n")
    _refused(allowed / "bad.toml", (str(allowed),), "bad hypervisor.qemu.default_memory")
    (allowed / "bad.toml").unlink()
