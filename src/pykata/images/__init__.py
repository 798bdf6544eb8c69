"""Container images: the embedded busybox, OCI layouts and archives, `docker save` tarballs, bundles."""

from pykata.images.errors import BlobError, ImageError, ImageLimitError, LayerError
from pykata.images.layers import LayerStats, apply_layer
from pykata.images.store import Image, ImageConfig, ImageStore

# registers the embedded images (busybox, pause) into the store
from pykata.images import builtin as _builtin  # noqa: F401  isort: skip

__all__ = ["BlobError", "Image", "ImageConfig", "ImageError", "ImageLimitError", "ImageStore", "LayerError",
           "LayerStats", "apply_layer"]
