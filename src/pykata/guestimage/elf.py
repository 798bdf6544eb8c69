"""Just enough ELF parsing to list a binary's DT_NEEDED libraries (x86-64, little endian).

The rootfs builder uses it to prove that every executable and extension module in the image finds
its shared libraries, to drop the libraries nothing needs, and to drop a DT_NEEDED entry naming a
library none of whose symbols the file uses (`remove_needed`: what `ld --as-needed` would have left
out; protobuf's C extension names libstdc++ but calls only libc).
"""

from __future__ import annotations

import struct
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5
_SHT_DYNSYM, _SHT_GNU_VERNEED = 11, 0x6FFFFFFE
_SHN_UNDEF, _STB_GLOBAL, _STB_WEAK = 0, 1, 2


class ElfError(ValueError):
    """The file is not an ELF64 little-endian image this module can edit."""


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


def _sections(data: bytes) -> list[tuple[int, int, int, int]]:
    """(sh_type, sh_offset, sh_size, sh_link) of each section header."""
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    out = []
    for i in range(e_shnum):
        base = e_shoff + i * e_shentsize
        if base + 64 > len(data):
            raise ElfError("truncated section header table")
        _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link = struct.unpack_from("<IIQQQQI", data, base)
        out.append((sh_type, sh_offset, sh_size, sh_link))
    return out


def _cstr(data: bytes, at: int) -> str:
    return data[at:data.index(b"\0", at)].decode()


def dynamic_symbols(data: bytes) -> tuple[set[str], set[str]]:
    """(defined, undefined) names of the global and weak symbols in .dynsym.

    Raises ElfError when `data` is not ELF64 little endian or its section table is truncated.
    """
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ElfError("not an ELF64 little-endian file")
    sections = _sections(data)
    defined: set[str] = set()
    undefined: set[str] = set()
    for sh_type, offset, size, link in sections:
        if sh_type != _SHT_DYNSYM:
            continue
        strtab = sections[link][1]
        for pos in range(offset, offset + size - 23, 24):
            st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, pos)
            if not st_name or st_info >> 4 not in (_STB_GLOBAL, _STB_WEAK):
                continue
            (undefined if st_shndx == _SHN_UNDEF else defined).add(_cstr(data, strtab + st_name))
    return defined, undefined


def version_needs(data: bytes) -> set[str]:
    """The library names the file's symbol version requirements (.gnu.version_r) refer to.

    Raises ElfError as dynamic_symbols does.
    """
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ElfError("not an ELF64 little-endian file")
    sections = _sections(data)
    names = set()
    for sh_type, offset, _size, link in sections:
        if sh_type != _SHT_GNU_VERNEED:
            continue
        strtab = sections[link][1]
        pos = offset
        while True:
            _version, _cnt, vn_file, _aux, vn_next = struct.unpack_from("<HHIII", data, pos)
            names.add(_cstr(data, strtab + vn_file))
            if not vn_next:
                break
            pos += vn_next
    return names


def remove_needed(data: bytes, library: str) -> bytes:
    """`data` without the DT_NEEDED entry naming `library` (the later entries move up one, a DT_NULL
    fills the end: the section keeps its size, nothing else moves).

    Raises ElfError when the file has no such entry or is not an ELF64 little-endian shared object.
    """
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ElfError("not an ELF64 little-endian file")
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(e_phnum):
        base = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, base)
        if p_type == _PT_LOAD:
            loads.append((p_offset, p_vaddr, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ElfError("no dynamic section")
    offset, size = dynamic
    entries = [struct.unpack_from("<qQ", data, pos) for pos in range(offset, offset + size - 15, 16)]
    strtab = next((_vaddr_to_offset(loads, v) for t, v in entries if t == _DT_STRTAB), None)
    if strtab is None:
        raise ElfError("no dynamic string table")
    kept = [(t, v) for t, v in entries if not (t == _DT_NEEDED and _cstr(data, strtab + v) == library)]
    if len(kept) == len(entries):
        raise ElfError(f"no DT_NEEDED entry for {library}")
    out = bytearray(data)
    for i, (tag, value) in enumerate([*kept, (_DT_NULL, 0)]):
        struct.pack_into("<qQ", out, offset + 16 * i, tag, value)
    return bytes(out)
