"""`Record`: the base of small value classes on the agent's start-up path (ttrpc events, netlink
records), instead of @dataclass.

A dataclass compiles its generated methods (__init__, __repr__, __eq__, ...) with exec when its module
is imported: ~0.3 ms per class on the host and about 8x that in a TCG guest, where the agent's
imports are the largest part of a cold boot. A Record subclass writes its own __init__, lists its
fields in __slots__ and, in order, in __match_args__; equality, hashing and repr come from here,
field by field, as a dataclass's would. `FrozenRecord` is the frozen=True kind: its __init__ sets
fields with `_init`, and a later assignment or deletion raises dataclasses.FrozenInstanceError, as the
frozen dataclasses these replaced did (an AttributeError subclass, so `except AttributeError` catches it
too). dataclasses is imported only on that error path, never on the agent's start-up path.
"""

from __future__ import annotations

from typing import Any


class Record:
    """Value semantics over the fields in `__match_args__`: equal when the type and every field are equal."""

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{self.__class__.__qualname__}({fields})"

    def _asdict(self) -> dict[str, Any]:
        """The fields by name, in order (dataclasses.asdict, without its deep copy)."""
        return {name: getattr(self, name) for name in self.__match_args__}


class FrozenRecord(Record):
    """A Record whose fields cannot be set or deleted once __init__ has set them (with `_init`)."""

    __slots__ = ()

    def _init(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _frozen(f"cannot assign to field {name!r} of frozen {self.__class__.__qualname__}")

    def __delattr__(self, name: str) -> None:
        raise _frozen(f"cannot delete field {name!r} of frozen {self.__class__.__qualname__}")


def _frozen(message: str) -> AttributeError:
    """dataclasses.FrozenInstanceError(message): a bug's path only, so its import costs nothing at start-up."""
    import dataclasses

    return dataclasses.FrozenInstanceError(message)
