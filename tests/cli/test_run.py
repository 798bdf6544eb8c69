"""`pykata run` and friends as a person uses them: errors, tty, signals, ps/exec/kill/rm/logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pykata.agentapi.errors import AgentCallError
from pykata.cli.run import failure_status
from pykata.config import load_config
from pykata.errors import PykataError
from pykata.fsutil import descendants
from pykata.resources.mounts import mounts_under
from pykata.sandbox import SpecError, state
from pykata.sandbox.lookup import find
from pykata.sandbox.ocispec import parse_env
from pykata.sandbox.remote import AttachedSandbox
from pykata.ttrpc import Code
from tests.cli.ptysession import pty_session

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")


def pykata(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PYKATA, *args], input=input, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["run", "--rm", "no-such-image", "true"], b"unknown image"),
    (["run", "--rm", "-v", "/nonexistent-dir:/x", "busybox", "true"], b"--volume"),
    (["run", "--rm", "-v", "justone", "busybox", "true"], b"--volume"),
    (["run", "--rm", "-m", "lots", "busybox", "true"], b"--memory"),
    (["run", "--rm", "-u", "no-such-user", "busybox", "true"], b"--user: no user 'no-such-user'"),
    (["run", "--rm", "-u", "0:no-such-group", "busybox", "true"], b"--user: no group 'no-such-group'"),
    (["run", "--rm", "--entrypoint", "", "busybox"], b"--entrypoint"),
    (["run", "--rm", "--cpus", "-1", "busybox", "true"], b"--cpus"),
    (["run", "--rm", "--name", "a/b", "busybox", "true"], b"--name"),
    (["run", "--rm", "--shared-fs", "nfs", "busybox", "true"], b"--shared-fs"),
    (["kill", "no-such-container", "TERM"], b"no such container"),
    (["kill", "whatever", "NOTASIGNAL"], b"unknown signal"),
    (["exec", "no-such-container", "true"], b"no such container"),
    (["logs", "no-such-container"], b"no such container"),
    (["sandbox", "inspect", "no-such-sandbox"], b"no such sandbox"),
    (["agent-ctl", "no-such-sandbox", "Health.Check"], b"no such sandbox"),
    (["run", "--rm", "-w", "relative", "busybox", "true"], b"--workdir"),  # was the agent's error, after a boot
    (["exec", "-w", "relative", "no-such-container", "true"], b"--workdir"),
])
def test_bad_input_is_one_clear_line_and_no_vm(args: list[str], needle: bytes) -> None:
    sandboxes = Path("/run/pykata/sandboxes")
    before = set(sandboxes.glob("*")) if sandboxes.exists() else set()
    p = subprocess.Popen([PYKATA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert needle in err
    assert b"Traceback" not in err
    # no sandbox of this command's is left (other processes may make their own meanwhile)
    new = (set(sandboxes.glob("*")) if sandboxes.exists() else set()) - before
    owners = [json.loads((d / "state.json").read_text()).get("owner_pid") for d in new
              if (d / "state.json").exists()]
    assert p.pid not in owners


def test_env_without_a_value_takes_the_callers_as_docker_does() -> None:
    """`-e KEY` was KEY= (empty) in the container; docker passes the caller's value, and nothing when unset."""
    host = {"FOO": "host value", "EMPTY": ""}
    assert parse_env(["FOO", "EMPTY", "UNSET", "A=1", "B="], host) == ["FOO=host value", "EMPTY=", "A=1", "B="]
    assert parse_env(["FOO"]) == ["FOO="]  # no caller's environment given (a library call): as before
    with pytest.raises(SpecError, match=r"^--env: "):
        parse_env(["=x"], host)


