"""`pykata factory destroy` removes only what it is told to: KEY..., --all or --stale (one of them). A bare
`destroy` (and `destroy --json`, taken for a plain destroy) used to remove every template without asking.

Unit tests on template directories made by hand (a template's files, no VM; as tests/factory/
test_template_prune.py does), through the CLI with click's runner."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pykata.cli import factory as factory_cli
from pykata.config import Config, load_config
from pykata.factory.template import FORMAT, _file_id, list_templates


def _make(root: Path, name: str, kernel: Path) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "memory").write_bytes(b"\0" * 4096)
    (d / "state").write_bytes(b"state")
    meta = {"format": FORMAT, "key": name, "inputs": {"kernel": _file_id(kernel)}, "kernel": str(kernel),
            "initrd": None, "image": None, "created_at": time.time(), "build_seconds": 1.0}
    (d / "template.json").write_text(json.dumps(meta))


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    base = load_config()
    root = tmp_path / "tpl"
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    for name in ("aaa", "bbb", "ccc"):
        _make(root, name, kernel)
    cfg = dataclasses.replace(base, factory=dataclasses.replace(base.factory, template_path=str(root)))
    monkeypatch.setattr(factory_cli, "_config", lambda: cfg)
    return cfg


def _destroy(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(factory_cli.factory, ["destroy", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _left(config: Config) -> list[str]:
    return sorted(t.key for t in list_templates(config))


def test_destroy_needs_a_target_and_removes_only_it(config: Config) -> None:
    for args in ((), ("--json",), ("aaa", "--all"), ("--all", "--stale"), ("aaa", "--stale")):
        code, out = _destroy(*args)
        assert code == 2 and "KEY..." in out and "--all" in out, (args, out)
        assert _left(config) == ["aaa", "bbb", "ccc"], args  # nothing removed
    code, out = _destroy("aaa", "nope")  # an unknown key removes nothing, and is named
    assert code == 1 and "no template nope" in out and "Traceback" not in out
    assert _left(config) == ["aaa", "bbb", "ccc"]
    code, out = _destroy("aaa", "--json")
    assert (code, json.loads(out)) == (0, {"removed": ["aaa"]})
    assert _left(config) == ["bbb", "ccc"]
    code, out = _destroy("--all")
    assert code == 0 and out.strip() == "removed 2 template(s): bbb, ccc"
    assert _left(config) == []
