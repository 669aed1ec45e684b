"""Properties of FrameBuffer: any chunking of a stream gives the same frames, for every framing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.framing import TPDU_SIZE, Frame, FrameBuffer, FramingError, encode_frame
from gateway.protocol.profile import HEADER_KINDS, Framing

SETTINGS = settings(max_examples=100, deadline=None)
CAPACITY = {"2b": 0xFFFF, "4b": 0xFFFF_FFFF, "2a": 99, "4a": 9999}


def largest_payload(framing: Framing) -> int:
    """The longest message a frame of this framing can carry."""
    adjust = framing.header_size if framing.length_includes_header else 0
    body = min(framing.max_frame_bytes, CAPACITY[framing.header] - adjust)
    return body - (TPDU_SIZE if framing.tpdu else 0)


framings = st.builds(
    Framing,
    header=st.sampled_from(HEADER_KINDS),
    length_includes_header=st.booleans(),
    tpdu=st.booleans(),
    max_frame_bytes=st.integers(TPDU_SIZE + 1, 400),
)


@st.composite
def frames_for(draw: st.DrawFn, framing: Framing, max_frames: int = 6) -> list[Frame]:
    size = min(largest_payload(framing), 300)
    payloads = draw(st.lists(st.binary(min_size=1, max_size=size), max_size=max_frames))
    if not framing.tpdu:
        return [Frame(payload) for payload in payloads]
    addresses = st.binary(min_size=4, max_size=4)
    return [Frame(payload, b"\x60" + draw(addresses)) for payload in payloads]


@st.composite
def framing_and_frames(draw: st.DrawFn) -> tuple[Framing, list[Frame]]:
    framing = draw(framings)
    return framing, draw(frames_for(framing))


def wire(framing: Framing, frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(framing, frame.payload, frame.tpdu) for frame in frames)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    edges = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


def feed_all(buffer: FrameBuffer, chunks: list[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(buffer.feed(chunk))
    return frames


@SETTINGS
@given(framing_and_frames(), st.data())
def test_any_chunking_of_a_stream_gives_the_same_frames(
    framing_and_frames: tuple[Framing, list[Frame]], data: st.DataObject
) -> None:
    framing, frames = framing_and_frames
    stream = wire(framing, frames)
    buffer = FrameBuffer(framing)

    assert feed_all(buffer, data.draw(chunked(stream))) == frames
    assert buffer.buffered == 0


@SETTINGS
@given(framing_and_frames())
def test_one_byte_chunks_give_the_same_frames(framing_and_frames: tuple[Framing, list[Frame]]) -> None:
    framing, frames = framing_and_frames
    stream = wire(framing, frames)

    chunks = [stream[index : index + 1] for index in range(len(stream))]

    assert feed_all(FrameBuffer(framing), chunks) == frames


@SETTINGS
@given(framing_and_frames(), st.data())
def test_a_cut_stream_gives_the_complete_frames_and_keeps_the_rest(
    framing_and_frames: tuple[Framing, list[Frame]], data: st.DataObject
) -> None:
    framing, frames = framing_and_frames
    stream = wire(framing, frames)
    cut = data.draw(st.integers(0, len(stream)))
    buffer = FrameBuffer(framing)

    got = feed_all(buffer, data.draw(chunked(stream[:cut])))

    complete = 0
    while complete < len(frames) and len(wire(framing, frames[: complete + 1])) <= cut:
        complete += 1
    assert got == frames[:complete]
    assert buffer.buffered == cut - len(wire(framing, frames[:complete]))


@SETTINGS
@given(framings, st.data())
def test_an_oversized_length_is_refused_with_only_the_header_received(framing: Framing, data: st.DataObject) -> None:
    adjust = framing.header_size if framing.length_includes_header else 0
    capacity = CAPACITY[framing.header]
    limit = framing.max_frame_bytes + adjust
    if limit >= capacity:  # this header cannot even express an oversized frame
        return
    announced = data.draw(st.integers(limit + 1, capacity))
    if framing.header[1] == "b":
        header = announced.to_bytes(framing.header_size, "big")
    else:
        header = b"%0*d" % (framing.header_size, announced)
    buffer = FrameBuffer(framing)

    assert feed_all(buffer, [header[:-1]]) == []
    with pytest.raises(FramingError, match="announced, more than"):
        buffer.feed(header[-1:])


@SETTINGS
@given(framing_and_frames(), st.data())
def test_frames_before_a_fault_are_never_lost_whatever_the_chunking(
    framing_and_frames: tuple[Framing, list[Frame]], data: st.DataObject
) -> None:
    framing, frames = framing_and_frames
    stream = wire(framing, frames) + b"\x00" * framing.header_size  # a zero length
    buffer = FrameBuffer(framing)
    received: list[Frame] = []

    failed = False
    for chunk in data.draw(chunked(stream)):
        try:
            received.extend(buffer.feed(chunk))
        except FramingError as error:
            received.extend(error.frames)
            failed = True
            break

    assert failed
    assert received == frames


@SETTINGS
@given(framings, st.binary(max_size=600), st.data())
def test_random_bytes_never_raise_anything_but_a_framing_error(
    framing: Framing, noise: bytes, data: st.DataObject
) -> None:
    buffer = FrameBuffer(framing)
    for chunk in data.draw(chunked(noise)):
        try:
            frames = buffer.feed(chunk)
        except FramingError:
            return
        for frame in frames:
            assert 0 < len(frame.payload) <= framing.max_frame_bytes
            assert frame.tpdu is None or (len(frame.tpdu) == TPDU_SIZE and frame.tpdu[0] == 0x60)