def test_a_command_the_agent_cannot_find_exits_127() -> None:
    """docker run/exec exit 127 for a command not found (a shell's status), 126 for one that cannot be invoked;
    run's other failures stay 125, exec's 126."""
    not_found = AgentCallError("s1", "CreateContainer", Code.NOT_FOUND,
                               "crun create s1: executable file `nope` not found in $PATH: No such file or directory")
    assert failure_status(not_found, 125) == 127
    assert failure_status(AgentCallError("s1", "ExecProcess", Code.NOT_FOUND, not_found.message), 126) == 127
    denied = AgentCallError("s1", "CreateContainer", Code.INTERNAL, "open executable: Permission denied")
    assert failure_status(denied, 125) == 126  # docker run under runc: 126 ("permission denied")
    directory = AgentCallError("s1", "CreateContainer", Code.INTERNAL, "open executable: Operation not permitted")
    assert failure_status(directory, 125) == 126  # crun's words for a directory, runc's "permission denied"
    assert failure_status(AgentCallError("s1", "CreateContainer", Code.INTERNAL, "chdir `/etc/passwd`: Not a "
                                         "directory"), 125) == 125
    assert failure_status(AgentCallError("s1", "CreateContainer", Code.NOT_FOUND, "no such image disk"), 125) == 125
    assert failure_status(PykataError("unknown image"), 125) == 125
    # an exec that did not start: what `docker exec` makes of the message (tests/dockerstatus.py)
    for message, command, status in (
            ("exec in container c: executable file `nope` not found in $PATH: No such file or directory", "nope", 127),
            ("exec in container c: exec `/bin/nope`: No such file or directory", "/bin/nope", 127),
            ("exec in container c: exec `/etc`: Permission denied", "/etc", 126),
            ("exec in container c: chdir `/nowhere`: No such file or directory", "true", 126),
            ("exec in container c: chdir `/etc/passwd`: Not a directory", "true", 127),
            ("container c is paused", "true", 126)):
        assert failure_status(AgentCallError("s1", "ExecProcess", Code.INTERNAL, message), 126, command) == status
    assert failure_status(PykataError("no such container x"), 126, "true") == 126


@pytest.mark.parametrize("args", [
    ["ps"], ["ps", "-a", "--json"], ["rm", "x"], ["kill", "x"], ["exec", "x", "true"], ["logs", "x"], ["attach", "x"],
    ["cleanup"], ["sandbox", "ls"], ["sandbox", "inspect", "x"], ["run", "--rm", "busybox", "true"], ["env"],
    ["image", "info"],
])
def test_a_bad_configuration_file_is_one_line_naming_the_key(tmp_path: Path, args: list[str]) -> None:
    """ps, rm, kill, exec, cleanup and sandbox ls printed a traceback for it."""
    config = tmp_path / "configuration.toml"
    config.write_text("[runtime]\nruntime_dir = 5\n")
    p = subprocess.run([PYKATA, *args], env={**os.environ, "PYKATA_CONFIG": str(config)}, capture_output=True,
                       timeout=60)
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode != 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and "runtime.runtime_dir: must be a string" in err, err


@pytest.mark.parametrize("config,field", [
    ({"process": "x"}, "config.json.process"),  # were AttributeError/TypeError tracebacks
    ({"process": {"args": ["true"]}, "linux": {"resources": 5}}, "config.json.linux.resources"),
])
def test_a_bundle_with_a_malformed_config_is_one_line_naming_the_part(tmp_path: Path, config: object,
                                                                       field: str) -> None:
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(config))
    p = pykata("run", "--rm", "-m", "64m", str(tmp_path))
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode == 125 and len(err.splitlines()) == 1 and f"{field}: must be" in err, err


def test_a_missing_qemu_binary_is_named_by_its_key(tmp_path: Path) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text('[hypervisor.qemu]\npath = "/nonexistent/qemu-system-x86_64"\n')
    p = subprocess.run([PYKATA, "run", "--rm", "busybox", "true"], env={**os.environ, "PYKATA_CONFIG": str(config)},
                       capture_output=True, timeout=120)
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1, err
    assert "hypervisor.qemu.path" in err and "/nonexistent/qemu-system-x86_64" in err, err


@pytest.mark.vm
def test_missing_command_in_an_image_without_one(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"process": {"args": []}, "root": {"path": "rootfs"}}))
    p = pykata("run", "--rm", str(bundle))
    assert p.returncode != 0 and b"COMMAND" in p.stderr and b"Traceback" not in p.stderr


