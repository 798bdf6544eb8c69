"""The exec starter (guestimage/execstart.c) on the host, beside nsexec's Python child with the same plan.

Built here with the host's C compiler (as the image build does); each test starts the same process
through `nsexec.spawn` both ways, joining this test's own UTS namespace (a real setns by pidfd; the
cgroup write goes to /dev/null), and compares what the process saw of itself: ids, groups, capability
sets, no_new_privs, rlimits, umask, cwd, environment, open descriptors. Then the failures each must
report as the Python child does: a missing program, a bad cwd, a plan the starter cannot carry.
The whole path in a guest against `crun exec` is tests/agent/test_nsexec_vm.py.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pykata.agent import nsexec
from pykata.agent.reaper import Reaper
from pykata.guestimage import crunlib, execstart

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setns and credentials need root")

PROBE = ("grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; "
         "grep -E 'open files|processes' /proc/self/limits; umask; pwd; env | sort; echo fds; ls /proc/self/fd")


@pytest.fixture(scope="module")
def starter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if crunlib.compiler() is None:
        pytest.skip("no C compiler on the host")
    root = tmp_path_factory.mktemp("execstart-root")
    assert execstart.install(root) is None
    return root / execstart.PATH


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.start(subreaper=False)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def with_starter(starter: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(nsexec, "EXECSTART", starter)
    yield


def _plan(args: list[str], **changes: object) -> nsexec.ExecPlan:
    full = (1 << 41) - 1
    fields: dict[str, object] = dict(
        init_pid=os.getpid(), ns_flags=nsexec.NAMESPACE_FLAGS["uts"], cgroup_procs=Path("/dev/null"),
        args=tuple(args), env=("PATH=/usr/bin:/bin", "FOO=1", "FOO=2", "NOEQUALS", "A=b=c"), cwd="/tmp",
        uid=65534, gid=65534, groups=(65533, 65532), umask=0o027, bounding=full & ~(1 << 21),
        effective=1 << 0, permitted=1 << 0 | 1 << 1, inheritable=1 << 1, ambient=(1,), no_new_privileges=True,
        rlimits=((resource.RLIMIT_NOFILE, 512, 1024),), seccomp=None)
    fields.update(changes)
    return nsexec.ExecPlan(**fields)  # type: ignore[arg-type]


async def _run(plan: nsexec.ExecPlan, reaper: Reaper, *, execstart: bool) -> tuple[bool, bytes]:
    out_r, out_w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        pid, _exited = await nsexec.spawn(plan, reaper, stdin=null, stdout=out_w, stderr=out_w, timeout=20,
                                         execstart=execstart)
        os.close(out_w)
        out_w = -1
        data = b""  # until the program's end closes the pipe (it is no child of ours: its parent exited)
        while chunk := await asyncio.wait_for(asyncio.to_thread(os.read, out_r, 65536), 20):
            data += chunk
        return pid > 0, data
    finally:
        os.close(out_r)
        os.close(null)
        if out_w >= 0:
            os.close(out_w)


@pytest.mark.usefixtures("with_starter")
async def test_the_starter_makes_the_process_the_python_child_makes(reaper: Reaper) -> None:
    sh = shutil.which("sh")
    assert sh
    first: tuple[bool, bytes] | None = None
    for plan in (_plan(["sh", "-c", PROBE]), _plan([sh, "-c", PROBE], uid=0, gid=0, groups=(), umask=None,
                                                   no_new_privileges=False, ambient=(), rlimits=()),
                 # the first PATH is searched, the last one is the program's (as nsexec._child does)
                 _plan(["sh", "-c", "echo $PATH; pwd; umask"], env=("PATH=/usr/bin:/bin", "PATH=/nowhere"),
                       cwd="/")):
        native = await _run(plan, reaper, execstart=True)
        forked = await _run(plan, reaper, execstart=False)
        assert native == forked
        first = first or native
        assert native[0] and native[1]
    assert first is not None
    assert b"FOO=2\n" in first[1] and b"A=b=c\n" in first[1] and b"NOEQUALS" not in first[1]
    assert native[1] == b"/nowhere\n/\n0027\n"


@pytest.mark.usefixtures("with_starter")
async def test_the_starter_reports_failures_as_the_python_child(reaper: Reaper, tmp_path: Path) -> None:
    """Each failure docker and ctr report under runc ends in ExecFailed with the whole message (a report with
    spaces and "=" in it was parsed for timing marks once: ValueError, int(''))."""
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    (tmp_path / "not-executable").chmod(0o644)
    for plan, kind, says in (
            (_plan(["no-such-program-here"]), True, "executable file `no-such-program-here` not found in $PATH: "
                                                    "No such file or directory"),
            (_plan(["sh"], env=("PATH=/nowhere", "PATH=/usr/bin:/bin")), True, "executable file `sh` not found"),
            (_plan(["sh"], cwd="/no/such/dir"), False, "chdir `/no/such/dir`: No such file or directory"),
            (_plan(["sh"], cwd="/etc/passwd"), False, "chdir `/etc/passwd`: Not a directory"),
            (_plan(["/no/such/dir/prog"]), True, "exec `/no/such/dir/prog`: No such file or directory"),
            (_plan([str(tmp_path / "not-executable")], uid=0, gid=0), False, "Permission denied"),
            (_plan(["/etc"], uid=0, gid=0), False, "exec `/etc`: Permission denied"),
            (_plan(["a=b c=d"]), True, "executable file `a=b c=d` not found in $PATH")):
        errors = []
        for use in (True, False):
            with pytest.raises(nsexec.ExecFailed) as caught:
                await _run(plan, reaper, execstart=use)
            errors.append((str(caught.value), caught.value.missing))
        assert errors[0] == errors[1] and errors[0][1] is kind, errors
        assert says in errors[0][0], errors


@pytest.mark.parametrize("report", [b"", b"P", b"P12 child=1", b"P-1", b"P0", b"P99999999999", b"P\xd9\xa3",
                                    b"X hello", b"E", b"M"])
def test_a_report_that_is_not_one_is_a_clear_error(report: bytes) -> None:
    with pytest.raises(nsexec.ExecFailed, match=r"^exec failed: the starter") as caught:
        nsexec.started_pid(report, 1 if not report else None)
    assert "(exit status 1)" in str(caught.value) if not report else True
    assert nsexec.started_pid(b"P4194303") == 4194303
    with pytest.raises(nsexec.ExecFailed, match=r"^chdir `/a b=c`: x$"):
        nsexec.started_pid(b"Echdir `/a b=c`: x")


def test_a_plan_the_starter_cannot_carry_goes_to_the_python_child() -> None:
    assert nsexec.encode_plan(_plan(["sh"])) is not None
    assert nsexec.encode_plan(_plan(["sh", "a\0b"])) is None
    assert nsexec.encode_plan(_plan(["sh"], env=("BIG=" + "x" * nsexec.EXECSTART_PLAN_LIMIT,))) is None


def test_the_starter_builds_without_warnings() -> None:
    cc = crunlib.compiler()
    if cc is None:
        pytest.skip("no C compiler on the host")
    done = subprocess.run([cc, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", str(execstart.SOURCE)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
