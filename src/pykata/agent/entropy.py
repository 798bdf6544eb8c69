"""Make a VM cloned from a template (or restored from a snapshot) its own, random-wise.

First line, the guest's own: `reseed_crng()` runs with the first bytes of every host session on the
agent channel, before the first request is read (pykata.agent.channel). A restored VM always starts
a new session (a template is saved before any host talked to its agent, a snapshot's old session ends
when it is restored), so the kernel's CRNG takes a new key from its input pool and the CPU's RDSEED/RDRAND (the
host's getrandom under TCG, per QEMU process) before anything in the guest answers. Linux 6.1
reseeded on the first read once the key was older than its reseed interval; from 6.2 it reseeds only
on a timer (up to a minute apart), which a clone inherits from its template: without this, two clones
read the same /dev/urandom bytes for seconds. QEMU's vmgenid device, the kernel's own signal for
this, is not described to a microvm guest (QEMU 7.2 builds its SSDT only for pc/q35).

Second line, the host's (Kata's ReseedRandomDev): every clone of one template resumes the same guest:
the same kernel RNG state, the same boot_id, the same KASLR layout and the same Python `random` state
in this agent. The host therefore sends each sandbox's clone, before anything else runs in it, fresh
randomness and a boot id of its own:
  * the bytes are written into the kernel's input pool, credited (RNDADDENTROPY) and the CRNG is
    forced to reseed (RNDRESEEDCRNG), so /dev/urandom and getrandom() diverge at once;
  * the agent's `random` module is reseeded from them and fresh kernel randomness;
  * the kernel's boot_id is read-only and fixed at its first read (in the template), so the agent
    writes the new one to a file and bind-mounts it over /proc/sys/kernel/random/boot_id in its own
    mount namespace (guest tools) and in every container it creates (an OCI bind mount after /proc).
What cannot be changed in a running guest: the kernel's address layout (KASLR) and Python's hash seed
(fixed at interpreter start). Hence Kata's advice, repeated in configuration.toml: templates for
trusted workloads only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pykata.agent import sysmount
from pykata.errors import FailedPrecondition, Internal, InvalidArgument
from pykata.protocols.agent import agent_pb2

log = logging.getLogger("pykata.agent.entropy")

KERNEL_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
URANDOM = "/dev/urandom"
MIN_SEED = 32
MAX_SEED = 512
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# <linux/random.h>
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MS_BIND = 0x1000
MS_REMOUNT = 0x20
MS_RDONLY = 0x1


class Entropy:
    """The agent's side of ReseedRandomDev; `boot_id_file` is what containers get bind-mounted."""

    def __init__(self, state_dir: Path, *, kernel_boot_id: Path = KERNEL_BOOT_ID) -> None:
        self.boot_id_file = state_dir / "boot_id"
        self.kernel_boot_id = kernel_boot_id
        self.boot_id: str | None = None
        # boot_id_file is bound over kernel_boot_id already (prepare_boot_id), holding the kernel's id
        self._bound = False
        # Opened once, ahead (a template's start-up work): a clone's ReseedRandomDev then writes through
        # them with no path walk, open, truncate or close, kernel code TCG would translate afresh in each
        # clone (~1/3 of the call's translated blocks went to opening, truncating and refilling files).
        self._boot_id_fd: int | None = None
        self._boot_id_size = 0
        self._urandom_fd: int | None = None
        sysmount.resolve()

    def prepare_boot_id(self) -> None:
        """Bind `boot_id_file` over the kernel's boot_id now, holding the kernel's own id: a VM template's
        start-up work (AgentService.precompile_seccomp), so that each clone's ReseedRandomDev only
        rewrites the file's content, without making the file and the two mounts (guest code that TCG
        translates afresh in every clone: ~1/3 of the call). Nothing changes for containers: they get
        the file only once a boot id was given (container_mounts). Never raises (logged)."""
        if self._bound or self.boot_id is not None:
            return
        if self._urandom_fd is None:
            with contextlib.suppress(OSError):  # (feed_kernel opens it then, and says why it cannot)
                self._urandom_fd = os.open(URANDOM, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self.boot_id_file.parent.mkdir(parents=True, exist_ok=True)
            content = (read_boot_id(self.kernel_boot_id) + "\n").encode()
            self.boot_id_file.write_bytes(content)
            os.chmod(self.boot_id_file, 0o444)
            bind_readonly(self.boot_id_file, self.kernel_boot_id)
        except OSError as exc:
            log.warning("boot_id: not bound ahead (%s): ReseedRandomDev binds it", exc)
            return
        self._bound = True
        with contextlib.suppress(OSError):  # (_replace_boot_id opens it then)
            self._boot_id_fd = os.open(self.boot_id_file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._boot_id_size = len(content)

    def reseed(self, req: agent_pb2.ReseedRandomDevRequest, *,
               containers_exist: bool) -> agent_pb2.ReseedRandomDevResponse:
        """Raises InvalidArgument naming the field, FailedPrecondition for a first boot_id after
        containers exist, INTERNAL when the kernel refuses. A later boot_id replaces the first (a
        restored snapshot)."""
        if not MIN_SEED <= len(req.data) <= MAX_SEED:
            raise InvalidArgument("data", f"{len(req.data)} bytes: give {MIN_SEED}..{MAX_SEED}")
        if req.boot_id:
            if not UUID_RE.match(req.boot_id):
                raise InvalidArgument("boot_id", f"{req.boot_id[:64]!r} is not a lower-case UUID")
            if containers_exist and self.boot_id is None:
                raise FailedPrecondition("boot_id: containers already run with the old one")
        feed_kernel(req.data, self._urandom_fd)
        random.seed(req.data + os.urandom(32))
        if req.boot_id and self.boot_id is None and self._bound:
            self._replace_boot_id(req.boot_id)
        elif req.boot_id and self.boot_id is None:
            self._set_boot_id(req.boot_id)
        elif req.boot_id and req.boot_id != self.boot_id:
            self._replace_boot_id(req.boot_id)
        return agent_pb2.ReseedRandomDevResponse(rng_sample=random.getrandbits(64),
                                                 boot_id=self.boot_id or read_boot_id(self.kernel_boot_id))

    def _set_boot_id(self, boot_id: str) -> None:
        self.boot_id_file.parent.mkdir(parents=True, exist_ok=True)
        self.boot_id_file.write_text(boot_id + "\n")
        os.chmod(self.boot_id_file, 0o444)
        try:
            bind_readonly(self.boot_id_file, self.kernel_boot_id)
        except OSError as exc:
            raise Internal(f"boot_id: cannot bind over {self.kernel_boot_id}: {exc}") from None
        self.boot_id = boot_id

    def _replace_boot_id(self, boot_id: str) -> None:
        """A new boot id for a VM that has one (a restored snapshot is a new boot): the file every
        container and the guest itself have bound over their boot_id is rewritten in place, so they
        all see the new one."""
        data = (boot_id + "\n").encode()
        try:
            if self._boot_id_fd is not None:
                # in place, through the descriptor kept since prepare_boot_id
                os.pwrite(self._boot_id_fd, data, 0)
                if self._boot_id_size > len(data):
                    os.ftruncate(self._boot_id_fd, len(data))
                self._boot_id_size = len(data)
            else:
                fd = os.open(self.boot_id_file, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise Internal(f"boot_id: cannot rewrite {self.boot_id_file}: {exc.strerror}") from None
        self.boot_id = boot_id

    def close(self) -> None:
        """Close the descriptors prepare_boot_id kept. Idempotent."""
        for fd in (self._boot_id_fd, self._urandom_fd):
            if fd is not None:
                os.close(fd)
        self._boot_id_fd = self._urandom_fd = None

    def container_mounts(self) -> list[dict[str, Any]]:
        """The OCI mount that gives a container this VM's boot id (none before ReseedRandomDev)."""
        if self.boot_id is None:
            return []
        return [{"destination": str(KERNEL_BOOT_ID), "type": "bind", "source": str(self.boot_id_file),
                 "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}]


def feed_kernel(data: bytes, urandom_fd: int | None = None) -> None:
    """Mix `data` into the kernel's pool, credit it, and force the CRNG to reseed, through `urandom_fd`
    (/dev/urandom open for writing) or, without it, /dev/urandom opened for this call.

    Raises Internal when /dev/urandom cannot be opened or the kernel refuses."""
    if urandom_fd is None:
        try:
            fd = os.open(URANDOM, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Internal(f"{URANDOM}: {exc.strerror}") from None
    else:
        fd = urandom_fd
    try:
        # struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
        info = struct.pack("ii", len(data) * 8, len(data)) + data
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise Internal(f"reseeding the kernel RNG: {exc.strerror}") from None
    finally:
        if urandom_fd is None:
            os.close(fd)


def reseed_crng() -> None:
    """Force the kernel's CRNG to reseed now from its own sources (RNDRESEEDCRNG on URANDOM).

    Never raises (it runs inside the channel's data callback): a failure is logged. The kernel
    refuses (ENODATA) only while its CRNG was never seeded, when every read extracts afresh anyway."""
    try:
        fd = os.open(URANDOM, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("reseeding the kernel RNG: %s: %s", URANDOM, exc.strerror)
        return
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        log.warning("reseeding the kernel RNG: %s", exc.strerror)
    finally:
        os.close(fd)


def crng_reseeder() -> Callable[[], None]:
    """reseed_crng with URANDOM opened once, now: the agent makes it at its start, so a template clone's
    first session (whose first bytes reseed before any answer) does not walk the path under TCG's
    cold translation cache (~4% of the guest code its first answer ran). Falls back to reseed_crng when
    URANDOM cannot be opened now. The callable never raises."""
    try:
        fd = os.open(URANDOM, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("reseeding the kernel RNG: %s: %s (trying again at each session)", URANDOM, exc.strerror)
        return reseed_crng

    def reseed() -> None:
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as exc:
            log.warning("reseeding the kernel RNG: %s", exc.strerror)

    return reseed


def read_boot_id(path: Path = KERNEL_BOOT_ID) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def bind_readonly(source: Path, target: Path) -> None:
    """Bind `source` over `target`, then make the bind read-only. Raises OSError."""
    for src, flags in ((str(source), MS_BIND), ("none", MS_BIND | MS_REMOUNT | MS_RDONLY)):
        sysmount.mount(src, str(target), "", flags, "")
