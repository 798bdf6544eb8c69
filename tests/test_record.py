"""pykata.record: the frozen kind behaves as the frozen dataclasses it replaced on the agent's start-up path."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from pykata.record import FrozenRecord, Record


class Point(FrozenRecord):
    __slots__ = ("x", "y")
    __match_args__ = ("x", "y")

    def __init__(self, x: int, y: int) -> None:
        self._init("x", x)
        self._init("y", y)


class Mutable(Record):
    __slots__ = ("x",)
    __match_args__ = ("x",)

    def __init__(self, x: int) -> None:
        self.x = x


def test_a_frozen_record_refuses_assignment_and_deletion_as_a_frozen_dataclass_does() -> None:
    """Before: AttributeError, which `except dataclasses.FrozenInstanceError` (what callers of the
    dataclasses these replaced would catch) missed."""
    p = Point(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'x' of frozen Point"):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'y'"):
        del p.y
    with pytest.raises(AttributeError):  # still an AttributeError, as FrozenInstanceError is
        p.z = 1  # type: ignore[attr-defined]
    assert (p.x, p.y) == (1, 2) and p == Point(1, 2) and hash(p) == hash(Point(1, 2))
    assert repr(p) == "Point(x=1, y=2)" and p._asdict() == {"x": 1, "y": 2}
    m = Mutable(1)
    m.x = 2
    assert m == Mutable(2) and m != p


def test_the_frozen_error_path_is_the_only_one_that_imports_dataclasses() -> None:
    code = ("import sys; from pykata.record import FrozenRecord; assert 'dataclasses' not in sys.modules, 'import'\n"
            "class P(FrozenRecord):\n    __slots__ = ('x',)\n    __match_args__ = ('x',)\n"
            "    def __init__(self): self._init('x', 1)\n"
            "p = P(); assert 'dataclasses' not in sys.modules, 'init'\n"
            "try:\n    p.x = 2\nexcept AttributeError as e:\n    print(type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "FrozenInstanceError"
