"""The Python API: disposable VM sandboxes from code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pykata
from pykata.sandbox import SpecError

pytestmark = [pytest.mark.vm]


def test_commands_processes_pty_and_lifecycle_of_one_sandbox() -> None:
    with pykata.Sandbox(image="busybox", env={"GREETING": "hello"}) as sb:
        # run: str through /bin/sh -c, a list as argv; a non-zero exit is a result
        r = sb.run("echo $GREETING; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"hello\n", b"err\n")
        assert sb.exec(["cat"], stdin=b"data in").stdout == b"data in"  # the first SDK's name
        assert sb.run("ls /sys/class/net").stdout == b"lo\n"  # no network unless asked for: no NIC at all
        assert sb.run("id -u; id -g; pwd; echo $X", user="1000:2000", cwd="/tmp", env={"X": "y"}).stdout == \
            b"1000\n2000\n/tmp\ny\n"
        with pytest.raises(pykata.SandboxTimeoutError) as timed_out:
            sb.run("echo started; sleep 30", timeout=1)
        assert timed_out.value.stdout == b"started\n"
        # a command printing without end is cut at max_output and killed
        with pytest.raises(pykata.SdkError, match="more than 65536 bytes"):
            sb.run("yes", max_output=65536)
        with pytest.raises(SpecError, match="env"):
            sb.run("true", env=["NOEQUALS"])
        # run's output comes with the exit, bounded: more than the agent's buffers and the wait's limit
        # (the wait answers early, before the exit), input larger than the exec carries, and a
        # descendant that keeps stdout open after the command exited (the rest is read on)
        assert len(sb.run(["head", "-c", str(3 << 20), "/dev/zero"]).stdout) == 3 << 20
        assert sb.run(["wc", "-c"], stdin=b"z" * ((2 << 20) + 5)).stdout.strip() == str((2 << 20) + 5).encode()
        r = sb.run("(sleep 1; echo late) & echo early")
        assert (r.exit_code, r.stdout) == (0, b"early\nlate\n")

        # spawn: a background process; its output waits until someone reads it
        proc = sb.spawn("for i in 1 2 3; do echo $i; done; read x; echo got $x", stdin=True)
        assert proc.pid > 0 and proc.pid in [p.pid for p in sb.processes()]
        seen = b""
        for _, chunk in proc:
            seen += chunk
            if seen.endswith(b"3\n"):
                break  # leave the loop with the process still running
        assert seen == b"1\n2\n3\n"
        proc.stdin.write("line\n")
        proc.stdin.close()
        rest = b"".join(chunk for _, chunk in proc)  # reading again continues where the first left off
        assert rest == b"got line\n" and proc.wait() == 0
        sleeper = sb.spawn(["sleep", "1000"])
        sleeper.kill()
        assert sleeper.wait() == 128 + 9
        assert sleeper.pid not in [p.pid for p in sb.processes()]
        items = list(sb.stream(["sh", "-c", "echo a; echo b >&2"]))
        assert ("stdout", b"a\n") in items and ("stderr", b"b\n") in items and items[-1] == ("exit", b"0")
        both = sb.spawn(["sh", "-c", "echo o; echo e >&2"])
        assert sorted(both.output()) == [("stderr", b"e\n"), ("stdout", b"o\n")] and both.wait() == 0

        # pty: a real terminal, resizable
        term = sb.pty("sh", cols=100, rows=30)
        term.write("stty size; tty; exit 7\n")
        screen = b""
        while (chunk := term.read()) is not None:
            screen += chunk
        assert b"30 100" in screen and b"/dev/pts/" in screen and term.wait() == 7

        # pause: the VM stops; calls are refused until resume
        sb.pause()
        with pytest.raises(pykata.PolicyDeniedError, match="paused"):
            sb.run("true")
        time.sleep(3)
        sb.resume()
        assert sb.run("echo back").stdout == b"back\n"
        # the guest's clock, stopped with its vCPUs, was set again on resume
        assert abs(int(sb.run("date +%s").stdout) - time.time()) < 2.5
        m = sb.metrics()
        assert m.cpu_seconds > 0 and m.memory_bytes > 0 and m.pids >= 1

        # the sandbox's lifetime: destroyed when its timeout passes
        sb.set_timeout(1)
        sandbox_dir = Path(f"/run/pykata/sandboxes/{sb.id}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sandbox_dir.exists():
            time.sleep(0.2)
        assert not sandbox_dir.exists()  # the VM and its directory are gone without close()
        with pytest.raises(pykata.SandboxGoneError, match="timeout"):
            sb.run("true")


def test_files_in_the_container(tmp_path: Path) -> None:
    with pykata.Sandbox(image="busybox", cwd="/tmp") as sb:
        sb.files.write("/work/dir/a.txt", "hello")  # parents are made
        assert sb.files.read("/work/dir/a.txt") == "hello"
        sb.files.write("rel.bin", b"\x00\x01", mode=0o600)  # relative to the sandbox's cwd
        info = sb.files.stat("/tmp/rel.bin")
        assert (info.type, info.size, info.mode, info.name) == ("file", 2, 0o600, "rel.bin")
        sb.files.mkdir("/work/dir/sub")
        sb.run("ln -s a.txt /work/dir/link; touch '/work/dir/odd name\nwith newline'")
        listing = {f.name: f.type for f in sb.files.list("/work/dir")}
        assert listing == {"a.txt": "file", "sub": "dir", "link": "symlink", "odd name\nwith newline": "file"}
        assert sb.files.exists("/work/dir/link") and not sb.files.exists("/work/nothing")
        sb.files.remove("/work/dir/a.txt")
        assert not sb.files.exists("/work/dir/a.txt")
        sb.files.remove("/work/dir", recursive=True)
        with pytest.raises(pykata.NotFoundError):
            sb.files.read("/work/dir/a.txt")
        with pytest.raises(pykata.NotFoundError):
            sb.files.remove("/work/dir")
        with pytest.raises(pykata.PolicyDeniedError, match="path"):
            sb.files.read("/etc/passwd\0x")
        with pytest.raises(pykata.SdkError, match="more than 10 bytes"):
            sb.files.read_bytes("/etc/passwd", max_bytes=10)

        # paths are resolved by the guest in the container: a link to a host path reaches nothing of
        # the host's, and a write to a host path lands in the container
        sb.run("ln -s /run/pykata /tmp/host-runtime")
        with pytest.raises(pykata.NotFoundError):
            sb.files.list("/tmp/host-runtime")
        sb.files.write("/run/pykata/escape-test", "inside")
        assert not Path("/run/pykata/escape-test").exists()
        assert sb.files.read("/run/pykata/escape-test") == "inside"

        # upload / download stream with progress; permission bits are kept both ways
        local = tmp_path / "big.bin"
        local.write_bytes(os.urandom(3 << 20) + b"tail")
        local.chmod(0o640)
        seen: list[tuple[int, int]] = []
        sb.files.upload(local, "/data/big.bin", progress=lambda done, total: seen.append((done, total)))
        size = (3 << 20) + 4
        assert seen[-1] == (size, size) and [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert sb.files.stat("/data/big.bin").mode == 0o640
        back = tmp_path / "back.bin"
        got: list[int] = []
        sb.files.download("/data/big.bin", back, progress=lambda done, total: got.append(done))
        assert back.read_bytes() == local.read_bytes() and got[-1] == size
        assert back.stat().st_mode & 0o777 == 0o640
        with pytest.raises(pykata.NotFoundError):
            sb.files.download("/data/none", tmp_path / "none")
        assert not (tmp_path / "none").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
            "back.bin", "big.bin"]


async def test_async_sandbox_same_surface() -> None:
    async with pykata.AsyncSandbox(image="busybox") as sb:
        r = await sb.run(["sh", "-c", "echo hi"], timeout=30)
        assert r.ok and r.text == "hi\n"
        await sb.files.write("/x", "y")
        assert await sb.files.read("/x") == "y"
        proc = await sb.spawn("echo out; echo err >&2")
        assert sorted([item async for item in proc]) == [("stderr", b"err\n"), ("stdout", b"out\n")]
        assert await proc.wait() == 0
        assert sb.id in [info.id for info in pykata.AsyncSandbox.list()]
        # another handle (as another process would make) reaches it through the owner's agent proxy
        other = await pykata.AsyncSandbox.connect(sb.id[:8])
        assert await other.files.read("/x") == "y"
        assert (await other.run("echo $0 from $(pwd)", cwd="/tmp")).stdout == b"/bin/sh from /tmp\n"
        with pytest.raises(pykata.PolicyDeniedError, match="owner"):
            await other.pause()
        await other.close()  # disconnects; the sandbox stays
        assert (await sb.run("true")).ok
    with pytest.raises(pykata.NotFoundError):
        await pykata.AsyncSandbox.connect("no-such-sandbox")
    with pytest.raises(pykata.SandboxGoneError, match="closed"):
        await sb.run("true")


def test_pool_hands_each_sandbox_out_once_and_refills() -> None:
    with pykata.Pool(size=1, image="busybox", timeout=300) as pool:
        pool.wait_ready(timeout=120)
        with pool.acquire(timeout=120) as first:
            # the first command runs in the shell the pool prepared (AsyncSandbox.prepare_command):
            # argv quoting, stdin after the command line, output and exit status as for any command
            assert first._async._prepared is not None
            r = first.run(["sh", "-c", 'printf "%s|" "$@"; cat; exit 3', "x", "a b", "it's $HOME"], stdin="in\n")
            assert first._async._prepared is None
            assert (r.exit_code, r.stdout) == (3, b"a b|it's $HOME|in\n")
            assert first.run("echo 'two\nlines'").stdout == b"two\nlines\n"  # a normal exec
            first.files.write("/mine", "secret of user 1")
            assert first.deadline is not None  # the lifetime starts at acquire
            first_id = first.id
        pool.wait_ready(timeout=120)  # refilled in the background
        with pool.acquire(timeout=120) as second:
            assert second.id != first_id and not second.files.exists("/mine")  # never reused
        pool.wait_ready(timeout=120)
        assert pool.ready == 1 and len(_mine()) == 1  # the idle one
    assert _mine() == []  # closing the pool destroyed the idle sandbox; the acquired ones were closed
    with pytest.raises(pykata.SandboxGoneError):
        pool.acquire()


def test_a_paused_pool_hands_out_a_running_sandbox_with_the_right_clock() -> None:
    """pause_idle=True: the waiting VM is paused (its guest clock stands still); acquire resumes it
    and resets the clock before the first command runs."""
    with pykata.Pool(size=1, image="busybox", pause_idle=True) as pool:
        pool.wait_ready(timeout=120)
        waiting = pool._async._ready._queue[0]  # type: ignore[attr-defined]
        assert waiting.paused
        time.sleep(3)
        with pool.acquire(timeout=120) as sb:
            assert not sb.paused
            guest = int(sb.run("date +%s").stdout)
            assert abs(guest - time.time()) < 2


def _mine() -> list[str]:
    """Sandboxes this test process owns."""
    out = []
    for d in Path("/run/pykata/sandboxes").iterdir():
        try:
            if json.loads((d / "state.json").read_text())["owner_pid"] == os.getpid():
                out.append(d.name)
        except (OSError, ValueError, KeyError):
            continue
    return out


def test_the_images_user_unless_one_is_given_as_docker(tmp_path: Path) -> None:
    """A sandbox runs as its image's USER (names from the image's /etc/passwd and /etc/group, the
    resolver of `pykata run`), its container's init too, as docker and containerd would; it ran as
    root. `user=` overrides it as docker's -u (a name or numbers), for the sandbox or one command."""
    import tarfile

    from pykata.images import ImageStore
    from tests.security.imagekit import oci_image

    busybox = ImageStore(tmp_path / "cache").resolve("busybox").rootfs
    with tarfile.open(tmp_path / "layer.tar", "w") as t:
        t.add(busybox, arcname=".")
    layout, _ = oci_image(tmp_path / "image", [(tmp_path / "layer.tar").read_bytes()], config={
        "Cmd": ["sh"], "User": "nobody", "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
    init_uid = "awk '/^Uid/ {print $2}' /proc/1/status"
    with pykata.Sandbox(image=str(layout)) as sb:
        assert sb.run("id").stdout == b"uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"
        assert sb.run(init_uid).stdout == b"65534\n"
        assert sb.run("id", user="root").stdout == b"uid=0(root) gid=0(root) groups=0(root)\n"
        assert sb.run("id", user=(4242, 7)).stdout == b"uid=4242 gid=7 groups=7\n"
        sb.files.write("/tmp/made", "x")  # files are written as the sandbox's user too
        assert (sb.files.stat("/tmp/made").uid, sb.files.stat("/tmp/made").gid) == (65534, 65534)
    with pykata.Sandbox(image=str(layout), user="root") as sb:
        assert sb.run(f"id -u; {init_uid}").stdout == b"0\n0\n"


def test_unknown_image_raises_before_any_vm() -> None:
    with pytest.raises(pykata.PykataError, match="unknown image"), pykata.Sandbox(image="nope"):
        pass


async def test_bad_arguments_name_their_field_before_any_vm() -> None:
    """Each was found only by the guest once a VM had booted (or taken: a timeout of -1 ran the command)."""
    # a user id setresuid ignores ((uid_t)-1: the process would stay root) or any out of runc's range
    for field, kwargs in (("name", {"name": "a/b"}), ("name", {"name": "x" * 64}), ("cwd", {"cwd": "work"}),
                          ("user", {"user": 4294967295}), ("user", {"user": (0, 4294967295)}),
                          ("user", {"user": "4294967295:0"}), ("user", {"user": "0:"})):
        with pytest.raises(SpecError, match=rf"^{field}: "):
            pykata.AsyncSandbox(**kwargs)  # type: ignore[arg-type]
    sb = pykata.AsyncSandbox()  # not started: each is refused before anything would be sent
    with pytest.raises(SpecError, match=r"^timeout: "):
        await sb.run("true", timeout=-1)
    with pytest.raises(SpecError, match=r"^stdin: "):
        await sb.spawn("cat", stdin=5)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^cwd: "):
        await sb.spawn("true", cwd="relative")
    # the SDK's own parameter names, not the CLI's --user/--volume, nor a TypeError
    with pytest.raises(SpecError, match=r"^user: "):
        await sb.run("true", user="nobody:")
    with pytest.raises(SpecError, match=r"^user: 4294967295 is not an integer in \[0, 2147483647\]"):
        await sb.run("true", user=4294967295)
    with pytest.raises(SpecError, match=r"^cmd: int is not a command"):
        await sb.run(123)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^volumes\[1\]: 'bad' is not HOST:GUEST"):
        await pykata.AsyncSandbox(volumes=["/tmp:/t", "bad"]).start()
    with pytest.raises(pykata.NotFoundError, match=r"^no such sandbox: no-such-sandbox"):
        await pykata.AsyncSandbox.connect("no-such-sandbox")
    assert pykata.AsyncSandbox(name="grader-1.local", cwd="/work").name == "grader-1.local"
    with pytest.raises(SpecError, match=r"^shared_fs: 'nfs' is not one of virtio-fs, virtio-9p"):
        pykata.AsyncSandbox(shared_fs="nfs")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^shared_fs: a sandbox made for snapshots"):
        pykata.AsyncSandbox(shared_fs="virtio-fs", snapshots=True)


def test_volumes_over_virtio_fs_have_nanosecond_times_and_reach_the_host(tmp_path: Path) -> None:
    """shared_fs="virtio-fs": a cold-booted VM whose volume is served by virtiofsd (9p, the templated
    default, keeps only whole seconds of a time the container sets)."""
    (tmp_path / "in").write_text("from host\n")
    os.utime(tmp_path / "in", ns=(1577934245_123456789, 1577934245_123456789))
    with pykata.Sandbox(image="busybox", volumes=[f"{tmp_path}:/v"], shared_fs="virtio-fs") as sb:
        assert sb.run("grep ' /v ' /proc/mounts").stdout.split()[2] == b"virtiofs"
        r = sb.run("cat /v/in; touch -r /v/in /v/t")  # utimensat with the reference's nanoseconds
        assert (r.exit_code, r.stdout) == (0, b"from host\n"), r
    assert (tmp_path / "t").stat().st_mtime_ns % 10**9 == 123456789


# A child script's check that the VMM of pid `pid` still runs (its command line names QEMU).
VM_ALIVE = r"""
def vm_alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu" in f.read()
    except OSError:
        return False
"""

INTERRUPT_DURING_BOOT = r"""
import json, os, signal, threading, asyncio
import pykata
from pykata.sandbox import Sandbox as VmSandbox

seen = {}
real_create_container = VmSandbox.create_container

async def interrupted_create_container(self, *args, **kwargs):
    # the VM runs and its agent answers; Ctrl-C arrives before the sandbox's container exists
    seen.update(vmm_pid=self.vm.pid, dir=str(self.dir), loop_thread=threading.current_thread().name)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(120)
    return await real_create_container(self, *args, **kwargs)

VmSandbox.create_container = interrupted_create_container
try:
    with pykata.Sandbox(image="busybox"):
        outcome = "booted"
except KeyboardInterrupt:
    outcome = "interrupted"
""" + VM_ALIVE + r"""
# checked here, before this process exits: the cleanup happened before KeyboardInterrupt reached us
print(json.dumps({"outcome": outcome, "threads": [t.name for t in threading.enumerate()],
                  "vm_alive": vm_alive(seen["vmm_pid"]), "dir_exists": os.path.exists(seen["dir"]), **seen}))
"""


def test_ctrl_c_during_boot_cancels_it_and_leaves_no_vm_dir_or_thread() -> None:
    p = subprocess.run([sys.executable, "-c", INTERRUPT_DURING_BOOT], capture_output=True, timeout=240)
    assert p.returncode == 0, p.stderr.decode()
    got = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert got["outcome"] == "interrupted"
    assert got["loop_thread"] == "pykata-sdk-loop"
    assert got["threads"] == ["MainThread"]  # the shared loop thread ended with its last sandbox
    assert got["vm_alive"] is False and got["dir_exists"] is False
    assert not Path(got["dir"]).exists()


INTERRUPT_AND_VM_DEATH = r"""
import json, os, signal, threading, time
import pykata

out = {}
with pykata.Sandbox(image="busybox") as sb:
    def interrupt_once_started():
        while not sb.files.exists("/tmp/started"):  # a second thread may call into the same sandbox
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_once_started)
    watcher.start()
    try:
        sb.run("touch /tmp/started; exec sleep 1000")
        out["interrupted"] = False
    except KeyboardInterrupt:
        out["interrupted"] = True
    watcher.join()
    out["sleepers"] = sb.run("ps -o args | grep -c '^sleep 1000' || true").text.strip()
    # the VM dies under the sandbox (killed from outside): calls say so, close() still cleans up
    vmm = sb._async._sandbox.vm.pid
    os.kill(vmm, signal.SIGKILL)
    try:
        sb.run("true")
        out["after_vm_death"] = "ran"
    except pykata.SandboxGoneError as e:
        out["after_vm_death"] = str(e)
    out["dir"] = str(sb._async._sandbox.dir)
out["dir_exists"] = os.path.exists(out["dir"])
out["threads"] = [t.name for t in threading.enumerate()]
print(json.dumps(out))
"""


def test_ctrl_c_during_run_kills_the_command_and_a_dead_vm_is_reported() -> None:
    p = subprocess.run([sys.executable, "-c", INTERRUPT_AND_VM_DEATH], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    got = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert got["interrupted"] is True
    assert got["sleepers"] == "0"  # the interrupted command does not run on in the sandbox
    assert "VM ended" in got["after_vm_death"]
    assert got["dir_exists"] is False and got["threads"] == ["MainThread"]
