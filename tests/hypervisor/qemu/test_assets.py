"""The kernel QEMU is given: the cached build without its symbol table (assets.without_symbols)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
from pathlib import Path

import pytest

from pykata.config import load_config
from pykata.hypervisor.qemu import assets
from tests.guest_assets import guest_kernel_with_symbols

SHT_SYMTAB = 2


def elf_layout(path: Path) -> tuple[bytes, list[int]]:
    """(the program headers, the section types) of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    phdrs = data[phoff:phoff + phentsize * phnum]
    types = [struct.unpack_from("<I", data, shoff + i * shentsize + 4)[0] for i in range(shnum)]
    # the segments' contents too: what QEMU loads into guest RAM must be the same bytes
    loads = b""
    for i in range(phnum):
        p_type, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", phdrs, i * phentsize)
        if p_type in (1, 4):  # PT_LOAD, PT_NOTE
            loads += data[offset:offset + filesz]
    return phdrs + loads, types


@pytest.fixture
def kernel_copy(tmp_path: Path) -> Path:
    """A copy of the guest kernel in a directory of the test's own (the shared cache is not written)."""
    copy = tmp_path / "vmlinux"
    shutil.copy2(guest_kernel_with_symbols(), copy)
    return copy


def test_the_copy_has_the_same_segments_and_no_symbols(kernel_copy: Path) -> None:
    if shutil.which("objcopy") is None:
        pytest.skip("no objcopy on this host (binutils): QEMU gets the kernel with its symbols")
    stripped = assets.without_symbols(kernel_copy)
    assert stripped == kernel_copy.with_name("vmlinux" + assets.NOSYMS_SUFFIX)
    before, before_types = elf_layout(kernel_copy)
    after, after_types = elf_layout(stripped)
    assert SHT_SYMTAB in before_types and SHT_SYMTAB not in after_types
    assert after == before
    made = stripped.stat().st_mtime_ns
    assert assets.without_symbols(kernel_copy) == stripped and stripped.stat().st_mtime_ns == made  # made once
    assert [p.name for p in kernel_copy.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_without_objcopy_qemu_gets_the_kernel_itself(kernel_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)  # a fake: a host without binutils
    assert assets.without_symbols(kernel_copy) == kernel_copy
    assert sorted(p.name for p in kernel_copy.parent.iterdir()) == ["vmlinux"]


def test_a_configured_kernel_is_given_without_symbols_and_its_file_is_never_written(kernel_copy: Path,
                                                                                   tmp_path: Path) -> None:
    if shutil.which("objcopy") is None:
        pytest.skip("no objcopy on this host (binutils): QEMU gets the kernel with its symbols")
    cache = tmp_path / "cache" / assets.CONFIGURED_NOSYMS_DIR
    base = load_config()
    qemu = dataclasses.replace(base.qemu, kernel=str(kernel_copy))
    config = dataclasses.replace(base, hypervisor=dataclasses.replace(base.hypervisor, qemu=qemu),
                                 runtime=dataclasses.replace(base.runtime, cache_dir=str(tmp_path / "cache")))
    first = assets.resolve_kernel(config)
    assert first.parent == cache and first.name.endswith(assets.NOSYMS_SUFFIX)
    assert SHT_SYMTAB not in elf_layout(first)[1] and elf_layout(first)[0] == elf_layout(kernel_copy)[0]
    assert sorted(p.name for p in kernel_copy.parent.iterdir()) == ["cache", "vmlinux"]  # nothing beside it
    assert assets.resolve_kernel(config) == first  # made once
    # The admin replaces the kernel in place with an older file: a new copy, and the stale one goes.
    shutil.copy2(kernel_copy, tmp_path / "new")
    os.utime(tmp_path / "new", ns=(1, 1))
    os.replace(tmp_path / "new", kernel_copy)
    second = assets.resolve_kernel(config)
    assert second != first and second.parent == cache and list(cache.iterdir()) == [second]
    # A kernel that has no symbol table (the node payload's, the stripped copy, a bzImage) is used as is.
    assert assets.configured_without_symbols(second, cache) == second
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(b"MZ" + b"\0" * 1000)
    assert assets.configured_without_symbols(bzimage, cache) == bzimage
    assert list(cache.iterdir()) == [second]


def test_a_configured_kernel_with_symbols_and_no_writable_cache_is_given_as_is(kernel_copy: Path,
                                                                              tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert assets.configured_without_symbols(kernel_copy, blocker / "sub") == kernel_copy


def test_image_prune_removes_the_copies_no_configured_kernel_template_or_vm_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pykata image prune` on a FAKE cache (files named as copies, not kernels): the copies of kernels
    configured before (another path) go; the current kernel's copy, a template's and one a running QEMU
    names stay, and so does a copy being made (its hidden temporary name)."""
    import json
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from pykata.cli import image as image_cli
    from pykata.factory.template import FORMAT, _file_id

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"configured kernel")
    cache = tmp_path / "cache"
    copies = cache / assets.CONFIGURED_NOSYMS_DIR
    copies.mkdir(parents=True)
    current = assets.configured_copy_path(kernel, copies)
    assert current is not None
    names = {"current": current.name, "old": "1111111111111111-2222222222222222.nosyms",
             "template": "3333333333333333-4444444444444444.nosyms", "vm": "5555555555555555-6666666666666666.nosyms",
             "making": ".7777777777777777-8888888888888888.nosyms.123-abcd", "other": "README"}
    for name in names.values():
        (copies / name).write_bytes(b"copy")
    tpl = tmp_path / "tpl" / "t1"
    tpl.mkdir(parents=True)
    (tpl / "memory").write_bytes(b"\0" * 4096)
    (tpl / "state").write_bytes(b"state")
    (tpl / "template.json").write_text(json.dumps({
        "format": FORMAT, "key": "t1", "inputs": {"kernel": _file_id(copies / names["template"])},
        "kernel": str(copies / names["template"]), "initrd": None, "image": None, "created_at": time.time(),
        "build_seconds": 1.0}))
    base = load_config()
    config = dataclasses.replace(
        base, hypervisor=dataclasses.replace(base.hypervisor, qemu=dataclasses.replace(base.qemu, kernel=str(kernel))),
        factory=dataclasses.replace(base.factory, template_path=str(tmp_path / "tpl")))
    monkeypatch.setattr(image_cli, "_config", lambda: config)
    # FAKE: a process naming a copy as QEMU's -kernel does
    vm = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-kernel", str(copies / names["vm"])],
                          stdin=subprocess.PIPE)
    try:
        result = CliRunner().invoke(image_cli.image, ["prune", "--cache-dir", str(cache), "--json"])
    finally:
        assert vm.stdin is not None
        vm.stdin.close()
        vm.wait()
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["removed_kernel_copies"] == [str(copies / names["old"])]
    assert sorted(p.name for p in copies.iterdir()) == sorted(v for k, v in names.items() if k != "old")
    # the VM gone and another kernel configured: the earlier kernel's copy goes too, the template's stays
    other = tmp_path / "vmlinux-2"
    other.write_bytes(b"another kernel")
    config = dataclasses.replace(config, hypervisor=dataclasses.replace(
        config.hypervisor, qemu=dataclasses.replace(config.qemu, kernel=str(other))))
    result = CliRunner().invoke(image_cli.image, ["prune", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert f"removed kernel copy {copies / names['current']}" in result.output
    assert sorted(p.name for p in copies.iterdir()) == sorted([names["template"], names["making"], names["other"]])
