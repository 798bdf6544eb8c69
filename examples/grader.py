#!/usr/bin/env python3
"""Grade untrusted submissions, each in a fresh VM sandbox taken from a warm pool.

    .venv/bin/python examples/grader.py

A grader must not let one submission see or spoil another's environment: each gets its own sandbox,
used once and destroyed. The pool boots the next ones while the current one is graded, so a
submission does not wait for a VM to boot. (Snapshot/restore of a prepared environment is not in the
SDK yet: the preparation, here writing the test files, is done per submission.)
"""

from __future__ import annotations

import pykata

TESTS = {"1 2": "3", "10 -4": "6", "0 0": "0"}
SUBMISSIONS = {
    "alice": 'read a b; echo $((a + b))',
    "bob": 'read a b; echo $((a - b))',             # wrong
    "mallory": 'while :; do :; done',               # never ends: the timeout stops it
    "eve": 'cat /grader/expected.txt 2>/dev/null || echo nothing-to-steal',
}


def grade(pool: pykata.Pool, name: str, code: str) -> str:
    with pool.acquire(timeout=120) as sb:
        sb.files.write("/submission/main.sh", code, mode=0o755)
        passed = 0
        for given, expected in TESTS.items():
            try:
                r = sb.run(["sh", "/submission/main.sh"], stdin=given + "\n", timeout=5, user="1000:1000")
            except pykata.SandboxTimeoutError:
                return f"{name}: timed out on {given!r}"
            passed += r.exit_code == 0 and r.text.strip() == expected
        return f"{name}: {passed}/{len(TESTS)}"


def main() -> None:
    with pykata.Pool(size=2, image="busybox", timeout=120) as pool:
        for name, code in SUBMISSIONS.items():
            print(grade(pool, name, code))


if __name__ == "__main__":
    main()
