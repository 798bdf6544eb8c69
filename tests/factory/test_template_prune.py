"""Pruning old templates (`pykata factory init`, `pykata factory destroy --stale`): a template no process
uses and no VM started from for a while is removed; one a running VM maps is never, however old.
`pykata factory prune` removes, whatever their age, the templates no configuration given starts VMs from.

Unit tests on template directories made by hand (a template's files, no VM), with `FakeClone`, a
process that maps a template's memory file the way a clone's QEMU does; tests/factory/test_template.py
checks the same on a real clone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pykata.cli import factory as factory_cli
from pykata.config import Config, load_config
from pykata.factory.template import (
    FORMAT,
    _file_id,
    configured_template_keys,
    last_used,
    list_templates,
    load_template,
    mark_used,
    prune_unused_templates,
    templates_in_use,
)

HOUR = 3600.0


def _make(root: Path, name: str, kernel: Path, age: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "memory").write_bytes(b"\0" * 4096)
    (d / "state").write_bytes(b"state")
    meta = {"format": FORMAT, "key": name, "inputs": {"kernel": _file_id(kernel)}, "kernel": str(kernel),
            "initrd": None, "image": None, "created_at": time.time() - age, "build_seconds": 1.0}
    (d / "template.json").write_text(json.dumps(meta))
    os.utime(d, (time.time() - age, time.time() - age))
    return d


class FakeClone:
    """A process that maps a template's memory file privately, as a clone's QEMU does (mem-path=...,
    share=off); the path reaches it on stdin, so only its memory map names it."""

    def __init__(self, memory: Path) -> None:
        code = ("import mmap, sys; p = sys.stdin.readline().strip(); f = open(p, 'rb'); "
                "m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ); f.close(); "
                "print('mapped', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{memory}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "mapped"

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Config, Path, Path]]:
    base = load_config()
    root = tmp_path / "tpl"
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    config = dataclasses.replace(base, factory=dataclasses.replace(base.factory, template_path=str(root)))
    yield config, root, kernel


def test_old_unused_templates_go_and_used_recent_or_kept_ones_stay(setup: tuple[Config, Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config, root, kernel = setup
    _make(root, "old", kernel, 2 * HOUR)
    mapped = _make(root, "mapped", kernel, 5 * HOUR)
    started_from = _make(root, "startedfrom", kernel, 5 * HOUR)
    _make(root, "kept", kernel, 5 * HOUR)
    _make(root, "recent", kernel, 0.5 * HOUR)
    stale = _make(root, "stale", kernel, 0)
    meta = json.loads((stale / "template.json").read_text())
    meta["inputs"]["kernel"] = "another kernel"  # its kernel changed since: unusable at any age
    (stale / "template.json").write_text(json.dumps(meta))

    t = load_template(started_from)
    assert t is not None and time.time() - last_used(t) > 4 * HOUR
    mark_used(t)  # a VM started from it now (ensure_template does this)
    assert time.time() - last_used(t) < 60

    clone = FakeClone(mapped / "memory")
    try:
        assert templates_in_use(root) == {"mapped"}
        removed = prune_unused_templates(config, HOUR, keep={"kept"})
        assert sorted(removed) == ["old", "stale"]
        assert sorted(t.key for t in list_templates(config)) == ["kept", "mapped", "recent", "startedfrom"]
    finally:
        clone.end()
    assert templates_in_use(root) == set()
    # the same through the CLI once its VM is gone: `destroy --stale` with a shorter age
    monkeypatch.setattr(factory_cli, "_config", lambda: config)
    result = CliRunner().invoke(factory_cli.factory, ["destroy", "--stale", "--unused-for", "7200", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.output)["removed"]) == ["kept", "mapped"]
    assert sorted(t.key for t in list_templates(config)) == ["recent", "startedfrom"]


def test_a_template_path_that_does_not_exist_prunes_nothing(setup: tuple[Config, Path, Path]) -> None:
    config, root, _ = setup
    assert prune_unused_templates(config, 0) == [] and not root.exists()


def test_factory_prune_removes_what_no_configuration_uses_but_never_a_used_or_configured_one(
        setup: tuple[Config, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates an A/B checkout left (another guest image's), made minutes ago: `destroy --stale` keeps
    them for --unused-for. `prune` takes exactly them: never the current configuration's, a --config
    file's, or one a VM maps."""
    import asyncio

    config, root, kernel = setup
    other_file = tmp_path / "other.toml"  # a runtime class with its own configuration: another VM size
    other_file.write_text(f'[factory]\ntemplate_path = "{root}"\n[hypervisor.qemu]\n'
                          f'default_memory = {config.qemu.default_memory // 2}\n')
    ours = asyncio.run(configured_template_keys(config))
    from pykata.config.load import load_config_file

    theirs = asyncio.run(configured_template_keys(load_config_file(other_file)))
    assert len(ours) == 3 and len(theirs) == 3 and not ours & theirs
    for name in (*ours, *theirs, "8dda7e0e80e3f9840093", "f7ce81d2f9d598183e9e", "mapped"):
        _make(root, name, kernel, 0)
    monkeypatch.setattr(factory_cli, "_config", lambda: config)
    clone = FakeClone(root / "mapped" / "memory")
    try:
        stale = CliRunner().invoke(factory_cli.factory, ["destroy", "--stale", "--json"])
        assert stale.exit_code == 0 and json.loads(stale.output)["removed"] == []  # all were used minutes ago
        (root / ".tmp-aaaa-123456").mkdir()  # an unfinished make's leftovers (no make holds the lock)
        dry = CliRunner().invoke(factory_cli.factory, ["prune", "--dry-run", "--config", str(other_file), "--json"])
        assert dry.exit_code == 0, dry.output
        gone = [".tmp-aaaa-123456", "8dda7e0e80e3f9840093", "f7ce81d2f9d598183e9e"]
        assert json.loads(dry.output)["removed"] == gone and (root / gone[0]).is_dir()
        status = CliRunner().invoke(factory_cli.factory, ["status", "--json"])
        assert status.exit_code == 0, status.output
        listed = {t["key"]: t for t in json.loads(status.output)["templates"]}
        assert {k for k, t in listed.items() if t["configured"]} == ours
        assert {k for k, t in listed.items() if t["in_use"]} == {"mapped"}
        done = CliRunner().invoke(factory_cli.factory, ["prune", "--config", str(other_file), "--json"])
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["removed"] == gone
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted([*ours, *theirs, "mapped"])
        # without the other configuration, its templates go too; the mapped one stays while mapped
        alone = CliRunner().invoke(factory_cli.factory, ["prune"])
        assert alone.exit_code == 0, alone.output
        assert "removed 3 template(s)" in alone.output
        assert {t.key for t in list_templates(config)} == {*ours, "mapped"}
    finally:
        clone.end()
    assert CliRunner().invoke(factory_cli.factory, ["prune", "--json"]).exit_code == 0
    assert {t.key for t in list_templates(config)} == ours
    bad = CliRunner().invoke(factory_cli.factory, ["prune", "--config", str(tmp_path / "missing.toml")])
    assert bad.exit_code != 0 and "--config" in bad.output and "Traceback" not in bad.output


def test_destroy_stale_never_removes_the_configurations_own_templates(
        setup: tuple[Config, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`destroy --stale --unused-for 0` removes the other templates no VM uses, whatever their age, but
    never the three the current configuration starts VMs from (it took them too: init then had to make
    them again, the next pod waited for it), nor one a VM maps."""
    import asyncio

    config, root, kernel = setup
    ours = asyncio.run(configured_template_keys(config))
    for name in (*ours, "8dda7e0e80e3f9840093", "mapped"):
        _make(root, name, kernel, 2 * HOUR)
    monkeypatch.setattr(factory_cli, "_config", lambda: config)
    clone = FakeClone(root / "mapped" / "memory")
    try:
        result = CliRunner().invoke(factory_cli.factory, ["destroy", "--stale", "--unused-for", "0", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["removed"] == ["8dda7e0e80e3f9840093"]
        assert {t.key for t in list_templates(config)} == {*ours, "mapped"}
    finally:
        clone.end()
    result = CliRunner().invoke(factory_cli.factory, ["destroy", "--stale", "--unused-for", "0"])
    assert result.exit_code == 0 and "removed 1 template(s): mapped" in result.output, result.output
    assert {t.key for t in list_templates(config)} == ours
