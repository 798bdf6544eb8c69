"""One host directory reached by several names at once in one VM: five containers of one sandbox,
created and started together, bind the same host directory (twice), its parent and its child (twice).
Each bind is its own name in the shared directory, so the guest's 9p client sees one server directory
under several names at once, and containers also walk into it from its parent's name. Every container
must see the whole tree, round after round in the same VM. A guest kernel that gave such a directory one
inode let the VFS move its dentry from one name to another while crun bound it, and a container saw it
empty (guestimage/kernel.py SOURCE_EDITS, reverted once for this): this is the stress test of that race
(it failed 10 of 10 runs with that kernel)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pykata.config import load_config
from pykata.images.store import ImageStore
from pykata.sandbox.ocispec import Volume, build_spec
from pykata.sandbox.sandbox import Container, Sandbox

pytestmark = [pytest.mark.vm]

ROUNDS = 5
REPEAT = 3
# what each container prints about its /vol, REPEAT times, by what it binds there (ls: one name a line)
PROBES = {
    "dir": ("ls /vol; cat /vol/f; ls /vol/sub; cat /vol/sub/g", "f\nsub\ntop\ng\nsub\n"),
    "child": ("ls /vol; cat /vol/g", "g\nsub\n"),
    "parent": ("ls /vol; ls /vol/dir; cat /vol/dir/sub/g", "dir\ndir2\nf\nsub\nsub\n"),
}


async def _run(c: Container) -> str:
    await c.start()
    out = b"".join([chunk async for chunk in c.init.chunks()]).decode()
    code = await c.wait()
    await c.delete()
    return f"{out}exit {code}\n"


def _spec(kind: str) -> dict[str, Any]:
    return build_spec(["sh", "-c", f"for i in {' '.join(['x'] * REPEAT)}; do {PROBES[kind][0]}; done"],
                      env=["PATH=/bin"])


async def test_containers_binding_one_host_dir_by_several_names_at_once_see_it_whole(tmp_path: Path) -> None:
    config = load_config()
    busybox = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    top = tmp_path / "top"
    (top / "dir/sub").mkdir(parents=True)
    (top / "dir2").mkdir()
    (top / "dir/f").write_text("top\n")
    (top / "dir/sub/g").write_text("sub\n")
    binds = {"a": ("dir", top / "dir"), "b": ("dir", top / "dir"), "c": ("child", top / "dir/sub"),
             "d": ("parent", top), "e": ("child", top / "dir/sub")}
    sb = await Sandbox.create(config=config, serve_proxy=False)
    try:
        failures = []
        for r in range(ROUNDS):
            made = await asyncio.gather(*(sb.create_container(f"{name}{r}", _spec(kind), busybox,
                                                               volumes=[Volume(host, "/vol")])
                                          for name, (kind, host) in binds.items()))
            outs = await asyncio.gather(*(_run(c) for c in made))
            for (name, (kind, _)), out in zip(binds.items(), outs, strict=True):
                if out != PROBES[kind][1] * REPEAT + "exit 0\n":
                    failures.append(f"round {r} container {name} ({kind}): {out!r}")
        assert not failures, failures
    finally:
        await sb.stop()
