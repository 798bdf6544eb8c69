"""A pod's hostPath (a CRI bind mount; the SDK's and the CLI's volumes are the same host binds) aimed at
pykata's own files: the runtime directory (every pod's state, sockets and shared directories, where the
host side trusts what it reads), the cache, the template's memory file that every clone maps, the fork
server's socket directory, the configuration and the installed package. Shared with the guest, which
may be hostile, a writable one would let it change what other pods boot from or what the host runs.
Each is refused before anything is mounted, naming mounts[i].source; a symlink to one counts as it; a
writable parent of one is refused, a read-only one is not (but "/" holds the host's /proc: refused,
see test_writable_sources_at_the_host_kernels_interfaces_are_refused); the pod goes on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pykata
from pykata.errors import InvalidArgument
from pykata.images import ImageStore
from pykata.resources import mounts
from pykata.resources.mountapi import MountError
from pykata.sandbox import Sandbox, build_spec, ocispec
from pykata.sandbox.ocispec import HANDOFF_DIR, Volume, check_host_bind_sources, protected_host_dirs
from pykata.shim import handoff


def _bind(source: str, readonly: bool = False) -> dict[str, object]:
    return {"destination": "/mnt/x", "type": "bind", "source": source,
            "options": ["rbind", "ro" if readonly else "rw"]}


def test_the_rule_on_specs(tmp_path: Path) -> None:
    runtime, cache = tmp_path / "run" / "pykata", tmp_path / "cache"
    runtime.mkdir(parents=True)
    cache.mkdir()
    protected = protected_host_dirs(runtime, cache, runtime / "template", Path("/etc/pykata"))
    link = tmp_path / "innocent"
    link.symlink_to(runtime / "sandboxes")
    refused = [
        (str(runtime), False, "is pykata's own"), (f"{runtime}/sandboxes/other/shared", True, "is pykata's own"),
        (f"{runtime}/template/memory", True, "is pykata's own"), (f"{cache}/", False, "is pykata's own"),
        (f"{runtime}/../pykata/s", False, "is pykata's own"), (str(link), True, "is pykata's own"),
        (HANDOFF_DIR, True, "is pykata's own"), ("/etc/pykata/configuration.toml", True, "is pykata's own"),
        (str(Path(pykata.__file__).parent / "config"), True, "is pykata's own"),
        (str(tmp_path / "run"), False, "holds pykata's own"), ("/", False, "holds pykata's own"),
    ]
    for source, readonly, why in refused:
        spec = {"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}, _bind(source, readonly)]}
        with pytest.raises(InvalidArgument, match=f"^mounts\\[1\\]\\.source: .*{why}"):
            check_host_bind_sources(spec, protected)
    (tmp_path / "data").mkdir()
    allowed = [_bind(str(tmp_path / "run"), readonly=True), _bind(str(tmp_path / "data")),
               _bind("/run/containerd/io.containerd.grpc.v1.cri/sandboxes/x/shm"), _bind(f"{runtime}-other")]
    check_host_bind_sources({"mounts": allowed}, protected)
    # moved into the guest (emptyDir, watched volumes) or the pod's /dev/shm: not shared from the host
    check_host_bind_sources({"mounts": [_bind(str(runtime))]}, protected, skip={0})
    check_host_bind_sources({"mounts": [{**_bind(str(runtime)), "destination": "/dev/shm"}]}, protected)
    assert HANDOFF_DIR == handoff.HANDOFF_DIR


def test_writable_sources_at_the_host_kernels_interfaces_are_refused(tmp_path: Path) -> None:
    """/proc, /sys, cgroups and the like hold the host's knobs (sysctls, other processes'
    oom_score_adj, cgroup limits): a writable one shared with a VM lets the guest set them. Through a
    read-only proc the guest reads host processes' memory: refused too, "/" included."""
    mountinfo = ("22 1 0:5 / /proc rw - proc proc rw\n"
                 "23 1 0:6 / /sys rw,nosuid - sysfs sysfs rw\n"
                 "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
                 "32 31 0:29 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory\n"
                 "40 1 0:40 / /srv/with\\040space/q rw - mqueue mqueue rw\n"
                 "41 1 8:1 / /srv rw - ext4 /dev/sda1 rw\n"
                 "42 23 0:7 / /sys/kernel/debug rw - debugfs debugfs rw\n")
    kernel = ocispec.kernel_interface_mounts(mountinfo)
    assert kernel == [ocispec.KernelMount(Path("/proc"), "proc"), ocispec.KernelMount(Path("/sys"), "sysfs"),
                      ocispec.KernelMount(Path("/sys/fs/cgroup/memory"), "cgroup"),
                      ocispec.KernelMount(Path("/srv/with space/q"), "mqueue"),
                      ocispec.KernelMount(Path("/sys/kernel/debug"), "debugfs")]
    assert ocispec.KernelMount(Path("/proc"), "proc") in ocispec.kernel_interface_mounts()  # this host's
    link = tmp_path / "innocent"
    link.symlink_to("/proc/sys")
    for source in ("/proc", "/proc/sys/kernel", str(link), "/sys", "/sys/kernel", "/sys/kernel/debug/x",
                   "/sys/fs/cgroup", "/sys/fs/cgroup/memory/x", "/srv/with space", "/srv/with space/q", "/"):
        with pytest.raises(InvalidArgument, match=r"^mounts\[0\]\.source: .*an interface of the host's kernel"):
            check_host_bind_sources({"mounts": [_bind(source)]}, [], kernel_mounts=kernel)
        if source in ("/proc", "/proc/sys/kernel", str(link), "/", "/sys", "/sys/kernel", "/sys/kernel/debug/x"):
            # read-only too: through proc the file server reads host processes' memory, through debugfs
            # what only the host's root may read
            with pytest.raises(InvalidArgument, match=r"^mounts\[0\]\.source: .*the host's (proc|debugfs).*memory"):
                check_host_bind_sources({"mounts": [_bind(source, readonly=True)]}, [], kernel_mounts=kernel)
        else:
            check_host_bind_sources({"mounts": [_bind(source, readonly=True)]}, [], kernel_mounts=kernel)
    check_host_bind_sources({"mounts": [_bind("/srv/other"), _bind(str(tmp_path)), _bind("/sys/kernel/mm", True)]},
                            [], kernel_mounts=kernel)
    # a pod spec's text is quoted escaped
    with pytest.raises(InvalidArgument) as info:
        check_host_bind_sources({"mounts": [_bind("/proc/\x1b[2J\n")]}, [], kernel_mounts=kernel)
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.vm
async def test_hostpaths_at_pykatas_own_files_are_refused_in_a_real_sandbox(tmp_path: Path) -> None:
    config = pykata.config.load_config()
    image = ImageStore(Path(config.runtime.cache_dir)).resolve("busybox")
    sandbox = await Sandbox.create(config=config)
    env = list(image.config.env)
    try:
        runtime = config.runtime.runtime_path
        attacks = [Volume(runtime, "/h", False), Volume(runtime / "sandboxes" / sandbox.id, "/h", True),
                   Volume(Path(config.factory.template_path), "/h", False),
                   Volume(config.runtime.cache_path, "/h", True),
                   Volume(Path(HANDOFF_DIR), "/h", False), Volume(Path("/run"), "/h", False)]
        for i, vol in enumerate(attacks):
            cid = f"hostpath-{i}"
            with pytest.raises(InvalidArgument, match=r"^mounts\[\d+\]\.source: .*pykata's own"):
                await sandbox.create_container(cid, build_spec(["true"], env=env), image.rootfs, volumes=(vol,))
            assert cid not in sandbox.containers
            assert not (sandbox.shared_dir / cid).exists() and not (sandbox.mounts.mounts_dir / cid).exists()
        # the pod goes on: a container with an ordinary volume works
        data = tmp_path / "data"
        data.mkdir()
        (data / "f").write_text("ok")
        c = await sandbox.create_container("fine", build_spec(["cat", "/d/f"], env=env), image.rootfs,
                                           volumes=(Volume(data, "/d", True),))
        await c.start()
        out = b""
        async for chunk in c.init.chunks():
            out += chunk
        assert (await c.wait(), out) == (0, b"ok")

        # The race: the guest owns a read-write volume (a host directory) and the pod mounts a path in
        # it as another hostPath. The path passes the rule as a directory; the guest swaps it for a
        # symlink to pykata's runtime directory after the check and before the host binds it (here
        # at the first await between them, by a real exec in the guest over the shared file system;
        # the window holds a whole image-disk build). The host must bind what it checked or nothing.
        share = tmp_path / "share"
        (share / "x").mkdir(parents=True)
        racer = await sandbox.create_container("racer", build_spec(["sleep", "600"], env=env), image.rootfs,
                                               volumes=(Volume(share, "/s", False),))
        await racer.start()
        real_root_disk = sandbox._root_disk

        async def guest_swaps_then_root_disk(*args: object, **kwargs: object) -> object:
            p = await racer.exec(["sh", "-c", f"mv /s/x /s/x.real && ln -s {runtime} /s/x"], env=env)
            assert await p.wait() == 0
            return await real_root_disk(*args, **kwargs)  # type: ignore[arg-type]

        sandbox._root_disk = guest_swaps_then_root_disk  # type: ignore[method-assign]
        try:
            with pytest.raises(MountError, match="symbolic link"):
                await sandbox.create_container("victim", build_spec(["true"], env=env), image.rootfs,
                                               volumes=(Volume(share / "x", "/h", False),))
        finally:
            sandbox._root_disk = real_root_disk  # type: ignore[method-assign]
            if "victim" in sandbox.containers:  # the attack worked: undo it before the assertions fail
                await sandbox.containers["victim"].delete()
        assert (share / "x").is_symlink() and os.readlink(share / "x") == str(runtime)  # the swap did happen
        assert "victim" not in sandbox.containers and not (sandbox.mounts.mounts_dir / "victim").exists()
        assert mounts.mounts_under(sandbox.mounts.mounts_dir / "victim") == []
    finally:
        await sandbox.stop(remove=True)
    assert os.path.isdir(config.runtime.runtime_path)  # untouched


