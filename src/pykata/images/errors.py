"""Errors of the image store and the layer extractor.

Every failure to resolve, verify or unpack an image is an `ImageError`; the subclasses say which kind
and carry the thing to act on (the tar entry, the cap's configuration key, the blob's digest). The
extractor raises them without knowing the image; the store adds where they happened with `locate`.
"""

from __future__ import annotations

from pykata.errors import PykataError


class ImageError(PykataError):
    """An image cannot be resolved, verified or unpacked; `ref` names it (empty until located)."""

    def __init__(self, ref: str, message: str) -> None:
        super().__init__(f"image {ref!r}: {message}" if ref else message)
        self.ref = ref
        self.detail = message

    def locate(self, ref: str, where: str = "") -> ImageError:
        """Say which image (and which of its blobs) this happened in; returns self, to be re-raised."""
        detail = f"{where}: {self.detail}" if where else self.detail
        self.ref, self.detail = ref, detail
        self.args = (f"image {ref!r}: {detail}",)
        return self


class LayerError(ImageError):
    """A layer entry is malformed, unsupported or tries to leave the root; `member` names it."""

    def __init__(self, member: str, message: str) -> None:
        super().__init__("", f"layer entry {member!r}: {message}")
        self.member = member


class ImageLimitError(ImageError):
    """An image exceeds a configured cap; `limit` is its configuration key (`image.max_entries`)."""

    def __init__(self, limit: str, value: int, message: str) -> None:
        super().__init__("", f"{message}: exceeds {limit} = {value}")
        self.limit = limit
        self.value = value


class BlobError(ImageError):
    """A blob is missing, or its content does not match its digest or size; `digest` names it."""

    def __init__(self, digest: str, message: str) -> None:
        super().__init__("", f"blob {digest}: {message}")
        self.digest = digest
