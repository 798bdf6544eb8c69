"""The kernel QEMU is given: the cached build without its symbol table (assets.without_symbols)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from pykata.hypervisor.qemu import assets
from tests.guest_assets import guest_kernel_path

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
    shutil.copy2(guest_kernel_path(), copy)
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
