"""The guest image: the kernel and root filesystem that pykata boots inside each VM."""
