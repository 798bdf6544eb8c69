#!/usr/bin/env python3
"""A notebook-style terminal session in a VM sandbox: type commands, read the screen, resize.

    .venv/bin/python examples/pty_session.py

State (the shell's variables, its working directory, files) lives on between cells, as in a notebook
kernel; the VM goes away with the `with` block.
"""

from __future__ import annotations

import pykata

MARK = "__cell_done__"


def run_cell(term: pykata.Pty, line: str) -> str:
    """Type one line and return what the terminal showed until the shell printed MARK."""
    term.write(f"{line}; echo {MARK}\n")
    screen = b""
    while MARK.encode() + b"\r\n" not in screen.split(f"; echo {MARK}".encode())[-1]:
        chunk = term.read()
        if chunk is None:
            break
        screen += chunk
    return screen.decode(errors="replace")


def main() -> None:
    with pykata.Sandbox(image="busybox") as sb:
        term = sb.pty("sh", cols=120, rows=40)
        for cell in ["cd /tmp && x=41", "x=$((x + 1)); echo answer=$x", "pwd", "stty size"]:
            print(f">>> {cell}")
            print(run_cell(term, cell).strip())
        term.resize(cols=80, rows=24)
        print(run_cell(term, "stty size").strip())
        term.write("exit\n")
        print("shell exited with", term.wait(timeout=30))


if __name__ == "__main__":
    main()