@pytest.mark.vm
def test_tty_gives_a_real_terminal() -> None:
    code, out = pty_session([PYKATA, "run", "--rm", "-t", "busybox", "sh", "-c", "tty; stty size"])
    assert code == 0, out
    assert b"/dev/pts/" in out


@pytest.mark.vm
def test_sigterm_is_forwarded_to_the_container() -> None:
    p = subprocess.Popen([PYKATA, "run", "--rm", "busybox", "sh", "-c",
                          "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.1; done"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 3
    assert b"got-term" in out


@pytest.mark.vm
def test_run_interactive_exits_when_the_container_exits_while_stdin_stays_open() -> None:
    # stdin is a pipe we keep open (no EOF ever): the run must end with the container, not with stdin
    p = subprocess.Popen([PYKATA, "run", "--rm", "-i", "busybox", "sh", "-c", "read line; echo got $line"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    try:
        p.stdin.write(b"hello\n")
        p.stdin.flush()
        p.wait(timeout=120)
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        assert p.returncode == 0, err
        assert out == b"got hello\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()


@pytest.mark.vm
def test_ps_exec_kill_logs_rm_of_a_running_container() -> None:
    name = f"t-{uuid.uuid4().hex[:6]}"
    runner = subprocess.Popen([PYKATA, "run", "--name", name, "busybox", "sh", "-c",
                               "echo started; echo to-stderr >&2; while :; do sleep 0.1; done"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"started\n"
        rows = json.loads(pykata("ps", "--json").stdout)
        mine = [r for r in rows if r["name"] == name]
        assert len(mine) == 1 and mine[0]["status"] == "running"
        cid = mine[0]["id"]
        ex = pykata("exec", name, "sh", "-c", "echo from-exec; exit 4")
        assert (ex.returncode, ex.stdout) == (4, b"from-exec\n")
        # localhost resolves in the embedded busybox, as in a docker container
        assert pykata("exec", name, "ping", "-c", "1", "-W", "5", "localhost").returncode == 0
        missing = pykata("exec", name, "no-such-command")  # as docker and a shell say it: 127
        assert missing.returncode == 127 and b"no-such-command" in missing.stderr, missing.stderr
        assert b"Traceback" not in missing.stderr
        named = pykata("exec", "-u", "nobody:root", name, "id")  # names from the container's image
        assert named.stdout.startswith(b"uid=65534(nobody) gid=0(root)"), named.stderr
        piped = pykata("exec", "-i", cid[:8], "cat", input=b"piped stdin\n")
        assert piped.stdout == b"piped stdin\n"
        killed = pykata("kill", name, "KILL")  # prints what was typed, as docker does (it printed the full id)
        assert (killed.returncode, killed.stdout) == (0, name.encode() + b"\n"), killed.stderr
        runner.wait(60)
        assert runner.returncode == 137
        rows = json.loads(pykata("ps", "-a", "--json").stdout)
        mine = [r for r in rows if r["name"] == name]
        assert mine and mine[0]["status"] == "exited" and mine[0]["exit_code"] == 137
        logs = pykata("logs", name)
        assert logs.stdout == b"started\n" and logs.stderr == b"to-stderr\n"
        removed = pykata("rm", cid[:8])  # an id prefix is printed as given
        assert (removed.returncode, removed.stdout) == (0, cid[:8].encode() + b"\n"), removed.stderr
        assert pykata("logs", name).returncode != 0
    finally:
        if runner.poll() is None:
            pykata("rm", "-f", name)
            runner.wait(60)
        pykata("rm", "-f", name)


@pytest.mark.vm
def test_user_names_and_entrypoint_as_docker_takes_them() -> None:
    """-u takes names from the image's /etc/passwd and /etc/group (it took only numbers); --entrypoint
    replaces the image's ENTRYPOINT and drops its CMD (busybox's is `sh`)."""
    p = pykata("run", "--rm", "-u", "nobody", "--entrypoint", "id", "busybox")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert out == "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n", out


@pytest.mark.vm
def test_user_groups_as_docker_gives_them(tmp_path: Path) -> None:
    """-u of run and exec resolve as docker's (runc's user.GetExecUser, moby's getUser; the table of
    rules is tests/sandbox/test_imageuser.py): a named user gets the groups of /etc/group that list it,
    after its primary group; a number not in /etc/passwd gets group 0 (pykata gave it its own number);
    USER:GROUP takes that group alone; exec without -u runs as the container's user. Through an OCI
    bundle (bundle_spec_with) for run, then exec."""
    from pykata.images import ImageStore
    from pykata.sandbox import build_spec

    busybox = ImageStore(tmp_path / "cache").resolve("busybox").rootfs
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run(["cp", "-a", str(busybox), str(bundle / "rootfs")], check=True)
    (bundle / "rootfs/etc/group").write_text("root:x:0:\nwheel:x:10:root,nobody\nstaff:x:50:nobody\n"
                                             "nogroup:x:65534:\n")
    spec = build_spec(["id"], env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    (bundle / "config.json").write_text(json.dumps({**spec, "root": {"path": "rootfs"}}))
    # (the kernel keeps supplementary groups sorted: id lists them by number)
    want = {"nobody": "uid=65534(nobody) gid=65534(nogroup) groups=10(wheel),50(staff),65534(nogroup)",
            "65534": "uid=65534(nobody) gid=65534(nogroup) groups=10(wheel),50(staff),65534(nogroup)",
            "4242": "uid=4242 gid=0(root) groups=0(root)",
            "nobody:staff": "uid=65534(nobody) gid=50(staff) groups=50(staff)",
            "4242:4343": "uid=4242 gid=4343 groups=4343",
            "0": "uid=0(root) gid=0(root) groups=0(root),10(wheel)"}
    p = pykata("run", "--rm", "-u", "nobody", str(bundle))
    assert (p.returncode, p.stdout.decode()) == (0, want["nobody"] + "\n"), p.stderr
    name = f"g-{uuid.uuid4().hex[:6]}"
    try:
        p = pykata("run", "-d", "--name", name, "-u", "4242:staff", str(bundle), "sleep", "600")
        assert p.returncode == 0, p.stderr
        p = pykata("exec", name, "id")  # without -u: the container's user, as docker exec
        assert (p.returncode, p.stdout.decode()) == (0, "uid=4242 gid=50(staff) groups=50(staff)\n"), p.stderr
        for user, line in want.items():
            p = pykata("exec", "-u", user, name, "id")
            assert (p.returncode, p.stdout.decode()) == (0, line + "\n"), (user, p.stderr)
    finally:
        pykata("rm", "-f", name)


@pytest.mark.vm
def test_init_reaps_orphans_and_forwards_sigterm() -> None:
    """--init (docker's): tini from the guest image is PID 1. An orphan is reaped (without it, PID 1 `sleep`
    leaves it a zombie: the control), and SIGTERM reaches the command, which as PID 1 ignored it."""
    script = "(sleep 0.1 &); exec sleep 60"  # the subshell's child is orphaned, reparented to PID 1
    names = {init: f"i-{uuid.uuid4().hex[:6]}" for init in (True, False)}
    try:
        for init, name in names.items():
            started = pykata("run", "-d", *(["--init"] if init else []), "--name", name, "busybox", "sh", "-c", script)
            assert started.returncode == 0, started.stderr
        time.sleep(1)
        seen = {init: pykata("exec", name, "sh", "-c", "cat /proc/1/comm; ps -o stat,comm").stdout.decode()
                for init, name in names.items()}
        assert seen[True].startswith("docker-init\n") and " Z " not in seen[True].replace("\n", " \n "), seen[True]
        assert seen[False].startswith("sleep\n") and "Z" in seen[False], seen[False]  # the control: a zombie
        begun = time.monotonic()
        stopped = pykata("stop", "-t", "30", names[True])
        assert stopped.returncode == 0 and time.monotonic() - begun < 20, stopped.stderr  # not the grace period
        mine = [r for r in json.loads(pykata("ps", "-a", "--json").stdout) if r["name"] == names[True]]
        assert mine and mine[0]["exit_code"] == 143, mine  # `sleep` died of the forwarded SIGTERM
    finally:
        for name in names.values():
            pykata("rm", "-f", name)


@pytest.mark.vm
def test_stop_terms_then_kills_a_pid_1_that_ignores_sigterm() -> None:
    """docker stop: SIGTERM, SIGKILL after -t seconds; a shell as PID 1 without a trap ignores SIGTERM (as httpd
    in the README's example does, whose Ctrl-C did nothing); the container stays, exited 137, for rm."""
    name = f"s-{uuid.uuid4().hex[:6]}"
    started = pykata("run", "-d", "--name", name, "busybox", "sh", "-c", "echo up; while :; do sleep 0.1; done")
    try:
        assert started.returncode == 0, started.stderr
        begun = time.monotonic()
        stopped = pykata("stop", "-t", "1", name)
        assert (stopped.returncode, stopped.stdout) == (0, name.encode() + b"\n")  # the name given, as docker
        assert time.monotonic() - begun >= 1  # SIGTERM was waited for, in vain
        mine = [r for r in json.loads(pykata("ps", "-a", "--json").stdout) if r["name"] == name]
        assert mine and (mine[0]["status"], mine[0]["exit_code"]) == ("exited", 137)
        sid = started.stdout.decode().strip()
        assert sid[:12] not in pykata("ps", "-q").stdout.decode().split()  # ps -q: ids only, running ones
        assert sid[:12] in pykata("ps", "-a", "-q").stdout.decode().split()
        assert pykata("stop", name).returncode == 0  # stopping a stopped container is a no-op
        # exec's failures exit 126 (run's 125), a stopped container's as the others (it was 125)
        stale = pykata("exec", name, "true")
        assert (stale.returncode, b"is not running" in stale.stderr) == (126, True), stale.stderr
        assert pykata("rm", name).returncode == 0
        missing = pykata("stop", name)
        assert missing.returncode == 1 and b"no such container" in missing.stderr
        gone = pykata("exec", name, "true")
        assert (gone.returncode, b"no such container" in gone.stderr) == (126, True), gone.stderr
    finally:
        pykata("rm", "-f", name)


@pytest.mark.vm
def test_rm_force_of_a_running_container() -> None:
    name = f"t-{uuid.uuid4().hex[:6]}"
    runner = subprocess.Popen([PYKATA, "run", "--name", name, "busybox", "sh", "-c", "echo up; sleep 1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"up\n"
        refused = pykata("rm", name)
        assert refused.returncode != 0 and b"running" in refused.stderr
        assert pykata("rm", "-f", name).returncode == 0
        runner.wait(60)
        assert pykata("ps", "-a", "--json").stdout.count(name.encode()) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        pykata("cleanup")


@pytest.mark.vm
def test_run_says_when_it_makes_the_template_first(tmp_path: Path) -> None:
    """The first run after a guest image or size change waits 10-30 s for the template: it says so (it was
    silent), once; the next run finds the template and says nothing."""
    config = tmp_path / "configuration.toml"
    config.write_text(f'[factory]\ntemplate_path = "{tmp_path / "templates"}"\n')
    env = {**os.environ, "PYKATA_CONFIG": str(config)}
    for expected in (True, False):
        p = subprocess.run([PYKATA, "run", "--rm", "busybox", "echo", "ran"], env=env, capture_output=True,
                           timeout=180)
        assert (p.returncode, p.stdout) == (0, b"ran\n"), p.stderr
        assert (b"pykata: factory: making template" in p.stderr) is expected, p.stderr
        assert b"Traceback" not in p.stderr


@pytest.mark.vm
def test_run_whose_vm_dies_fails_without_a_traceback() -> None:
    """QEMU killed under a running `pykata run`: the VM's death and the failed call, one line each, and
    no traceback (the output pumps failed with the VM and asyncio printed 'Task exception was never
    retrieved' with two tracebacks)."""
    p = subprocess.Popen([PYKATA, "run", "--rm", "busybox", "sh", "-c", "echo up; sleep 600"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        qemu = [q for q in descendants(p.pid) if Path(f"/proc/{q}/comm").read_text().startswith("qemu-system")]
        assert len(qemu) == 1, qemu
        os.kill(qemu[0], signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert b"Traceback" not in err and b"never retrieved" not in err, err.decode(errors="replace")
    assert b"QEMU killed by SIGKILL" in err and len(err.strip().splitlines()) <= 2, err


@pytest.mark.vm
def test_run_logs_are_capped_rotated_and_streamed(tmp_path: Path) -> None:
    from tests.cri.harness import admin_config

    config = admin_config(tmp_path / "config.toml", run_log_max_size="1", run_log_backups="1")
    env = {**os.environ, "PYKATA_CONFIG": str(config)}
    name = f"t-{uuid.uuid4().hex[:6]}"
    # 3.5 MiB of output against 1 MiB files with one backup: 2 MiB at most stay on disk
    script = "head -c 3670016 /dev/zero | tr '\\0' x; echo; echo END"
    run = subprocess.run([PYKATA, "run", "--name", name, "busybox", "sh", "-c", script], env=env,
                         capture_output=True, timeout=300)
    try:
        assert run.returncode == 0, run.stderr[-2000:]
        assert len(run.stdout) == 3670016 + 5  # the terminal gets everything
        rows = json.loads(subprocess.run([PYKATA, "ps", "-a", "--json"], env=env, capture_output=True).stdout)
        sandbox_id = next(r for r in rows if r["name"] == name)["id"]
        logs = Path("/run/pykata/sandboxes") / sandbox_id / "logs"
        sizes = {p.name: p.stat().st_size for p in logs.iterdir()}
        assert set(sizes) <= {"stdout.log", "stdout.log.1", "stderr.log"}, sizes
        assert sizes["stdout.log.1"] == 1 << 20 and sizes["stdout.log"] <= 1 << 20
        out = subprocess.run([PYKATA, "logs", name], env=env, capture_output=True, timeout=60)
        # the newest output, oldest part first
        assert out.returncode == 0 and out.stdout == run.stdout[-len(out.stdout):]
        assert out.stdout.endswith(b"\nEND\n") and len(out.stdout) == sizes["stdout.log.1"] + sizes["stdout.log"]
    finally:
        subprocess.run([PYKATA, "rm", "-f", name], env=env, capture_output=True, timeout=60)


@pytest.mark.vm
def test_run_detached_then_attach() -> None:
    name = f"d-{uuid.uuid4().hex[:6]}"
    # The container runs until it gets SIGUSR1 (not a sleep: under load `ps` may come seconds later).
    # Not ended by an exec (it was `exec touch /tmp/go`): the container's exit makes its owner stop the
    # sandbox, proxy first, and under load that came before the exec's WaitProcess was answered
    # ("agent WaitProcess: UNAVAILABLE: connection closed by peer", about 1 run in 3 with 4 busy loops).
    # `kill`'s answer is forwarded before the owner learns of the exit it causes.
    script = "trap 'echo two >&2; exit 3' USR1; echo one; while :; do sleep 0.1; done"
    started = pykata("run", "-d", "--name", name, "busybox", "sh", "-c", script)
    try:
        assert started.returncode == 0, started.stderr
        sid = started.stdout.decode().strip()
        assert len(sid) == 16 and name in pykata("ps").stdout.decode()  # returned while it runs
        attach = subprocess.Popen([PYKATA, "attach", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        logs = subprocess.Popen([PYKATA, "logs", "-f", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ran = pykata("exec", name, "sh", "-c", "echo ran; exit 4")  # an exec into the detached container
            assert (ran.returncode, ran.stdout) == (4, b"ran\n"), ran.stderr
            go = pykata("kill", name, "USR1")
            assert go.returncode == 0, go.stderr
            out, err = attach.communicate(timeout=120)
            followed = logs.communicate(timeout=120)
        finally:
            for p in (attach, logs):
                p.kill()
                p.wait()
        assert (attach.returncode, out, err) == (3, b"one\n", b"two\n")
        assert (logs.returncode, *followed) == (0, b"one\n", b"two\n")  # logs -f: to the exit, status 0
    finally:
        pykata("rm", "-f", name)
    assert b"no such container" in pykata("attach", name).stderr
    refused = pykata("run", "-d", "-i", "busybox", "true")
    assert refused.returncode != 0 and b"--interactive" in refused.stderr and b"Traceback" not in refused.stderr


@pytest.mark.vm
def test_an_exec_that_ends_its_container_still_gets_its_own_status() -> None:
    """The exec's command makes the container's main process exit; the detached owner then stops the
    sandbox at once. Its agent proxy still answers the clients already connected (for up to
    PROXY_DRAIN_SECONDS), so an exec's wait sent after the owner saw the exit gets its status instead of
    "connection closed by peer" (the CLI's wait can come that late on a loaded host)."""
    name = f"e-{uuid.uuid4().hex[:6]}"
    # the exec ends first (the main process's exit would kill it: one pid namespace), then the main
    started = pykata("run", "-d", "--name", name, "busybox", "sh", "-c",
                     "while [ ! -e /tmp/go ]; do sleep 0.05; done; sleep 0.2; exit 3")
    try:
        assert started.returncode == 0, started.stderr
        assert asyncio.run(_exec_waiting_for_the_exit(name)) == 5
        go = pykata("ps", "-a")
        assert any(name in line and "exited (3)" in line for line in go.stdout.decode().splitlines()), go.stdout
    finally:
        pykata("rm", "-f", name)


async def _exec_waiting_for_the_exit(name: str) -> int:
    found = find(load_config(), name)
    async with await AttachedSandbox.attach(found) as sandbox:
        proc = await sandbox.exec(found.record.id, ["sh", "-c", "touch /tmp/go; exit 5"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the owner has recorded the exit (and begun to stop)
            record = state.load(found.dir)
            if record is None or record.containers[found.record.id].status == "exited":
                break
            await asyncio.sleep(0.01)
        return await proc.wait()


@pytest.mark.vm
def test_hostile_bundle_fails_naming_the_image_and_leaves_nothing(tmp_path: Path) -> None:
    # the image becomes a disk for the guest (pykata.resources.rootimage): a device node in it is
    # refused, as the image store refuses one, with an error naming the image and the entry
    bundle = tmp_path / "hostile"
    (bundle / "rootfs/dev").mkdir(parents=True)
    os.mknod(bundle / "rootfs/dev/sda", 0o60600, os.makedev(8, 0))
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}, "root": {"path": "rootfs"}}))
    sandboxes = Path("/run/pykata/sandboxes")
    before = set(sandboxes.glob("*")) if sandboxes.exists() else set()
    p = subprocess.Popen([PYKATA, "run", "--rm", str(bundle)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert f"image {bundle}".encode() in err and b"'dev/sda' is a device node" in err, err
    assert b"Traceback" not in err
    new = (set(sandboxes.glob("*")) if sandboxes.exists() else set()) - before
    owners = [json.loads((d / "state.json").read_text()).get("owner_pid") for d in new
              if (d / "state.json").exists()]
    assert p.pid not in owners
    assert str(bundle) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.vm
def test_a_sigkilled_run_leaves_no_vm_mount_or_directory() -> None:
    """`pykata run` SIGKILLed (a subprocess timeout's kill): its VM, the 9p helper, the mounts and the
    directory stayed until `pykata cleanup`. The VM now dies with it (PID-namespace lifeline) and its
    reaper (pykata.sandbox.reaper) removes the rest."""
    name = f"k-{uuid.uuid4().hex[:6]}"
    runner = subprocess.Popen([PYKATA, "run", "--rm", "--name", name, "busybox", "sh", "-c", "echo up; sleep 1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"up\n"
        found = find(load_config(), name)
        sid, directory = found.record.id, found.dir
        assert mounts_under(directory)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 60
        while True:
            left = ([str(directory)] if directory.exists() else []) + [str(m) for m in mounts_under(directory)] + \
                [" ".join(p.cmdline()) for p in psutil.process_iter() if _names(p, sid)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert left == []
        assert sid not in pykata("cleanup").stdout.decode()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def _names(p: psutil.Process, sandbox_id: str) -> bool:
    """Whether `p` is one of the sandbox's processes (its reaper, which ends by itself, aside)."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return sandbox_id in cmd and "pykata.sandbox.reaper" not in cmd
