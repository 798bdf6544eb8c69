"""What docker makes of a runtime's error, for differential tests against runc (no docker on these hosts).

moby's daemon/start.go translateContainerdStartErr, which `docker exec` applies to the runtime's message
when the exec does not start (the exec's exit code, 126 unless set): the same rules, as written there.
"""

from __future__ import annotations


def docker_exec_status(message: str, command: str) -> int:
    said, cmd = message.lower(), command.lower()
    status = 126  # daemon/exec.go: "default to 126 (EACCES) if we fail to start the exec"
    if cmd in said and ("executable file not found" in said or "no such file or directory" in said
                        or "system cannot find the file specified" in said):
        status = 127
    if "permission denied" in said:
        status = 126
    if "not a directory" in said:  # "Are you trying to mount a directory onto a file (or vice-versa)?"
        status = 127
    return status
