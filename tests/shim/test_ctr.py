"""containerd drives pykata exactly as it drives runc: every scenario runs through `ctr` with
`--runtime io.containerd.runc.v2` and with `--runtime io.containerd.pykata.v2`, in the same
containerd, and what the user sees must match (output, exit codes, task states, event topics)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]

RUNTIMES = (RUNC_RUNTIME, PYKATA_RUNTIME)


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _container_stderr(raw: bytes) -> bytes:
    """The container's stderr without ctr's own log lines."""
    return b"".join(line for line in raw.splitlines(keepends=True) if not line.startswith(b"time="))


def both(scenario: Callable[[Containerd, str], Any], ctd: Containerd) -> tuple[Any, Any]:
    """(what runc gave, what pykata gave)."""
    return scenario(ctd, RUNC_RUNTIME), scenario(ctd, PYKATA_RUNTIME)


@contextmanager
def running(ctd: Containerd, runtime: str, prefix: str, *args: str) -> Iterator[str]:
    """A detached container (`ctr run -d`), removed at the end whatever happens."""
    cid = _cid(prefix)
    try:
        ctd.ctr("run", "-d", "--runtime", runtime, IMAGE, cid, *args)
        yield cid
    finally:
        ctd.remove(cid)


@contextmanager
def events(ctd: Containerd) -> Iterator[Callable[[str], list[str]]]:
    """`ctr events` in the background; the callable gives the task topics seen for one container id."""
    assert shutil.which("ctr")
    proc = subprocess.Popen(["ctr", "-a", str(ctd.socket), "events"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=ctd.env())
    time.sleep(0.3)  # subscribed before anything happens
    lines: list[str] = []

    def topics(cid: str) -> list[str]:
        found = [ln.split()[5] for ln in lines if f'"{cid}"' in ln and len(ln.split()) > 5]
        return [t for t in found if t.startswith("/tasks/")]

    try:
        yield topics
    finally:
        time.sleep(0.5)
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        lines.extend(out.decode(errors="replace").splitlines())


def test_run_rm_output_and_exit_codes(containerd: Containerd) -> None:
    def scenario(ctd: Containerd, runtime: str) -> list[tuple[int, bytes, bytes]]:
        out = []
        for args in (["--env", "FOO=foo bar", "--cwd", "/tmp", IMAGE, _cid("out"), "sh", "-c",
                      "echo out; echo err >&2; echo $FOO; pwd; exit 7"],
                     [IMAGE, _cid("sig"), "sh", "-c", "echo before; sh -c 'kill -9 $$'; exit $?"]):
            p = ctd.ctr("run", "--rm", "--runtime", runtime, *args, check=False)
            out.append((p.returncode, p.stdout, _container_stderr(p.stderr)))
        return out

    runc, pykata = both(scenario, containerd)
    assert runc[0] == (7, b"out\nfoo bar\n/tmp\n", b"err\n")
    assert runc[1][:2] == (137, b"before\n")
    assert pykata == runc
    assert not containerd.tasks()


def test_tty(containerd: Containerd) -> None:
    def scenario(ctd: Containerd, runtime: str) -> tuple[int, bytes]:
        cmd = " ".join(shlex.quote(a) for a in [
            "ctr", "-a", str(ctd.socket), "-n", ctd.namespace, "run", "--rm", "-t", "--runtime", runtime, IMAGE,
            _cid("tty"), "sh", "-c", "tty; test -t 0 && echo stdin-is-tty; echo out; exit 4"])
        # `script` gives ctr a terminal of its own (ctr -t refuses to run without one)
        p = subprocess.run(["script", "-qfec", cmd, "/dev/null"], capture_output=True, timeout=120,
                           env=ctd.env(), stdin=subprocess.DEVNULL, check=False)
        return p.returncode, p.stdout.replace(b"^@", b"")

    runc, pykata = both(scenario, containerd)
    assert runc[0] == 4 and b"/dev/pts/0\r" in runc[1] and b"stdin-is-tty\r" in runc[1]
    assert pykata == runc


def test_stdin(containerd: Containerd) -> None:
    def scenario(ctd: Containerd, runtime: str) -> tuple[int, bytes]:
        # ctr 1.6 forwards its stdin but never closes the task's (no CloseIO): read a line, not to EOF
        p = ctd.ctr("run", "--rm", "--runtime", runtime, IMAGE, _cid("in"), "sh", "-c",
                    "read a; read b; echo got:$a:$b", input=b"first line\nsecond\n", check=False)
        return p.returncode, p.stdout

    runc, pykata = both(scenario, containerd)
    assert runc == (0, b"got:first line:second\n")
    assert pykata == runc


def test_log_uri_file(containerd: Containerd, tmp_path: Path) -> None:
    def scenario(ctd: Containerd, runtime: str) -> tuple[int, bytes, list[str]]:
        log = tmp_path / runtime / "c.log"
        p = ctd.ctr("run", "--rm", "--runtime", runtime, "--log-uri", f"file://{log}", IMAGE, _cid("log"),
                    "sh", "-c", "echo to-out; echo to-err >&2; exit 3", check=False)
        deadline = time.monotonic() + 3  # the log copy may finish just after the task's exit
        while len(log.read_text().splitlines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return p.returncode, p.stdout, sorted(log.read_text().splitlines())

    runc, pykata = both(scenario, containerd)
    assert pykata == (3, b"", ["to-err", "to-out"])
    # runc's shim sometimes loses the last stderr line of a --rm task under load (its copy races the
    # delete); what it does write must be what pykata writes
    assert runc[:2] == pykata[:2] and set(runc[2]) <= set(pykata[2])


def _metrics(raw: str) -> dict[str, str]:
    rows = [ln.split(None, 1) for ln in raw.splitlines()]
    return {r[0]: r[1].strip() for r in rows if len(r) == 2 and r[0] not in ("ID", "METRIC")}


def test_exec_ps_metrics_pause_resume_kill(containerd: Containerd) -> None:
    def scenario(ctd: Containerd, runtime: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with events(ctd) as topics, running(ctd, runtime, "life", "sleep", "1000") as cid:
            ex = ctd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo from-exec; echo e >&2; exit 5",
                         check=False)
            seen["exec"] = (ex.returncode, ex.stdout, _container_stderr(ex.stderr))
            ctd.ctr("task", "exec", "--detach", "--exec-id", "e2", cid, "sleep", "1000")
            ps = ctd.ctr("task", "ps", cid).stdout.decode().splitlines()
            seen["ps"] = (ps[0].split(), len(ps) - 1, sum("ExecID:e2" in ln for ln in ps))
            metrics = _metrics(ctd.ctr("task", "metrics", cid).stdout.decode())
            memory = int(metrics.get("memory.usage_in_bytes") or metrics["memory.usage"])
            seen["metrics"] = (memory > 0, int(metrics["pids.current"]) >= 2,
                               all(re.fullmatch(r"[\d\[\] ]+", v) for v in metrics.values()))
            ctd.ctr("task", "pause", cid)
            seen["paused"] = ctd.tasks()[cid]
            ctd.ctr("task", "resume", cid)
            seen["resumed"] = ctd.tasks()[cid]
            ctd.ctr("task", "kill", "-s", "KILL", cid)
            deadline = time.monotonic() + 20
            while ctd.tasks().get(cid) != "STOPPED" and time.monotonic() < deadline:
                time.sleep(0.1)
            seen["killed"] = ctd.tasks().get(cid)
            again = ctd.ctr("task", "kill", "-s", "KILL", cid, check=False)
            seen["kill-again"] = (again.returncode, b"not found" in again.stderr)
            seen["rm"] = ctd.ctr("task", "rm", cid, check=False).returncode
            again = ctd.ctr("task", "rm", cid, check=False)
            seen["rm-again"] = (again.returncode, b"not found" in again.stderr)
        seen["events"] = topics(cid)
        return seen

    runc, pykata = both(scenario, containerd)
    assert runc["exec"] == (5, b"from-exec\n", b"e\n")
    assert runc["ps"] == (["PID", "INFO"], 2, 1)
    assert (runc["paused"], runc["resumed"], runc["killed"]) == ("PAUSED", "RUNNING", "STOPPED")
    assert runc["rm"] == 0 and runc["kill-again"][0] != 0 and runc["rm-again"][0] != 0
    assert "/tasks/exit" in runc["events"] and runc["events"][-1] == "/tasks/delete"
    assert pykata == runc


def test_kill_all_and_rm_force_with_two_containers(containerd: Containerd) -> None:
    def scenario(ctd: Containerd, runtime: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with running(ctd, runtime, "one", "sh", "-c", "sleep 1000 & sleep 1000 & wait") as a, \
                running(ctd, runtime, "two", "sleep", "1000") as b:
            tasks = ctd.tasks()
            seen["both-running"] = (tasks[a], tasks[b])
            seen["exec-each"] = [ctd.ctr("task", "exec", "--exec-id", "x", c, "echo", c).stdout == f"{c}\n".encode()
                                 for c in (a, b)]
            ctd.ctr("task", "kill", "--all", "-s", "KILL", a)
            deadline = time.monotonic() + 20
            while ctd.tasks().get(a) != "STOPPED" and time.monotonic() < deadline:
                time.sleep(0.1)
            seen["a-after-kill-all"] = ctd.tasks().get(a)
            seen["b-untouched"] = ctd.tasks().get(b)
            rm = ctd.ctr("task", "rm", "-f", b, check=False)
            seen["rm-f-running"] = (rm.returncode, b in ctd.tasks())
            seen["rm-stopped"] = ctd.ctr("task", "rm", a, check=False).returncode
            seen["left"] = sorted(t for t in ctd.tasks() if t in (a, b))
        return seen

    runc, pykata = both(scenario, containerd)
    assert runc == {"both-running": ("RUNNING", "RUNNING"), "exec-each": [True, True],
                    "a-after-kill-all": "STOPPED", "b-untouched": "RUNNING", "rm-f-running": (0, False),
                    "rm-stopped": 0, "left": []}
    assert pykata == runc


def test_an_apparmor_profile_the_guest_cannot_apply_is_refused(containerd: Containerd) -> None:
    """A container's author asks for an AppArmor profile of their own (ctr --apparmor-profile). The
    guest kernel has no AppArmor: running the container unconfined would silently drop what was asked
    for. The container must not start, the error names process.apparmorProfile, nothing is left."""
    p = containerd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, "--apparmor-profile", "localhost-strict",
                       IMAGE, _cid("aa"), "true", check=False)
    assert p.returncode != 0, p.stdout
    assert b"process.apparmorProfile" in p.stderr and b"localhost-strict" in p.stderr, p.stderr
    assert b"Traceback" not in p.stderr
    assert not containerd.tasks()


def test_crun_annotations_in_a_spec_are_refused(containerd: Containerd) -> None:
    """A container's author tries crun's own annotations through ctr: a raw seccomp program that allows
    everything in place of the spec's filter, and a seccomp plugin library for crun (root in the guest)
    to load. The container must not start, the error names the key, and nothing is left."""
    allow_all = "BgAAAAAA/38="  # one BPF instruction: SECCOMP_RET_ALLOW
    for key, value in (("run.oci.seccomp_bpf_data", allow_all), ("run.oci.seccomp.plugins", "/tmp/owned.so")):
        p = containerd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, "--annotation", f"{key}={value}",
                           IMAGE, _cid("oci"), "sh", "-c", "grep Seccomp: /proc/self/status", check=False)
        assert p.returncode != 0, p.stdout
        assert key.encode() in p.stderr, p.stderr
        assert b"Traceback" not in p.stderr
    assert not containerd.tasks()
