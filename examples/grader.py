#!/usr/bin/env python3
"""Grade untrusted submissions, each in its own copy of one prepared environment.

    .venv/bin/python examples/grader.py

The environment (here: test data and a helper script; in real life a toolchain, a warmed-up
interpreter, fixtures) is prepared once in a sandbox and snapshotted. Each submission then gets a
fresh restore of that snapshot: its own VM with the prepared files, running processes and memory,
its own randomness and boot id, destroyed after grading. A submission cannot see or spoil another's
environment, and nobody waits for the preparation again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pykata

TESTS = {"1 2": "3", "10 -4": "6", "0 0": "0"}
SUBMISSIONS = {
    "alice": 'read a b; echo $((a + b))',
    "bob": 'read a b; echo $((a - b))',             # wrong
    "mallory": 'while :; do :; done',               # never ends: the timeout stops it
    "eve": 'rm -rf /grader; echo spoiled',          # cannot (not root), and it would be her copy only
}


def prepare(snapshot: Path) -> None:
    """Build the grading environment once and save it (the sandbox is closed by the snapshot)."""
    with pykata.Sandbox(image="busybox", snapshots=True) as sb:
        for i, (given, expected) in enumerate(TESTS.items()):
            sb.files.write(f"/grader/tests/{i}.in", given + "\n")
            sb.files.write(f"/grader/tests/{i}.out", expected + "\n")
        sb.files.write("/grader/check.sh", 'cmp -s "$1" "$2" && echo pass || echo fail\n', mode=0o755)
        sb.run("adduser -D -u 1000 student && mkdir -p /submission && chown student /submission")
        sb.snapshot(snapshot, close=True)


def grade(snapshot: Path, name: str, code: str) -> str:
    with pykata.Sandbox.restore(snapshot, timeout=120) as sb:
        assert sb.files.exists("/grader/check.sh"), "the prepared environment is there"
        sb.files.write("/submission/main.sh", code, mode=0o755)
        passed = 0
        for i in range(len(TESTS)):
            try:
                sb.run(f"sh /submission/main.sh < /grader/tests/{i}.in > /tmp/{i}.got",
                       timeout=5, user="1000:1000")
            except pykata.SandboxTimeoutError:
                return f"{name}: timed out on test {i}"
            passed += sb.run(f"/grader/check.sh /tmp/{i}.got /grader/tests/{i}.out").text == "pass\n"
        return f"{name}: {passed}/{len(TESTS)}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "grader-env"
        prepare(snapshot)
        for name, code in SUBMISSIONS.items():
            print(grade(snapshot, name, code))


if __name__ == "__main__":
    main()
