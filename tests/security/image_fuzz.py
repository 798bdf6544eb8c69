"""Hypothesis strategies and the property for fuzzing the layer extractor (tests and bench/fuzz_images.py).

A case is 1-3 layers of tar entries drawn from names and link targets that attackers use (`..`,
absolute paths, whiteouts, the host directory, long and odd names), every entry type tarfile can write
(devices, pax/GNU headers as raw members, sparse), random pax records, tar formats, byte-level
mutations (flip, truncate, insert) and gzip, applied with small caps. The property: applying the layers
either works or raises an `ImageError` (the documented types), the host directory next to the root is
untouched, nothing is created beside the root, no device node exists in it, and it can be removed.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from pykata.config.schema import ImageSection
from pykata.images import ImageError, apply_layer
from pykata.images.blobs import Budget
from pykata.images.layers import remove_tree
from tests.security.imagekit import tree

HOST = "@HOST@"  # replaced by the host directory's absolute path when a case runs
# Each field is usually benign and sometimes hostile, so that layers get far enough for entries to
# combine (a symlink to the host, then a file below it) before something is refused.
NAMES = ["a", "b", "c", "dev", ".wh.a", ".wh..wh..opq", "é", " ", ".wh.b"]
DIR_NAMES = ["a", "b", "c", "dev", "é"]
HOSTILE_NAMES = [".wh...", "..", ".", "", ".wh..", ".wh.", ".wh..wh.x", "\udcff", "x" * 256, "a\0b", ".wh..."]
LINK_TARGETS = [HOST + "/passwd", HOST, "/", "", "../host", "../host/passwd", "../" * 8 + "etc/passwd",
                "/etc/passwd", ".", "..", "a", "a/b", "b"]
TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]
HOSTILE_TYPES = [tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                 tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                 tarfile.GNUTYPE_SPARSE, b"V", b"9"]
PAX_KEYS = ["path", "linkpath", "size", "uid", "gid", "mtime", "comment", "GNU.sparse.major",
            "GNU.sparse.minor", "GNU.sparse.realsize", "GNU.sparse.map", "GNU.sparse.size", "hdrcharset",
            "SCHILY.xattr.user.x", "uname"]
PAX_VALUES = ["0", "x", "-1", "1e999", "nan", "1,2,3", "9" * 30, "BINARY", "../x", "/", HOST, "a/b", "\0",
              "é", "1"]
MODES = [0o644, 0o755, 0o4755, 0o7777, 0, 0o2711, 0o1777]
UIDS = [0, 1000, 65534, 2**21]
HOSTILE_IDS = [2**32 - 1, 2**32, 2**40]
MTIMES = [0, 1, -1, 2**33, 1.5, float("inf"), 2**60]
SIZES = [0, 0, 0, 1, 5, 511, 512, 513]
HOSTILE_SIZES = [700_000]  # two of them exceed max_unpacked_mib = 1
FORMATS = [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]
COMPRESSIONS = ["none", "gzip"] * 4 + ["gzip-cut"]
MUTATIONS = ["flip", "truncate", "insert"]


class _Bits:
    """Choices decoded from one integer, so that a case costs Hypothesis few draws and shrinks toward
    the first (simplest) element of each list."""

    def __init__(self, n: int, calm: bool = False) -> None:
        self.n = n
        self.calm = calm  # no hostile picks: only well-formed entries, combined in hostile ways

    def pick(self, items: list[Any]) -> Any:
        self.n, i = divmod(self.n, len(items))
        return items[i]

    def number(self, limit: int) -> int:
        self.n, i = divmod(self.n, limit)
        return i

    def usually(self, items: list[Any], hostile: list[Any], odds: int = 8) -> Any:
        """An element of `items`, or one of `hostile` once in `odds` picks."""
        if self.number(odds) == odds - 1 and not self.calm:
            return self.pick(hostile)
        return self.pick(items)


@dataclass(frozen=True)
class EntrySpec:
    name: str
    type: bytes
    linkname: str
    mode: int
    uid: int
    gid: int
    mtime: float
    size: int
    pax: tuple[tuple[str, str], ...]
    devmajor: int
    devminor: int

    @classmethod
    def decode(cls, n: int, calm: bool = False) -> EntrySpec:
        b = _Bits(n, calm)
        t = b.usually(TYPES, HOSTILE_TYPES, 5)
        parts = [b.usually(DIR_NAMES, HOSTILE_NAMES, 5) for _ in range(b.number(3))]
        parts.append(b.usually(NAMES, HOSTILE_NAMES, 5))
        name = ("/" if b.number(5) == 4 else "") + "/".join(parts) + ("/" if b.number(5) == 4 else "")
        link = b.pick(LINK_TARGETS)
        size = b.usually(SIZES, HOSTILE_SIZES, 16)
        mode, mtime = b.pick(MODES), b.pick(MTIMES)
        uid, gid = b.usually(UIDS, HOSTILE_IDS, 10), b.usually(UIDS, HOSTILE_IDS, 10)
        pax = tuple((b.pick(PAX_KEYS), b.pick(PAX_VALUES)) for _ in range(0 if calm else b.pick([0] * 6 + [1, 2])))
        return cls(name, t, link, mode, uid, gid, mtime, size, pax, b.pick([0, 1, 8]), b.pick([0, 3]))


@dataclass(frozen=True)
class LayerSpec:
    entries: tuple[EntrySpec, ...]
    format: int
    compression: str
    mutations: tuple[tuple[str, int, int], ...]

    @classmethod
    def decode(cls, head: int, entries: list[int]) -> LayerSpec:
        b = _Bits(head)
        calm = b.number(2) == 0
        fmt, comp = b.pick(FORMATS), b.pick(COMPRESSIONS[:2] if calm else COMPRESSIONS)
        muts = tuple((b.pick(MUTATIONS), b.number(1 << 16), b.number(256))
                     for _ in range(0 if calm else b.pick([0] * 8 + [1, 2])))
        specs: list[EntrySpec] = []
        for e in entries:
            spec = EntrySpec.decode(e, calm)
            if specs and b.number(3) == 2:  # below the previous entry: through a symlink, a file, ...
                below = specs[-1].name.rstrip("/") + "/" + spec.name.lstrip("/").rsplit("/", 1)[-1]
                spec = dataclasses.replace(spec, name=below)
            if specs and b.number(2) == 1:  # a link to an earlier entry (a symlink to the host, ...)
                spec = dataclasses.replace(spec, linkname=specs[-1 - b.number(len(specs))].name)
            specs.append(spec)
        return cls(tuple(specs), fmt, comp, muts)


_WORD = st.integers(0, 2**96 - 1)
layers = st.builds(LayerSpec.decode, _WORD, st.lists(_WORD, max_size=6))
limits = st.builds(ImageSection, max_layers=st.just(8), max_unpacked_mib=st.just(1),
                   max_entries=st.sampled_from([100_000, 4, 20]),
                   max_pax_header_bytes=st.sampled_from([1 << 20, 512, 4096]),
                   max_path_length=st.sampled_from([4096, 256]), min_free_mib=st.just(0))
cases = st.tuples(st.lists(layers, min_size=1, max_size=3), limits)


def build_layer(spec: LayerSpec, host: str) -> bytes:
    """The tar bytes of a layer spec (entries tarfile cannot write in its format are left out)."""
    buf = io.BytesIO()
    for e in spec.entries:
        info = tarfile.TarInfo(e.name.replace(HOST, host))
        info.type, info.linkname = e.type, e.linkname.replace(HOST, host)
        info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
        info.size, info.devmajor, info.devminor = e.size, e.devmajor, e.devminor
        info.pax_headers = {k: v.replace(HOST, host) for k, v in e.pax}
        try:
            buf.write(info.tobuf(spec.format, "utf-8", "surrogateescape"))
        except (ValueError, tarfile.TarError, UnicodeError, OverflowError, TypeError):
            continue  # tarfile cannot write this one (a value too big for the format): leave it out
        buf.write(bytes(e.size + -e.size % tarfile.BLOCKSIZE))
    buf.write(bytes(2 * tarfile.BLOCKSIZE))
    data = bytearray(buf.getvalue())
    for op, pos, byte in spec.mutations:
        if not data:
            break
        i = pos % len(data)
        if op == "flip":
            data[i] ^= byte or 1
        elif op == "truncate":
            del data[i:]
        else:
            data[i:i] = bytes([byte]) * 7
    out = bytes(data)
    if spec.compression.startswith("gzip"):
        out = gzip.compress(out, compresslevel=1, mtime=0)
        if spec.compression == "gzip-cut":
            out = out[: max(len(out) // 2, 1)]
    return out


def check_case(case: tuple[list[LayerSpec], ImageSection], base: Path, host_tree: dict[str, Any]) -> str:
    """Apply a case below `base` (which holds `host/`); returns "ok" or "refused".

    Raises AssertionError (a broken property) or whatever unexpected exception the extractor raised.
    """
    specs, lim = case
    host = base / "host"
    blobs = [build_layer(s, str(host)) for s in specs]
    root = base / "root"
    root.mkdir()
    outcome = "ok"
    try:
        budget = Budget(lim)
        try:
            for blob in blobs:
                apply_layer(io.BytesIO(blob), root, lim, budget=budget)
        except ImageError as e:
            assert str(e), "an error without a message"
            outcome = "refused"
        assert sorted(os.listdir(base)) == ["host", "root"], f"created beside the root: {os.listdir(base)}"
        assert tree(host) == host_tree, "the host directory changed"
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                mode = os.lstat(os.path.join(dirpath, name)).st_mode
                assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), f"device node {name!r}"
    finally:
        remove_tree(root)
    return outcome


def make_host(base: Path) -> dict[str, Any]:
    """The host directory attacks aim at; returns its tree() to compare with after each case."""
    host = base / "host"
    (host / "dir").mkdir(parents=True)
    (host / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return tree(host)
