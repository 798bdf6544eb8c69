"""An exec that cannot start, through `ctr task exec`, under runc and under pykata in the same containerd:
a program not on PATH, a missing absolute path, a file that is not executable, a directory, a missing cwd,
a cwd that is a file, a user containerd cannot resolve. Each must fail as runc's does: ctr's exit status,
no output, one `ctr:` line that names the program (or the cwd) and says why in runc's words, so that
docker's reading of the message (tests/dockerstatus.py) gives the same 126/127. Never a Python error
(ValueError of an empty report, a traceback). The container runs on, and its next exec works."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.dockerstatus import docker_exec_status
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]

# (name, ctr task exec options, argv, what the message names, runc's reason as it says it)
CASES = [
    ("not-on-path", [], ["no-such-cmd"], "no-such-cmd", "not found in $path"),
    ("missing-path", [], ["/bin/nope"], "/bin/nope", "no such file or directory"),
    ("not-executable", [], ["/etc/passwd"], "/etc/passwd", "permission denied"),
    ("directory", [], ["/etc"], "/etc", "permission denied"),
    ("missing-cwd", ["--cwd", "/nonexistent"], ["true"], "/nonexistent", "no such file or directory"),
    ("cwd-is-a-file", ["--cwd", "/etc/passwd"], ["true"], "/etc/passwd", "not a directory"),
    ("unknown-user", ["--user", "nosuchuser"], ["true"], "", "no users found"),
]


def _failures(ctd: Containerd, runtime: str) -> dict[str, Any]:
    cid = f"execfail-{uuid.uuid4().hex[:8]}"
    seen: dict[str, Any] = {}
    try:
        ctd.ctr("run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "100000", timeout=300)
        for i, (name, opts, argv, _names, _why) in enumerate(CASES):
            p = ctd.ctr("task", "exec", *opts, "--exec-id", f"f{i}", cid, *argv, check=False, timeout=120)
            seen[name] = (p.returncode, p.stdout, p.stderr.decode(errors="replace"))
        ok = ctd.ctr("task", "exec", "--exec-id", "after", cid, "echo", "still-here", check=False)
        seen["after"] = (ok.returncode, ok.stdout, ctd.tasks().get(cid))
    finally:
        ctd.remove(cid)
    return seen


def test_a_failed_exec_says_what_runc_says(containerd: Containerd) -> None:
    runc, pykata = _failures(containerd, RUNC_RUNTIME), _failures(containerd, PYKATA_RUNTIME)
    for name, _opts, argv, names, why in CASES:
        for runtime, (status, out, err) in (("runc", runc[name]), ("pykata", pykata[name])):
            lines = err.splitlines()
            assert (status, out, len(lines)) == (1, b"", 1), (runtime, name, err)
            assert lines[0].startswith("ctr: ") and names in lines[0] and why in lines[0].lower(), (runtime, name, err)
            assert "Traceback" not in err and "invalid literal" not in err and "ValueError" not in err, err
        assert docker_exec_status(pykata[name][2], argv[0]) == docker_exec_status(runc[name][2], argv[0]), \
            (name, runc[name][2], pykata[name][2])
    assert runc["after"] == (0, b"still-here\n", "RUNNING")
    assert pykata["after"] == runc["after"]
