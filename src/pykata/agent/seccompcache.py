"""Seccomp programs crun compiled, kept per profile so the next container with the same profile skips
the compilation.

crun compiles a spec's linux.seccomp with libseccomp on every `crun create`; under TCG that is 80-120
ms per create for containerd's default profile (bench/crun_guest.py --seccomp). crun leaves the program
it compiled in its state directory (`seccomp.bpf`, which the agent's own exec path loads too). After a
create, the agent keeps that program under a digest of the exact profile; a later container of this VM
with the same profile gets it through crun's `run.oci.seccomp_bpf_data` annotation, which makes crun
load it instead of compiling the profile again (the spec's seccomp stays: crun still takes its flags
from there).

Only the agent sets that annotation, in the config.json it writes, after bundle.rewrite_spec refused
every run.oci.* annotation from the host; the program comes from crun's state directory, which no
container can see, read right after crun wrote it. Nothing is shared with another VM at run time. The
one program a VM may start with is containerd's RuntimeDefault, which its template's agent compiled
from a profile built into the agent before any host session (AgentService.precompile_seccomp): the
host's admin makes templates before any pod exists, so no pod's input is in it. Profiles that crun
does more with than compile (a listener for notifications, SCMP_ACT_NOTIFY) are not cached.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

BPF_ANNOTATION = "run.oci.seccomp_bpf_data"
MAX_PROFILES = 16
MAX_INSTRUCTIONS = 4096  # the kernel's BPF_MAXINSNS
_INSTRUCTION = 8  # bytes of one struct sock_filter


def profile_key(config: dict[str, Any]) -> str | None:
    """A digest of the config's linux.seccomp, or None when it has none or one that is not cached."""
    linux = config.get("linux")
    profile = linux.get("seccomp") if isinstance(linux, dict) else None
    if not isinstance(profile, dict) or not profile or profile.get("listenerPath"):
        return None
    text = json.dumps(profile, sort_keys=True, separators=(",", ":"))
    if "SCMP_ACT_NOTIFY" in text:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


class SeccompCache:
    """The last MAX_PROFILES programs, by profile digest."""

    def __init__(self) -> None:
        self._programs: OrderedDict[str, bytes] = OrderedDict()

    def apply(self, key: str | None, config: dict[str, Any]) -> bool:
        """Give `config` the program compiled for its profile (True), when one is kept."""
        program = self._programs.get(key) if key is not None else None
        if program is None or key is None:
            return False
        self._programs.move_to_end(key)
        notes = config.get("annotations")
        config["annotations"] = {**(notes if isinstance(notes, dict) else {}),
                                 BPF_ANNOTATION: base64.b64encode(program).decode()}
        return True

    def remember(self, key: str | None, crun_state: Path) -> None:
        """Keep the program crun compiled for the container whose state directory is `crun_state`
        (nothing when it is missing, empty or not a whole number of instructions within the limit)."""
        if key is None or key in self._programs:
            return
        try:
            program = (crun_state / "seccomp.bpf").read_bytes()
        except OSError:
            return
        if not program or len(program) % _INSTRUCTION or len(program) // _INSTRUCTION > MAX_INSTRUCTIONS:
            return
        self._programs[key] = program
        while len(self._programs) > MAX_PROFILES:
            self._programs.popitem(last=False)

    def __len__(self) -> int:
        return len(self._programs)
