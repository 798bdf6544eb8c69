#!/usr/bin/env python3
"""Run generated (untrusted) code in a VM sandbox, with a time limit and file I/O.

    .venv/bin/python examples/run_untrusted_code.py

What an AI agent's "code interpreter" tool does: put the input files in, run the code with a timeout,
read the results back. The code runs in a container inside its own VM: whatever it does (fork
bombs, filling its disk, an endless loop) stays in the VM, which is destroyed at the end.
"""

from __future__ import annotations

import pykata

GENERATED_CODE = r"""
total=0
while read n; do total=$((total + n)); done < /work/numbers.txt
echo "sum: $total" > /work/result.txt
echo "done"
"""

ENDLESS_CODE = "while :; do :; done"


def main() -> None:
    # the whole sandbox is destroyed after 120 s even if this process forgets it
    with pykata.Sandbox(image="busybox", timeout=120, cwd="/work") as sb:
        sb.files.write("numbers.txt", "\n".join(str(i) for i in range(1, 101)) + "\n")
        sb.files.write("job.sh", GENERATED_CODE, mode=0o755)
        r = sb.run(["sh", "job.sh"], timeout=30)
        print("exit", r.exit_code, "stdout", r.text.strip())
        print(sb.files.read("result.txt").strip())              # sum: 5050

        try:
            sb.run(ENDLESS_CODE, timeout=2)
        except pykata.SandboxTimeoutError as e:
            print("stopped:", e)                                 # killed after 2 s; the sandbox lives on
        print([f.name for f in sb.files.list(".")])


if __name__ == "__main__":
    main()
