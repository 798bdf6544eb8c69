"""Container images: the embedded busybox, OCI layouts and archives, `docker save` tarballs, bundles."""

from pykata.images.layers import LayerError, apply_layer
from pykata.images.store import Image, ImageConfig, ImageError, ImageStore

__all__ = ["Image", "ImageConfig", "ImageError", "ImageStore", "LayerError", "apply_layer"]
