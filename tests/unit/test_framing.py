"""Length-header framing: FrameBuffer cuts a byte stream into frames, encode_frame builds them."""

from __future__ import annotations

import pytest

from gateway.protocol.framing import Frame, FrameBuffer, FramingError, encode_frame, reply_tpdu
from gateway.protocol.profile import Framing

TPDU = bytes.fromhex("6000120034")
PAN = b"4761739001010119"


@pytest.mark.parametrize(
    ("framing", "expected"),
    [
        (Framing("2b"), b"\x00\x05hello"),
        (Framing("4b"), b"\x00\x00\x00\x05hello"),
        (Framing("2a"), b"05hello"),
        (Framing("4a"), b"0005hello"),
        (Framing("2b", length_includes_header=True), b"\x00\x07hello"),
        (Framing("4a", length_includes_header=True), b"0009hello"),
    ],
    ids=["2b", "4b", "2a", "4a", "2b counting itself", "4a counting itself"],
)
def test_encode_frame_writes_the_length_header_of_each_kind(framing: Framing, expected: bytes) -> None:
    assert encode_frame(framing, b"hello") == expected


def test_encode_frame_puts_the_tpdu_between_length_and_message_and_counts_it() -> None:
    assert encode_frame(Framing("2b", tpdu=True), b"hello", TPDU) == b"\x00\x0a" + TPDU + b"hello"


@pytest.mark.parametrize(
    "framing",
    [Framing("2b"), Framing("4b"), Framing("2a"), Framing("4a"), Framing("2b", length_includes_header=True)],
    ids=["2b", "4b", "2a", "4a", "2b counting itself"],
)
def test_a_frame_written_by_encode_frame_is_read_back_by_the_buffer(framing: Framing) -> None:
    buffer = FrameBuffer(framing)

    assert buffer.feed(encode_frame(framing, b"0800 payload")) == [Frame(b"0800 payload")]
    assert buffer.buffered == 0


def test_a_tpdu_frame_comes_out_with_its_tpdu_apart_from_the_payload() -> None:
    framing = Framing("2b", tpdu=True)

    frames = FrameBuffer(framing).feed(encode_frame(framing, b"payload", TPDU))

    assert frames == [Frame(b"payload", TPDU)]


def test_a_partial_frame_is_kept_until_the_rest_arrives() -> None:
    buffer = FrameBuffer(Framing("2b"))
    wire = encode_frame(Framing("2b"), b"hello world")

    assert buffer.feed(wire[:1]) == []
    assert buffer.feed(wire[1:6]) == []
    assert buffer.buffered == 6
    assert buffer.feed(wire[6:]) == [Frame(b"hello world")]
    assert buffer.buffered == 0


def test_several_frames_in_one_chunk_come_out_in_order_with_the_remainder_kept() -> None:
    framing = Framing("4a")
    wire = encode_frame(framing, b"one") + encode_frame(framing, b"two") + encode_frame(framing, b"three")
    buffer = FrameBuffer(framing)

    assert buffer.feed(wire[:-2]) == [Frame(b"one"), Frame(b"two")]
    assert buffer.buffered == len(encode_frame(framing, b"three")) - 2
    assert buffer.feed(wire[-2:]) == [Frame(b"three")]


def test_an_oversized_length_is_refused_as_soon_as_the_header_is_complete() -> None:
    buffer = FrameBuffer(Framing("2b", max_frame_bytes=100))

    assert buffer.feed(b"\x00") == []
    with pytest.raises(FramingError, match="101 bytes announced, more than the 100 allowed"):
        buffer.feed(b"\x65")


def test_the_largest_allowed_frame_is_accepted() -> None:
    framing = Framing("2b", max_frame_bytes=100)

    assert FrameBuffer(framing).feed(encode_frame(framing, b"x" * 100)) == [Frame(b"x" * 100)]


def test_the_limit_counts_the_tpdu_but_not_the_length_header() -> None:
    framing = Framing("2b", length_includes_header=True, tpdu=True, max_frame_bytes=10)
    buffer = FrameBuffer(framing)

    assert buffer.feed(b"\x00\x0c" + TPDU + b"12345") == [Frame(b"12345", TPDU)]
    with pytest.raises(FramingError, match="11 bytes announced"):
        buffer.feed(b"\x00\x0d")


