"""The files API's data-disk path (pykata.sandbox.datadisk, pykata.agent.diskfile) in a real VM: files
bigger than one piece, modes and owners, errors the guest's file system gives, and what a cancelled
transfer leaves (nothing: the disk is emptied, the host file gone)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

import pykata
from pykata.config import load_config
from pykata.protocols.agent import PROTOCOL_VERSION
from pykata.sdk import AsyncSandbox
from tests.vmfactory import held_deleted_files

pytestmark = [pytest.mark.vm]


async def test_files_move_through_the_data_disk_in_pieces(tmp_path: Path) -> None:
    base = load_config()
    # 1 MiB pieces, so a few MiB take several copies; a cold boot (a template has the default disk)
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, data_disk_mib=1),
                                 factory=dataclasses.replace(base.factory, enable_template=False))
    sb = AsyncSandbox(config=config, user="1000:1000", cwd="/tmp")
    await sb.start()
    try:
        vm = sb._sandbox.vm  # type: ignore[union-attr]
        assert vm is not None and vm.data_disk_size == 1 << 20 and vm.pid is not None
        run_dir = Path(config.runtime.runtime_dir)

        # several pieces and a tail, written as the sandbox's user, mode applied once it is whole
        data = os.urandom((5 << 19) + 3)
        seen: list[tuple[int, int]] = []
        await sb.files.write("sub/dir/f.bin", data, mode=0o444, progress=lambda d, t: seen.append((d, t)))
        assert [d for d, _ in seen] == [1 << 20, 2 << 20, len(data)] and {t for _, t in seen} == {len(data)}
        info = await sb.files.stat("/tmp/sub/dir/f.bin")
        assert (info.size, info.mode, info.uid, info.gid) == (len(data), 0o444, 1000, 1000)
        assert await sb.files.read_bytes("/tmp/sub/dir/f.bin") == data

        # exactly one piece: the mode comes with an empty last copy
        one = os.urandom(1 << 20)
        await sb.files.write("/tmp/one", one, mode=0o600)
        assert (await sb.files.stat("/tmp/one")).mode == 0o600 and await sb.files.read_bytes("/tmp/one") == one
        # an empty file, through the data disk as a file object of unknown size
        with open(os.devnull, "rb") as empty:
            await sb.files.write("/tmp/empty", empty)
        assert await sb.files.read_bytes("/tmp/empty") == b""

        # upload and download keep the bits; download appears whole, with progress
        local = tmp_path / "up.bin"
        local.write_bytes(data)
        local.chmod(0o640)
        await sb.files.upload(local, "/tmp/up.bin")
        back = tmp_path / "down.bin"
        got: list[tuple[int, int]] = []
        await sb.files.download("/tmp/up.bin", back, progress=lambda d, t: got.append((d, t)))
        assert back.read_bytes() == data and back.stat().st_mode & 0o777 == 0o640
        assert got[-1] == (len(data), len(data)) and len(got) == 3

        # the copy is the sandbox's process (its user and capabilities): it may do what `cat` there may
        assert (await sb.run("mkdir -m 700 /tmp/private && head -c 2000000 /dev/urandom > /tmp/private/y",
                             user="0:0")).exit_code == 0
        by_cat = await sb.run(["cat", "/tmp/private/y"], max_output=4 << 20)
        if by_cat.exit_code == 0:
            assert await sb.files.read_bytes("/tmp/private/y") == by_cat.stdout
        else:
            with pytest.raises(pykata.PolicyDeniedError, match="Permission denied"):
                await sb.files.read_bytes("/tmp/private/y")
        with pytest.raises(pykata.PolicyDeniedError, match="Read-only file system"):
            await sb.files.write("/sys/x", data)  # sysfs, mounted read-only in the container
        with pytest.raises(pykata.NotFoundError):
            await sb.files.read_bytes("/tmp/none")
        with pytest.raises(pykata.SdkError, match="not a regular file"):
            await sb.files.download("/tmp/sub", tmp_path / "dir.bin")
        with pytest.raises(pykata.SdkError, match="more than 1000 bytes"):
            await sb.files.read_bytes("/tmp/up.bin", max_bytes=1000)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["down.bin", "up.bin"]

        # Ctrl-C mid-transfer (cancelled after its first piece): the disk is emptied, the host file
        # gone, and the next transfer works
        task: asyncio.Task[None] | None = None

        def cancel_after_first(done: int, total: int) -> None:
            assert task is not None
            task.cancel()

        task = asyncio.ensure_future(sb.files.write("/tmp/cancelled", data, progress=cancel_after_first))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not held_deleted_files(vm.pid, run_dir)
        assert not vm._data_disk.attached  # type: ignore[attr-defined]
        await sb.files.write("/tmp/after", data)
        assert await sb.files.read_bytes("/tmp/after") == data
        assert not held_deleted_files(vm.pid, run_dir)

        # The host asked the real agent its protocol version when it first connected (this image's);
        # as seen from a host talking to a guest image older than the DiskFile RPCs (protocol 4), the
        # same transfers take the stdio path, and nothing is sent to the guest that it would not know
        agent = sb._sandbox.agent  # type: ignore[union-attr]
        assert (agent.protocol_version, agent.agent_version) == (PROTOCOL_VERSION, pykata.__version__)
        agent.protocol_version = 4
        calls = {m: n for m, n, _, _ in agent.stats.snapshot()}
        await sb.files.write("/tmp/old", data)
        assert await sb.files.read_bytes("/tmp/old") == data
        after = {m: n for m, n, _, _ in agent.stats.snapshot()}
        assert all(after.get(rpc) == calls.get(rpc) for rpc in ("WriteFileFromDisk", "ReadFileToDisk"))
        assert after["ExecProcess"] != calls["ExecProcess"]  # cat and its writer
    finally:
        await sb.close()
