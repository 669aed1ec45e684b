"""Length-prefixed framing: building frames and splitting a byte stream back into them."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from terminal_emulator.framing import FrameDecoder, FramingError, frame
from terminal_emulator.profile import Framing

BINARY = Framing(header="2b")
ASCII = Framing(header="4a")


def test_a_binary_header_is_the_big_endian_length_of_what_follows() -> None:
    assert frame(b"x" * 300, BINARY)[:2] == b"\x01\x2c"


def test_an_ascii_header_is_zero_padded_digits() -> None:
    assert frame(b"0800abc", ASCII)[:4] == b"0007"


def test_a_length_that_includes_the_header_counts_it() -> None:
    framing = Framing(header="4b", length_includes_header=True)
    assert frame(b"abc", framing)[:4] == (7).to_bytes(4, "big")
    assert FrameDecoder(framing).feed(frame(b"abc", framing)) == [b"abc"]


def test_a_tpdu_goes_after_the_length_and_is_stripped_on_the_way_back() -> None:
    framing = Framing(header="2b", tpdu=bytes.fromhex("6000010002"))
    data = frame(b"body", framing)
    assert data == b"\x00\x09" + bytes.fromhex("6000010002") + b"body"
    decoder = FrameDecoder(framing)
    assert decoder.feed(data) == [b"body"]
    assert decoder.last_tpdu == bytes.fromhex("6000010002")


def test_a_frame_over_the_limit_is_a_framing_error() -> None:
    decoder = FrameDecoder(Framing(header="2b", max_frame_bytes=10))
    with pytest.raises(FramingError):
        decoder.feed(b"\x00\x0b")


def test_a_non_digit_ascii_header_is_a_framing_error() -> None:
    with pytest.raises(FramingError):
        FrameDecoder(ASCII).feed(b"00x1a")


def test_a_body_too_long_for_the_header_cannot_be_framed() -> None:
    with pytest.raises(FramingError):
        frame(b"x" * 100, Framing(header="2a"))


@given(
    bodies=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
    header=st.sampled_from(["2b", "4b", "4a"]),
)
def test_frames_come_back_whole_however_the_stream_is_chunked(
    bodies: list[bytes], cuts: list[int], header: str
) -> None:
    framing = Framing(header=header)  # type: ignore[arg-type]
    stream = b"".join(frame(b, framing) for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(framing)
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        out.extend(decoder.feed(stream[start:end]))
    assert out == bodies
    assert decoder.buffered == 0
