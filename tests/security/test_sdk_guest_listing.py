"""The SDK's files.list takes entry names from the guest: a workload that owns its container's userland
(here: its own /bin/sh, which the listing runs) answers with names that are not one path component or
with ids no host file can have. Each is refused with an SdkError, escaped; an honest answer still lists."""

from __future__ import annotations

import pytest

import pykata

pytestmark = [pytest.mark.vm]

# the container's new /bin/sh: whatever runs `sh -c ...` (every files.* call) gets the forged answer
FORGED_SH = "#!/bin/busybox sh\ncat /tmp/forged\n"
SET_ANSWER = 'printf "%s\\n%s\\0" "$1" "$2" > /tmp/forged'


def test_files_list_refuses_names_and_ids_the_guest_forged() -> None:
    with pykata.Sandbox(image="busybox") as sb:
        r = sb.run(["busybox", "sh", "-c", 'printf "%s" "$1" > /tmp/sh && chmod 755 /tmp/sh && '
                    "rm /bin/sh && cp /tmp/sh /bin/sh", "sh", FORGED_SH])
        assert r.exit_code == 0, r

        def answer(header: str, name: str) -> None:
            assert sb.run(["busybox", "sh", "-c", SET_ANSWER, "sh", header, name]).exit_code == 0

        # an honest-looking answer is taken: the forged shell really is what the listing runs
        answer("81a4 5 0 0 0", "fine")
        assert [(f.path, f.size) for f in sb.files.list("/tmp")] == [("/tmp/fine", 5)]

        for name in ("../escape", "a/b", "/etc/passwd", "..", ".", "../../../../root/.ssh/authorized_keys"):
            answer("81a4 5 0 0 0", name)
            with pytest.raises(pykata.SdkError, match="not a single path component"):
                sb.files.list("/tmp")

        # a name that would drive the reader's terminal: refused, and quoted escaped
        answer("81a4 5 0 0 0", "x\x1b[2J/\u202ey")
        with pytest.raises(pykata.SdkError) as err:
            sb.files.list("/tmp")
        assert "\x1b" not in str(err.value) and "\u202e" not in str(err.value)

        # ids a host chown would take as "leave it" (preserve_owner), a negative size
        for header in ("81a4 5 4294967295 0 0", "81a4 5 0 -1 0", "81a4 -5 0 0 0", "81a4 5 99999999999 0 0"):
            answer(header, "fine")
            with pytest.raises(pykata.SdkError, match="unexpected answer"):
                sb.files.list("/tmp")
