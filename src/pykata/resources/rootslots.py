"""Which image each read-only slot of one VM holds, and which containers use it.

Containers of the same image share a slot. A slot stays filled after its last container is removed
(a restarted container finds its image there); it is given another image only when no free slot is
left, least recently used first. Pure bookkeeping: the caller fills the slot it is told to.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class _Slot:
    key: str | None = None
    users: set[str] = field(default_factory=set)
    used: int = 0


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
                return SlotGrant(i, fill=False)
        idle = [(s.key is not None, s.used, i) for i, s in enumerate(self._slots) if not s.users]
        if not idle:
            return None
        _, _, i = min(idle)  # an empty slot first, else the least recently used idle one
        s = self._slots[i]
        s.key, s.users, s.used = key, {user}, next(self._clock)
        return SlotGrant(i, fill=True)

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
        """Slot -> (image key, users), for inspection."""
        return {i: (s.key, frozenset(s.users)) for i, s in enumerate(self._slots)}
