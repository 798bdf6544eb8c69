"""`pykata run -d` (the container runs on in the background) and `pykata attach` (follow it again).

`run -d` starts the same `pykata run` command again as a background process in its own session, which
owns the VM as a foreground `run` would, and returns once the container runs, printing its id. Its
output goes to the container's logs only; `pykata attach` follows them (from the start, rotated logs
included) until the container exits, and exits with its status. Ctrl-C leaves `attach`, not the
container; `pykata kill`/`rm -f` end it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import click

from pykata.config import Config, load_config
from pykata.errors import PykataError
from pykata.sandbox import sandboxes_dir
from pykata.sandbox import state as sandbox_state
from pykata.sandbox.lookup import find
from pykata.sandbox.sandbox import new_id

DETACHED_ENV = "PYKATA_DETACHED_ID"  # set for the background `run`: the sandbox id to use
READY_TIMEOUT = 600.0
PUBLISHED = b"pykata: published "  # how the background run reports a host port -p chose
_POLL = 0.05


def detached_id() -> str | None:
    """The sandbox id this process must use when it is the background half of `run -d`."""
    sid = os.environ.get(DETACHED_ENV)
    return sid if sid and sid.isalnum() and len(sid) <= 64 else None


def silence_terminal() -> None:
    """The background `run` from here on writes only to the container's logs: what it printed before
    (an error) is what `run -d` shows, what it would print after would fill a file nobody reads."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)


def start_detached(config: Config) -> None:
    """Start this `pykata run` again in the background; print the container id once it runs and exit
    0, or show the background run's error and exit with its status."""
    sid = new_id()
    directory = sandboxes_dir(config) / sid
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(
            [sys.executable, "-c", "from pykata.cli.main import main; main()", *sys.argv[1:]],
            env={**os.environ, DETACHED_ENV: sid}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errors, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            record = sandbox_state.load(directory)
            container = record.containers.get(sid) if record is not None else None
            if container is not None and container.status in ("running", "exited"):
                click.echo(sid)
                errors.seek(0)  # the host ports `-p` chose are shown, as a foreground run shows them
                for line in errors.read(64 << 10).splitlines():
                    if line.startswith(PUBLISHED):
                        sys.stderr.buffer.write(line + b"\n")
                sys.exit(0)
            code = child.poll()
            if code is not None:
                errors.seek(0)
                sys.stderr.buffer.write(errors.read(64 << 10))
                sys.exit(code or 125)
            time.sleep(_POLL)
    click.echo(f"pykata: the container did not start within {READY_TIMEOUT:.0f}s (still starting as {sid})",
               err=True)
    sys.exit(125)


class _Follower:
    """Reads what is appended to a log, across its rotation (a new file under the same name)."""

    def __init__(self, path: Path, out: BinaryIO) -> None:
        self.path = path
        self.out = out
        self._f: BinaryIO | None = None
        self._inode = -1

    def pump(self) -> int:
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return 0
        if inode != self._inode:
            if self._f is not None:
                self._drain()  # the rest of the rotated file first
                self._f.close()
            self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
            self._inode = inode
        return self._drain()

    def _drain(self) -> int:
        n = 0
        assert self._f is not None
        while data := self._f.read(64 << 10):
            self.out.write(data)
            n += len(data)
        self.out.flush()
        return n

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def follow(directory: Path, sid: str) -> int:
    """Copy the container's logs to stdout/stderr as they grow until it exits; its exit status (0
    when its record went away with `--rm`)."""
    logs = directory / "logs"
    followers = [_Follower(logs / "stdout.log", sys.stdout.buffer), _Follower(logs / "stderr.log", sys.stderr.buffer)]
    try:
        while True:
            record = sandbox_state.load(directory)
            moved = sum(f.pump() for f in followers)
            container = record.containers.get(sid) if record is not None else None
            if record is None or container is None:
                return 0
            ended = container.status == "exited" or not record.owner_alive()
            if ended and moved == 0:
                sum(f.pump() for f in followers)
                return container.exit_code if container.exit_code is not None else 255
            if moved == 0:
                time.sleep(_POLL)
    finally:
        for f in followers:
            f.close()


@click.command(name="attach")
@click.argument("container")
def attach_cmd(container: str) -> None:
    """Follow a CONTAINER's output until it exits; exit with its status (Ctrl-C leaves it running)."""
    try:
        found = find(load_config(), container)
    except PykataError as e:
        click.echo(f"pykata: {e}", err=True)
        sys.exit(1)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(follow(found.dir, found.record.id))
    sys.exit(130)
