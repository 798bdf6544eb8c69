"""The image pooled pods asked for last (pool.remember_image / recent_image, what a waiting VM pre-fills
a slot with): only a plain disk key is recorded or believed, and only with a pool and the pre-fill on;
a key naming anything outside the disk cache is never found there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pykata.config import load_config
from pykata.factory import pool
from pykata.resources.rootimage import RootImageCache


def test_only_a_plain_disk_key_is_recorded_believed_and_found(tmp_path: Path) -> None:
    base = load_config()
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(tmp_path / "run"),
                                                                   cache_dir=str(tmp_path / "cache")),
                                 factory=dataclasses.replace(base.factory, pool_size=2, pool_prefill_image=True))
    pool.pool_root(config).mkdir(parents=True)
    assert pool.recent_image(config) is None
    pool.remember_image(config, "snap-0123abcd-f3-4096m")
    assert pool.recent_image(config) == "snap-0123abcd-f3-4096m"
    for bad in ("../../etc/passwd", ".hidden", "a/b", "", "x" * 300, "key\n"):
        pool.remember_image(config, bad)
        assert pool.recent_image(config) == "snap-0123abcd-f3-4096m", bad  # refused: the last good one stays
    (pool.pool_root(config) / pool.RECENT_IMAGE).write_text("../../../etc/shadow")
    assert pool.recent_image(config) is None  # a file not written by remember_image is not believed
    off = dataclasses.replace(config, factory=dataclasses.replace(config.factory, pool_prefill_image=False))
    pool.remember_image(off, "snap-other-f3-4096m")
    assert pool.recent_image(config) is None, "recorded with factory.pool_prefill_image = false"
    disks = RootImageCache(config.runtime, config.image)
    disks.dir.mkdir(parents=True)
    (disks.dir / "snap-0123abcd-f3-4096m.ext4").write_bytes(b"")
    assert disks.built("snap-0123abcd-f3-4096m") == disks.dir / "snap-0123abcd-f3-4096m.ext4"
    (tmp_path / "outside.ext4").write_bytes(b"")
    for bad in ("../../outside", "/tmp/outside", ".tmp-x", ""):
        assert disks.built(bad) is None, bad
