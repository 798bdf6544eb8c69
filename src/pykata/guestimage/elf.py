"""Just enough ELF parsing to list a binary's DT_NEEDED libraries (x86-64, little endian).

The rootfs builder uses it to prove that every executable and extension module in the image finds
its shared libraries, and to drop the libraries nothing needs.
"""

from __future__ import annotations

import struct
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def _vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    for offset, start, size in loads:
        if start <= vaddr < start + size:
            return offset + (vaddr - start)
    return None


def dynamic_info(data: bytes) -> tuple[list[str], str | None]:
    """Return (DT_NEEDED names, PT_INTERP path) of an ELF64 little-endian image.

    A static binary gives ([], None). Anything that is not ELF64 LE gives ([], None) too: the
    builder only ships x86-64 binaries, and a truncated file is reported by its loader anyway.
    """
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return [], None
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(e_phnum):
        base = e_phoff + i * e_phentsize
        if base + 56 > len(data):
            return [], None
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, base)
        if p_type == _PT_LOAD:
            loads.append((p_offset, p_vaddr, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    if dynamic is None:
        return [], interp
    needed_offsets: list[int] = []
    strtab: int | None = None
    offset, size = dynamic
    for pos in range(offset, min(offset + size, len(data) - 15), 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed_offsets.append(value)
        elif tag == _DT_STRTAB:
            strtab = _vaddr_to_offset(loads, value)
    if strtab is None:
        return [], interp
    names = []
    for off in needed_offsets:
        start = strtab + off
        end = data.find(b"\0", start)
        names.append(data[start:end].decode())
    return names, interp
