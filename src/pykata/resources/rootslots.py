"""Which image each read-only slot of one VM holds, and which containers use it.

Containers of the same image share a slot. A slot stays filled after its last container is removed
(a restarted container finds its image there); it is given another image only when no free slot is
left, least recently used first. Pure bookkeeping: the caller fills the slot it is told to.

A slot may be filled *tentatively* before the VM serves anyone (a pooled VM pre-filled with the image
pods asked for last, pykata.factory.pool.recent_image): until a container of that image acquires it,
it is given to no other image, and `tentative` names what is still tentative so that the caller
empties it before any container runs (a pod never sees an image none of its containers uses).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class _Slot:
    key: str | None = None
    users: set[str] = field(default_factory=set)
    used: int = 0
    tentative: bool = False


@dataclass(frozen=True)
class SlotGrant:
    """Slot `slot` for a container; `fill` tells whether the caller must put the image in it first."""

    slot: int
    fill: bool


class SlotTable:
    """Slot bookkeeping for one VM with `count` slots."""

    def __init__(self, count: int) -> None:
        self._slots = [_Slot() for _ in range(count)]
        self._clock = itertools.count(1)

    def acquire(self, key: str, user: str) -> SlotGrant | None:
        """A slot holding (or to hold) image `key` for `user`, or None when every slot is in use by
        containers of other images."""
        for i, s in enumerate(self._slots):
            if s.key == key:
                s.users.add(user)
                s.used = next(self._clock)
                s.tentative = False
                return SlotGrant(i, fill=False)
        # not a tentative slot: if filling failed, it would hold the tentative image unrecorded
        idle = [(s.key is not None, s.used, i) for i, s in enumerate(self._slots) if not s.users and not s.tentative]
        if not idle:
            return None
        _, _, i = min(idle)  # an empty slot first, else the least recently used idle one
        s = self._slots[i]
        s.key, s.users, s.used = key, {user}, next(self._clock)
        return SlotGrant(i, fill=True)

    def prefill(self, key: str) -> int | None:
        """The slot to fill tentatively with image `key` (an empty one; the caller fills it, then
        nothing needs doing: the slot is recorded as holding `key` tentatively), or None: `key` is
        held already or no slot is empty."""
        if any(s.key == key for s in self._slots):
            return None
        for i, s in enumerate(self._slots):
            if s.key is None and not s.users:
                self._slots[i] = _Slot(key, set(), 0, tentative=True)
                return i
        return None

    def tentative(self) -> list[int]:
        """The slots still holding a tentative image no container acquired: the caller empties each
        (before any container runs in the VM), then `forget`s it."""
        return [i for i, s in enumerate(self._slots) if s.tentative]

    def occupy(self, slot: int, key: str, users: set[str]) -> None:
        """Record that slot `slot` holds image `key` used by `users` (a VM restored from a snapshot,
        whose slots were filled as they were saved)."""
        self._slots[slot] = _Slot(key, set(users), next(self._clock))

    def forget(self, slot: int) -> None:
        """The slot could not be filled: it holds nothing known."""
        self._slots[slot] = _Slot()

    def release(self, user: str) -> None:
        """`user` no longer uses its slot (the image stays in it). Idempotent."""
        for s in self._slots:
            s.users.discard(user)

    def holding(self) -> dict[int, tuple[str | None, frozenset[str]]]:
        """Slot -> (image key, users), for inspection and snapshots; a tentative image shows as none
        (it is emptied before any container runs, and a restore never fills it again)."""
        return {i: (None if s.tentative else s.key, frozenset(s.users)) for i, s in enumerate(self._slots)}
