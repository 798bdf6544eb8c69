"""Reading tar headers of an untrusted layer with bounds.

Python's tarfile reads a pax or GNU long-name record whole and recurses once per record, and
accumulates global pax headers for the whole archive: a layer could make it hold any amount of
memory or recurse without end. The TarInfo here refuses sparse files and caps each extended record,
the global headers in all (`image.max_pax_header_bytes`) and the length of a chain of records.
"""

from __future__ import annotations

import tarfile
from typing import Any

from pykata.config.schema import ImageSection
from pykata.images.errors import ImageLimitError, LayerError

# tarfile processes each pax or GNU long-name record by recursing into the next header.
MAX_HEADER_CHAIN = 8
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)
_SPARSE = "sparse files are not supported"


class _CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses what tarfile would read without bounds (see this module's docstring)."""

    max_header = 1 << 20

    def _proc_member(self, tf: Any) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise LayerError(self.name, _SPARSE)
        if self.type not in _EXTENDED:
            result: tarfile.TarInfo = super()._proc_member(tf)  # type: ignore[misc]
            return result
        if self.size > self.max_header:
            raise ImageLimitError("image.max_pax_header_bytes", self.max_header,
                                  f"an extended header record of {self.size} bytes")
        if self.type == tarfile.XGLTYPE:  # global headers accumulate in tarfile for the whole layer
            total = getattr(tf, "_pykata_global_bytes", 0) + self.size
            if total > self.max_header:
                raise ImageLimitError("image.max_pax_header_bytes", self.max_header,
                                      f"global pax headers of {total} bytes in all")
            tf._pykata_global_bytes = total
        depth = getattr(tf, "_pykata_header_chain", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise LayerError(self.name, f"more than {MAX_HEADER_CHAIN} extended header records in a row")
        tf._pykata_header_chain = depth + 1
        try:
            result = super()._proc_member(tf)  # type: ignore[misc]
            return result
        finally:
            tf._pykata_header_chain = depth

    def _proc_gnusparse_00(self, next: tarfile.TarInfo, *_: Any) -> None:
        raise LayerError(next.name, _SPARSE)

    def _proc_gnusparse_01(self, next: tarfile.TarInfo, *_: Any) -> None:
        raise LayerError(next.name, _SPARSE)

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, *_: Any) -> None:
        raise LayerError(next.name, _SPARSE)

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None:
        if any(k.startswith("GNU.sparse.") for k in pax_headers):
            raise LayerError(self.name, _SPARSE)
        super()._apply_pax_info(pax_headers, encoding, errors)  # type: ignore[misc]


def checked_tarinfo(limits: ImageSection) -> type[tarfile.TarInfo]:
    """A TarInfo class for `tarfile.open(tarinfo=...)` that enforces `limits` while headers are read."""
    return type("CheckedTarInfo", (_CheckedTarInfo,), {"max_header": limits.max_pax_header_bytes})
