"""The debug console's output filter: a guest cannot make the admin's terminal answer or touch the clipboard,
and everything else passes byte for byte, however the stream is cut into chunks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pykata.cli.termfilter import AnswerbackFilter

HOSTILE = [
    b"\x1b]52;c;?\x07",                   # read the clipboard
    b"\x1b]52;c;ZXZpbA==\x1b\\",          # set it (ST-terminated)
    b"\x1b[21t", b"\x1b[20t", b"\x1b[21;1t",  # report title / icon label
    b"\x05",                             # answerback
]
BENIGN = [b"hello\r\n", b"\x1b[1;31mred\x1b[0m", b"\x1b[6n", b"\x1b]0;title\x07", b"\x1b[8;24;80t", b"\x1b(B",
          "é ü 日本".encode(), b"\x1b[?1049h"]


def run(chunks: list[bytes]) -> bytes:
    f = AnswerbackFilter()
    return b"".join(f.feed(c) for c in chunks)


def test_hostile_sequences_are_dropped_and_the_rest_passes() -> None:
    stream = b"".join(x for pair in zip(BENIGN, HOSTILE * 2, strict=False) for x in pair)
    expected = b"".join(BENIGN[: len(HOSTILE) * 2])
    assert run([stream]) == expected
    # ESC ESC [ 21 t: the second ESC starts the report, it must not slip through behind the first
    assert b"[21t" not in run([b"\x1b\x1b[21t"])


@given(st.lists(st.sampled_from(HOSTILE + BENIGN), max_size=30), st.lists(st.integers(0, 400), max_size=10))
def test_any_chunking_gives_the_same_output(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert run(chunks) == run([stream]) == b"".join(p for p in pieces if p not in HOSTILE)
