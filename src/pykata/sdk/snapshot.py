"""Snapshots of SDK sandboxes: `AsyncSandbox.snapshot(path)` and `AsyncSandbox.restore(path)`.

The sandbox layer (pykata.sandbox.snapshot) saves the VM and checks a snapshot against the host; this
adds what the SDK needs to go on where the saved sandbox was: the image name, env, cwd and user of
commands, and the id of its container (kept under the manifest's `extra.sdk`).

What a restored sandbox has: the guest's memory as it was (its files, the container's writable
layer, every process of the container, still running), a new sandbox id, a new VM, fresh randomness
and boot_id, the host's wall clock. What it does not have: handles to processes spawned before the
snapshot (they run on in the guest, but their output is not reachable from the restored sandbox),
the saved sandbox's timeout (pass `timeout=` to restore).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pykata.config import Config
from pykata.errors import PykataError
from pykata.ids import is_valid_id
from pykata.images import ImageStore
from pykata.sandbox import Process
from pykata.sandbox.imageuser import ExecUser
from pykata.sandbox.snapshot import SnapshotError, save
from pykata.sandbox.snapshot import restore as restore_sandbox
from pykata.sdk.errors import SandboxGoneError

# The sandboxes here are pykata.sdk.core.AsyncSandbox (typed Any: core imports this module).

MAX_ENV = 4096


async def snapshot(sb: Any, path: Path, *, close: bool) -> Path:
    """See AsyncSandbox.snapshot."""
    if sb._gone is not None:
        raise SandboxGoneError(sb._gone, sandbox_id=sb.id)
    inner = sb._own("snapshot")
    if not sb.snapshots and inner.share_mounted:  # since the lazy share, a sandbox without volumes has none
        raise SnapshotError("", "this sandbox shares host files with its VM (a volume, or its root); make it "
                                "with Sandbox(..., snapshots=True) to snapshot it")
    if not sb.paused:
        # a shell waiting for the first command, saved with the guest: a restore's first command is
        # written to it instead of exec'd, sparing `crun exec` in a guest whose TCG code cache is cold
        with contextlib.suppress(PykataError):
            await sb.prepare_command()
    prepared = sb._prepared
    extra = {"sdk": {"image": sb.image_ref, "env": sb._env, "cwd": sb._cwd, "container": sb._cid,
                     "user": sb._user.to_list() if sb._user else None,
                     "prepared": {"exec_id": prepared.exec_id, "pid": prepared.pid} if prepared else None}}
    try:
        async with inner.data_disk_lock:  # no file behind the data disk while the VM is saved
            saved = await save(inner, path, extra=extra, resume=not close and not sb.paused)
    finally:
        if close:
            await sb.close()
    return saved.path


def _sdk_extra(manifest: dict[str, Any]) -> dict[str, Any]:
    """The SDK's part of a checked manifest, checked."""
    sdk = manifest["extra"].get("sdk")
    if not isinstance(sdk, dict):
        raise SnapshotError("extra.sdk", "missing: not a snapshot of an SDK sandbox")
    env, cwd, user, image = sdk.get("env"), sdk.get("cwd"), sdk.get("user"), sdk.get("image")
    if not isinstance(env, list) or len(env) > MAX_ENV or not all(isinstance(e, str) and "=" in e for e in env):
        raise SnapshotError("extra.sdk.env", "expected a list of KEY=VALUE strings")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise SnapshotError("extra.sdk.cwd", "expected an absolute path")
    if user is not None and ExecUser.from_list(user) is None:
        raise SnapshotError("extra.sdk.user", "expected [uid, gid, supplementary groups...] (ids in runc's range)")
    if not isinstance(image, str):
        raise SnapshotError("extra.sdk.image", "expected a string")
    ids = [c["id"] for c in manifest["containers"]]
    if sdk.get("container") not in ids:
        raise SnapshotError("extra.sdk.container", "not one of the snapshot's containers")
    prepared = sdk.get("prepared")
    if prepared is not None and not (isinstance(prepared, dict) and is_valid_id(prepared.get("exec_id"))
                                     and isinstance(prepared.get("pid"), int) and 0 < prepared["pid"] < 1 << 22):
        raise SnapshotError("extra.sdk.prepared", "expected {exec_id, pid}")
    return {"env": env, "cwd": cwd, "user": ExecUser.from_list(user) if user else None, "image": image,
            "container": sdk["container"], "prepared": prepared}


async def restore(cls: Any, path: Path, *, config: Config | None, timeout: float | None, name: str) -> Any:
    """See AsyncSandbox.restore."""
    seen: dict[str, Any] = {}

    def opened(manifest: dict[str, Any]) -> None:
        seen.update(_sdk_extra(manifest))

    inner = await restore_sandbox(path, config=config, name=name, on_opened=opened, die_with_owner=True)
    try:
        sb = cls(image=seen["image"], config=inner.config, name=name, snapshots=True)
        sb._sandbox = inner
        sb.egress = inner.egress  # the saved policy, on a new NIC backend and host filter (expose() anew)
        sb._env = seen["env"]
        sb._cwd = seen["cwd"]
        sb._user = seen["user"]
        with contextlib.suppress(PykataError):  # names of a command's `user` are looked up in the image
            store = ImageStore(Path(inner.config.runtime.cache_dir), inner.config.image)
            sb._rootfs = store.resolve(sb.image_ref).rootfs
        sb._cid = seen["container"]
        sb._container = inner.containers[sb._cid]
        if seen["prepared"] is not None:  # a waiting shell the guest was saved with (see snapshot())
            sb._prepared = Process(inner.agent, sb._cid, seen["prepared"]["exec_id"], seen["prepared"]["pid"],
                                   False)
        sb._write_sdk_state()
        if timeout is not None:
            await sb.set_timeout(timeout)
    except BaseException:
        with contextlib.suppress(PykataError):
            await inner.stop()
        raise
    return sb