@pytest.mark.vm
async def test_a_guest_cannot_set_host_knobs_or_read_host_memory_through_proc_or_sys(tmp_path: Path) -> None:
    """A pod's writable hostPath of /proc let its guest write the host's /proc through its file server
    (root): it set the oom_score_adj of a host process (and could set any sysctl: kernel.core_pattern
    runs a program as the host's root). A read-only one let it read the environment, maps and memory
    (/proc/<pid>/mem) of host root processes with no more capabilities than the file server: other
    pods' file servers (virtiofsd maps its VM's RAM). Writable /proc, /sys and cgroup sources and any
    /proc (read-only "/" included) are refused before anything is mounted; a read-only sysfs directory
    still shares and stays read-only. The victim is a host `sleep` without capabilities holding a secret."""
    import subprocess

    config = pykata.config.load_config()
    image = ImageStore(Path(config.runtime.cache_dir)).resolve("busybox")
    env = list(image.config.env)
    victim = subprocess.Popen(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "sleep", "600"],
                              stdin=subprocess.DEVNULL, env={**os.environ, "PYKATA_HOST_SECRET": "hunter2-on-the-host"})
    adj = Path(f"/proc/{victim.pid}/oom_score_adj")
    before = adj.read_text()
    link = tmp_path / "innocent"
    link.symlink_to("/proc")
    v = victim.pid
    attack = (f"echo 777 > /h/{v}/oom_score_adj; tr '\\0' ' ' < /h/{v}/environ; "
              f"a=$(grep -m1 stack /h/{v}/maps | cut -d- -f1); dd if=/h/{v}/mem bs=4096 skip=$((0x$a / 4096)) count=1")
    sandbox = await Sandbox.create(config=config)
    try:
        attacks = [(Path("/proc"), False), (link, False), (Path("/proc/sys"), False), (Path(f"/proc/{v}"), False),
                   (Path("/sys"), False), (Path("/sys/fs/cgroup"), False), (Path("/proc"), True), (link, True),
                   (Path(f"/proc/{v}"), True), (Path("/"), True)]
        for i, (host, readonly) in enumerate(attacks):
            cid = f"knob-{i}"
            with pytest.raises(InvalidArgument, match=r"^mounts\[\d+\]\.source: .*an interface of the host's kernel"):
                await sandbox.create_container(cid, build_spec(["sh", "-c", attack.replace("/h/", "/h/proc/")
                                                                if host == Path("/") else attack], env=env),
                                               image.rootfs, volumes=(Volume(host, "/h", readonly),))
            assert cid not in sandbox.containers
            assert not (sandbox.shared_dir / cid).exists() and not (sandbox.mounts.mounts_dir / cid).exists()
        # a read-only sysfs directory: the guest sees the host's and cannot write it (reading a sysfs file
        # through the pooled VM's 9p never returns: not asked here). Not /sys: on most hosts it holds
        # debugfs and tracefs, refused read-only too.
        c = await sandbox.create_container(
            "reader", build_spec(["sh", "-c", "ls /h/transparent_hugepage >/dev/null && echo LISTED; "
                                  "echo never > /h/transparent_hugepage/enabled && echo WROTE"], env=env),
            image.rootfs, volumes=(Volume(Path("/sys/kernel/mm"), "/h", True),))
        await c.start()
        out = b""
        async for chunk in c.init.chunks():
            out += chunk
        assert await c.wait() != 0
        assert b"LISTED" in out and b"WROTE" not in out, out
        await c.delete()
    finally:
        after = adj.read_text()
        await sandbox.stop(remove=True)
        victim.kill()
        victim.wait()
    assert after == before, f"the guest set a host process's oom_score_adj: {before!r} -> {after!r}"
