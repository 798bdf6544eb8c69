"""Reading untrusted image blobs: digest and size checks while streaming, decompression, caps.

A blob is verified as it is read (`VerifyingReader`): it fails as soon as it is longer than its
descriptor says, and at its end if its digest or size differ, so a layer is never trusted before all of
it has been checked. A layer's uncompressed stream goes through a `CountingReader` that charges the
image's `Budget` (the `[image]` caps) and computes the diff_id the image config promises.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import stat
import zlib
from typing import Any, BinaryIO, Protocol

from pykata.config.schema import ImageSection
from pykata.images.errors import BlobError, ImageError, ImageLimitError

CHUNK = 1 << 20
# OCI image spec, descriptor.md: the encoded part of a registered algorithm's digest.
_DIGEST_RE = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def check_digest(digest: object) -> tuple[str, str]:
    """(algorithm, hex) of an OCI digest string. Raises BlobError for anything else."""
    if not isinstance(digest, str):
        raise BlobError(repr(digest), "a digest must be a string 'sha256:<64 hex digits>'")
    algo, _, hexd = digest.partition(":")
    pattern = _DIGEST_RE.get(algo)
    if pattern is None or not pattern.fullmatch(hexd):
        raise BlobError(repr(digest)[:150], "not a sha256 or sha512 digest of lower-case hex digits")
    return algo, hexd


class Budget:
    """What is left of one image's caps while its layers are unpacked (all layers share it)."""

    def __init__(self, limits: ImageSection) -> None:
        self.limits = limits
        self.bytes_left = limits.max_unpacked_mib << 20
        self.entries = 0

    def charge_bytes(self, n: int) -> None:
        """Raises ImageLimitError once the image's uncompressed layers exceed `max_unpacked_mib`."""
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise ImageLimitError("image.max_unpacked_mib", self.limits.max_unpacked_mib,
                                  "the uncompressed layers are larger (a compression bomb?)")

    def check_size(self, member: str, size: int) -> None:
        """Raises ImageLimitError if an entry's declared size cannot fit in what is left."""
        if size > max(self.bytes_left, 0):
            raise ImageLimitError("image.max_unpacked_mib", self.limits.max_unpacked_mib,
                                  f"entry {member[:200]!r} declares {size} bytes, more than is left")

    def charge_entry(self) -> None:
        """Raises ImageLimitError once the image has more than `max_entries` tar entries."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ImageLimitError("image.max_entries", self.limits.max_entries,
                                  f"the layers have more than {self.limits.max_entries} entries")

    def check_free_space(self, fd: int, size: int) -> None:
        """Raises ImageLimitError if writing `size` bytes leaves less than `min_free_mib` free."""
        st = os.fstatvfs(fd)
        free = st.f_bavail * st.f_frsize - size
        if free < self.limits.min_free_mib << 20:
            raise ImageLimitError("image.min_free_mib", self.limits.min_free_mib,
                                  f"the cache file system would have {max(free, 0) >> 20} MiB free")


class VerifyingReader:
    """Reads a blob while hashing and counting it.

    Raises BlobError as soon as more than `size` bytes come, and at the end (the first empty read, or
    `finish`) if the size or the digest differ from what the descriptor says.
    """

    def __init__(self, f: Readable, digest: str, size: int | None) -> None:
        algo, self._hex = check_digest(digest)
        self.digest, self.size = digest, size
        self._f = f
        self._h = hashlib.new(algo)
        self.count = 0
        self.verified = False

    def read(self, n: int = -1, /) -> bytes:
        if self.verified:
            return b""
        if n is None or n < 0:
            n = CHUNK
        if self.size is not None:
            n = min(n, self.size + 1 - self.count)  # one byte past the size is enough to see it is too long
        data = self._f.read(max(n, 1))
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise BlobError(self.digest, f"longer than the {self.size} bytes its descriptor says")
        if not data:
            self._check()
        self._h.update(data)
        return data

    def finish(self) -> None:
        """Read what is left and check the digest and size. Raises BlobError."""
        while self.read(CHUNK):
            pass

    def _check(self) -> None:
        if self.size is not None and self.count != self.size:
            raise BlobError(self.digest, f"{self.count} bytes, but its descriptor says {self.size}")
        if self._h.hexdigest() != self._hex:
            raise BlobError(self.digest, f"content does not match its digest (it has "
                                         f"{self._h.name}:{self._h.hexdigest()})")
        self.verified = True


class _Prefixed:
    """A reader that first returns bytes already peeked from `f`."""

    def __init__(self, head: bytes, f: Readable) -> None:
        self._head, self._f = head, f

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n is None or n < 0:
                n = len(self._head)
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._f.read(n)


_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def decompressed(f: Readable) -> Readable:
    """`f` decompressed by its magic bytes (gzip, bzip2, xz; plain tar as is), read in bounded chunks.

    Raises ImageError for zstd, which Python 3.11 cannot read.
    """
    head = b""
    while len(head) < 6:
        more = f.read(6 - len(head))
        if not more:
            break
        head += more
    prefixed = _Prefixed(head, f)
    src: Any = prefixed  # file-like enough for the decompressors: they only call read()
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=src, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(src)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(src)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise ImageError("", "zstd-compressed layers are not supported (re-push the image with gzip)")
    return prefixed


class CountingReader:
    """A layer's uncompressed stream: charges the budget and hashes it for the diff_id check."""

    def __init__(self, f: Readable, budget: Budget) -> None:
        self._f = f
        self._budget = budget
        self._h = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        try:
            data = self._f.read(n)
        except ImageError:
            raise
        except _DECOMPRESS_ERRORS as e:
            raise ImageError("", f"the layer cannot be decompressed: {e}") from None
        self.count += len(data)
        self._budget.charge_bytes(len(data))
        self._h.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (tar padding and trailing data are part of the diff_id)."""
        while self.read(CHUNK):
            pass

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._h.hexdigest()


def read_small(f: Readable, limit: int, what: str) -> bytes:
    """Read all of `f`, refusing more than `limit` bytes. Raises ImageError."""
    data = b""
    while True:
        more = f.read(min(CHUNK, limit + 1 - len(data)))
        if not more:
            return data
        data += more
        if len(data) > limit:
            raise ImageError("", f"{what} is larger than {limit} bytes")


def open_blob_file(root_fd: int, parts: list[str], name: str) -> BinaryIO:
    """Open a regular file below a directory without following symlinks anywhere on the way.

    Raises BlobError (missing) or ImageError (a symlink, a FIFO, or not a regular file).
    """
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except FileNotFoundError:
        raise BlobError(name, "missing from the image") from None
    except OSError as e:
        raise ImageError("", f"{name}: cannot open ({e.strerror}; symlinks are not followed)") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise ImageError("", f"{name}: not a regular file")
    return os.fdopen(ffd, "rb")
