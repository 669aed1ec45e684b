"""Interop frames from an independent ISO 8583 implementation (see the README next to them).

Every frame must decode (framing, then codec) to exactly its fields with the matching profile, and
encoding those fields must give back the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.protocol.codec import Codec, DecodeError
from gateway.protocol.framing import Frame, FrameBuffer, FramingError, encode_frame, reply_tpdu
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile

#: Frames from an independent ISO 8583 implementation (a copy of the project's shared vectors).
VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
PROFILES = ["iso87-binary", "iso87-ascii"]


@dataclass(frozen=True)
class Vector:
    profile: str
    description: str
    message: Message
    frame: bytes


def load_vectors(profile: str) -> list[Vector]:
    vectors = []
    for line in (VECTORS_DIR / f"{profile}.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            fields = {int(number): value for number, value in raw["fields"].items()}
            vectors.append(
                Vector(profile, raw["description"], Message(raw["mti"], fields), bytes.fromhex(raw["frame_hex"]))
            )
    return vectors


ALL = [vector for profile in PROFILES for vector in load_vectors(profile)]


def test_each_vector_file_holds_the_twenty_messages_of_its_readme() -> None:
    for profile in PROFILES:
        assert len(load_vectors(profile)) == 20


@pytest.mark.parametrize("vector", ALL, ids=[f"{v.profile}: {v.description}" for v in ALL])
def test_a_vector_frame_decodes_to_exactly_its_fields(vector: Vector) -> None:
    profile = load_profile(vector.profile)

    frames = FrameBuffer(profile.framing).feed(vector.frame)

    assert len(frames) == 1
    assert frames[0].tpdu is None
    assert Codec(profile).decode(frames[0].payload) == vector.message


@pytest.mark.parametrize("vector", ALL, ids=[f"{v.profile}: {v.description}" for v in ALL])
def test_encoding_a_vectors_fields_gives_back_its_frame_bytes(vector: Vector) -> None:
    profile = load_profile(vector.profile)

    payload = Codec(profile).encode(vector.message)

    assert encode_frame(profile.framing, payload) == vector.frame


@pytest.mark.parametrize("profile_name", PROFILES)
def test_all_vectors_as_one_stream_in_one_byte_chunks_give_every_message_in_order(profile_name: str) -> None:
    profile = load_profile(profile_name)
    vectors = load_vectors(profile_name)
    stream = b"".join(vector.frame for vector in vectors)
    buffer = FrameBuffer(profile.framing)

    frames: list[Frame] = []
    for index in range(len(stream)):
        frames.extend(buffer.feed(stream[index : index + 1]))

    codec = Codec(profile)
    assert [codec.decode(frame.payload) for frame in frames] == [vector.message for vector in vectors]
    assert buffer.buffered == 0


def test_a_binary_profile_frame_is_not_an_ascii_profile_frame() -> None:
    """The profiles really differ: a frame only decodes with its own profile."""
    binary_frame = load_vectors("iso87-binary")[3].frame
    ascii_profile = load_profile("iso87-ascii")

    with pytest.raises(FramingError, match="length header is not 4 ASCII digits"):
        FrameBuffer(ascii_profile.framing).feed(binary_frame)


# --- cup-pos: frames assembled by hand, byte by byte, from the UnionPay POS layout -----------------
# No interop file exists for this profile, so these bytes are written out from the layout itself
# (docs/profiles.md), not produced by pyiso8583.

CUP_TPDU = bytes.fromhex("6000030000")  # id 60, destination 0003, source 0000
CUP_HEADER = bytes.fromhex("603100000000")  # application header the profile sends
CUP_PURCHASE_BODY = b"".join(
    [
        bytes.fromhex("0200"),  # MTI, 2 BCD bytes
        bytes.fromhex("702404C020C08011"),  # bitmap: 2 3 4 11 14 22 25 26 35 41 42 49 60 64
        bytes.fromhex("19") + bytes.fromhex("62284804025648900180"),  # 2: LL=19 digits, left-aligned, pad 0
        bytes.fromhex("000000"),  # 3: processing code
        bytes.fromhex("000000001234"),  # 4: amount 12.34
        bytes.fromhex("000123"),  # 11: trace
        bytes.fromhex("2812"),  # 14: expiry YYMM
        bytes.fromhex("0210"),  # 22: entry mode 021, left-aligned
        bytes.fromhex("00"),  # 25: condition code
        bytes.fromhex("12"),  # 26: PIN capture code
        bytes.fromhex("37") + bytes.fromhex("6228480402564890018D281220117589288890"),  # 35: LL=37, D separator
        b"TERM0001",  # 41: terminal id, ASCII
        b"MERCHANT0000001",  # 42: merchant id, ASCII
        b"156",  # 49: currency, ASCII
        bytes.fromhex("0011") + bytes.fromhex("220000010000"),  # 60: LLL=11 digits: 22 + batch 000001 + 000
        bytes.fromhex("0102030405060708"),  # 64: MAC
    ]
)
CUP_PURCHASE = Message(
    "0200",
    {
        2: "6228480402564890018",
        3: "000000",
        4: "000000001234",
        11: "000123",
        14: "2812",
        22: "021",
        25: "00",
        26: "12",
        35: "6228480402564890018D28122011758928889",
        41: "TERM0001",
        42: "MERCHANT0000001",
        49: "156",
        60: "22000001000",
        64: "0102030405060708",
    },
)


def cup_frame(body: bytes) -> bytes:
    rest = CUP_TPDU + CUP_HEADER + body
    return len(rest).to_bytes(2, "big") + rest


def test_a_hand_assembled_cup_purchase_decodes_to_its_fields() -> None:
    profile = load_profile("cup-pos")

    frames = FrameBuffer(profile.framing).feed(cup_frame(CUP_PURCHASE_BODY))

    assert frames == [Frame(CUP_HEADER + CUP_PURCHASE_BODY, CUP_TPDU)]
    assert Codec(profile).decode(frames[0].payload) == CUP_PURCHASE


def test_encoding_the_cup_purchase_fields_gives_back_the_hand_assembled_bytes() -> None:
    profile = load_profile("cup-pos")

    payload = Codec(profile).encode(CUP_PURCHASE)

    assert encode_frame(profile.framing, payload, CUP_TPDU) == cup_frame(CUP_PURCHASE_BODY)


def test_a_cup_reply_swaps_the_tpdu_addresses_and_carries_the_profile_header() -> None:
    profile = load_profile("cup-pos")
    response = Message("0210", {3: "000000", 4: "000000001234", 11: "000123", 39: "00", 41: "TERM0001"})

    wire = encode_frame(profile.framing, Codec(profile).encode(response), reply_tpdu(CUP_TPDU))

    assert wire[2:7] == bytes.fromhex("6000000003")
    assert wire[7:13] == CUP_HEADER
    assert wire[13:15] == bytes.fromhex("0210")
    assert Codec(profile).decode(FrameBuffer(profile.framing).feed(wire)[0].payload) == response


def test_a_cup_header_from_a_terminal_is_read_whatever_its_processing_requirement() -> None:
    profile = load_profile("cup-pos")
    other_header = bytes.fromhex("602200300000")

    decoded = Codec(profile).decode(other_header + CUP_PURCHASE_BODY)

    assert decoded == CUP_PURCHASE


def test_a_cup_amount_that_is_not_bcd_digits_is_a_decode_error_naming_field_4() -> None:
    profile = load_profile("cup-pos")
    body = CUP_PURCHASE_BODY.replace(bytes.fromhex("000000001234"), bytes.fromhex("0000000012AB"), 1)

    with pytest.raises(DecodeError) as caught:
        Codec(profile).decode(CUP_HEADER + body)

    assert (caught.value.mti, caught.value.field) == ("0200", 4)
    assert caught.value.partial is not None
    assert caught.value.partial.fields[41] == "TERM0001"


# --- cup-pos: eleven frames from the independent encoder (shared/vectors/cup-pos.jsonl) -------------

CUP = load_vectors("cup-pos")
#: the TPDU every shared cup-pos frame carries: 0x60, destination 0003, source 0000
SHARED_CUP_TPDU = bytes.fromhex("6000030000")


def test_the_cup_vector_file_holds_the_eleven_messages_of_its_readme() -> None:
    assert len(CUP) == 11


@pytest.mark.parametrize("vector", CUP, ids=[v.description for v in CUP])
def test_a_shared_cup_frame_decodes_to_exactly_its_fields_and_encodes_back(vector: Vector) -> None:
    profile = load_profile("cup-pos")

    (frame,) = FrameBuffer(profile.framing).feed(vector.frame)

    assert frame.tpdu == SHARED_CUP_TPDU
    assert Codec(profile).decode(frame.payload) == vector.message
    assert encode_frame(profile.framing, Codec(profile).encode(vector.message), SHARED_CUP_TPDU) == vector.frame