def test_a_non_digit_ascii_length_is_refused_without_quoting_the_bytes() -> None:
    buffer = FrameBuffer(Framing("4a"))

    with pytest.raises(FramingError) as caught:
        buffer.feed(b"47a1739001010119")

    assert str(caught.value) == "length header is not 4 ASCII digits"
    assert "47a1" not in str(caught.value)


def test_a_zero_length_is_refused() -> None:
    with pytest.raises(FramingError, match="zero length"):
        FrameBuffer(Framing("2b")).feed(b"\x00\x00")


def test_a_length_counting_itself_must_leave_room_for_a_message() -> None:
    with pytest.raises(FramingError, match="length 2 leaves no room for a message"):
        FrameBuffer(Framing("2b", length_includes_header=True)).feed(b"\x00\x02")


def test_a_tpdu_frame_must_be_longer_than_its_tpdu() -> None:
    with pytest.raises(FramingError, match="no room for a TPDU and message"):
        FrameBuffer(Framing("2b", tpdu=True)).feed(b"\x00\x05" + TPDU)


def test_a_tpdu_with_a_bad_id_is_refused() -> None:
    with pytest.raises(FramingError, match="bad TPDU id 0x61"):
        FrameBuffer(Framing("2b", tpdu=True)).feed(b"\x00\x06\x61\x00\x00\x00\x00x")


def test_frames_before_a_fault_in_the_same_chunk_travel_with_the_error() -> None:
    framing = Framing("2b", max_frame_bytes=50)
    wire = encode_frame(framing, b"first") + encode_frame(framing, b"second") + b"\xff\xff"

    with pytest.raises(FramingError) as caught:
        FrameBuffer(framing).feed(wire)

    assert caught.value.frames == [Frame(b"first"), Frame(b"second")]


def test_a_buffer_stays_broken_after_a_framing_error() -> None:
    buffer = FrameBuffer(Framing("2b"))
    with pytest.raises(FramingError):
        buffer.feed(b"\x00\x00")

    with pytest.raises(FramingError, match="unusable after an earlier error"):
        buffer.feed(encode_frame(Framing("2b"), b"hello"))
    assert buffer.buffered == 0


def test_reply_tpdu_swaps_destination_and_source() -> None:
    assert reply_tpdu(bytes.fromhex("6000120034")) == bytes.fromhex("6000340012")


@pytest.mark.parametrize("tpdu", [b"\x60\x00\x01\x00", bytes.fromhex("7000120034")], ids=["short", "bad id"])
def test_reply_tpdu_refuses_something_that_is_not_a_tpdu(tpdu: bytes) -> None:
    with pytest.raises(FramingError):
        reply_tpdu(tpdu)


def test_encode_frame_refuses_a_message_over_the_limit() -> None:
    with pytest.raises(FramingError, match="101 bytes is more than the 100 allowed"):
        encode_frame(Framing("2b", max_frame_bytes=100), b"x" * 101)


def test_encode_frame_refuses_a_length_the_header_cannot_hold() -> None:
    with pytest.raises(FramingError, match="length 100 does not fit a '2a' header"):
        encode_frame(Framing("2a"), b"x" * 100)


def test_encode_frame_needs_a_tpdu_exactly_when_the_framing_has_one() -> None:
    with pytest.raises(FramingError, match="needs a TPDU"):
        encode_frame(Framing("2b", tpdu=True), b"hello")
    with pytest.raises(FramingError, match="has no TPDU"):
        encode_frame(Framing("2b"), b"hello", TPDU)


def test_encode_frame_refuses_an_empty_message() -> None:
    with pytest.raises(FramingError, match="empty"):
        encode_frame(Framing("2b"), b"")


def test_a_frame_repr_shows_the_size_but_never_the_card_data() -> None:
    frame = Frame(b"0200" + PAN, TPDU)

    assert repr(frame) == "Frame(<20 bytes>, tpdu='6000120034')"
    assert PAN.decode() not in repr(frame)
