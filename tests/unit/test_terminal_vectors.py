"""Interop: the emulator's frames against frames from an independent ISO 8583 implementation.

tests/vectors/ (a copy of the project's shared vectors) holds frames produced by an
implementation that is not pyiso8583. Every frame must decode to exactly its fields, encoding those fields must give the
same bytes back, and the emulator's own request builders must produce the very same frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from terminal_emulator import messages
from terminal_emulator.codec import IsoMessage, decode_message, encode_message
from terminal_emulator.framing import FrameDecoder, frame
from terminal_emulator.messages import Stamp, Totals
from terminal_emulator.profile import load_profile

# A copy in the repository wins; the shared directory is where the vectors were delivered.
VECTOR_DIRS = (Path(__file__).resolve().parents[1] / "vectors",)
PROFILES = ("iso87-binary", "iso87-ascii")


def _vectors(profile: str) -> list[dict[str, Any]]:
    found = [d / f"{profile}.jsonl" for d in VECTOR_DIRS if (d / f"{profile}.jsonl").exists()]
    if not found:
        raise AssertionError(f"interop vectors {profile}.jsonl not found in {', '.join(map(str, VECTOR_DIRS))}")
    path = found[0]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("profile_name", PROFILES)
def test_every_vector_frame_decodes_to_exactly_its_fields(profile_name: str) -> None:
    profile = load_profile(profile_name)
    for vector in _vectors(profile_name):
        bodies = FrameDecoder(profile.framing).feed(bytes.fromhex(vector["frame_hex"]))
        assert len(bodies) == 1, vector["description"]
        message = decode_message(profile, bodies[0])
        assert message.mti == vector["mti"], vector["description"]
        assert {str(k): v for k, v in message.fields.items()} == vector["fields"], vector["description"]


@pytest.mark.parametrize("profile_name", PROFILES)
def test_encoding_a_vectors_fields_gives_back_its_bytes(profile_name: str) -> None:
    profile = load_profile(profile_name)
    for vector in _vectors(profile_name):
        message = IsoMessage(vector["mti"], {int(k): v for k, v in vector["fields"].items()})
        wire = frame(encode_message(profile, message), profile.framing)
        assert wire.hex() == vector["frame_hex"], vector["description"]


STAMP = Stamp(stan="000123", transmitted="1122103015", local_time="103015", local_date="1122")
COMMON: dict[str, Any] = {"tid": "TERM0001", "mid": "MERCHANT0000001", "pan": "4761739001010119", "currency": "840"}


def _built(description: str) -> IsoMessage | None:
    st = STAMP
    if description == "pre-authorization":
        return messages.preauth(st, amount=1234, **COMMON)
    if description == "purchase with expiry date":
        return messages.purchase(st, amount=1234, expiry="2812", **COMMON)
    if description == "void by original RRN":
        return messages.void(Stamp("000124", *_rest(st)), amount=1234, original_rrn="123456789012", **COMMON)
    if description == "refund by original RRN":
        return messages.refund(Stamp("000125", *_rest(st)), amount=500, original_rrn="123456789012", **COMMON)
    if description == "refund by original data elements":
        return messages.refund(Stamp("000126", *_rest(st)), amount=500, original=("0200", "000123", "1122103015"),
                               **COMMON)
    if description == "unreferenced refund":
        return messages.refund(Stamp("000127", *_rest(st)), amount=1234, **COMMON)
    if description == "pre-auth completion advice":
        return messages.completion(Stamp("000128", *_rest(st)), amount=1234, approval_code=None,
                                   original=("0100", "000123", "1122103015"), **COMMON)
    if description in ("reversal request", "reversal advice", "partial reversal advice"):
        stan = {"reversal request": "000129", "reversal advice": "000130"}.get(description, "000131")
        return messages.reversal(
            Stamp(stan, *_rest(st)), tid="TERM0001", mid="MERCHANT0000001", pan="4761739001010119",
            processing_code="000000", amount=1234, currency="840", original=("0200", "000123", "1122103015"),
            advice=description != "reversal request",
            partial_amount=800 if description == "partial reversal advice" else None,
        )
    if description == "batch settlement":
        return messages.settlement(
            Stamp("000132", "1122230000", "", ""), tid="TERM0001", mid="MERCHANT0000001", currency="840",
            totals=Totals(credits_count=1, credits_amount=500, debits_count=2, debits_amount=2468),
        )
    return None


def _rest(st: Stamp) -> tuple[str, str, str]:
    return (st.transmitted, st.local_time, st.local_date)


@pytest.mark.parametrize("profile_name", PROFILES)
def test_the_emulators_requests_are_byte_identical_to_the_independent_implementations(profile_name: str) -> None:
    profile = load_profile(profile_name)
    compared = 0
    for vector in _vectors(profile_name):
        built = _built(vector["description"])
        if built is None:
            continue
        compared += 1
        wire = frame(encode_message(profile, built), profile.framing)
        assert wire.hex() == vector["frame_hex"], vector["description"]
    assert compared == 11


def test_an_mti_that_is_not_four_digits_cannot_be_encoded() -> None:
    from terminal_emulator.codec import MessageEncodeError

    with pytest.raises(MessageEncodeError, match="4 digits"):
        encode_message(load_profile("iso87-binary"), IsoMessage("02X0", {3: "000000"}))


def test_a_decode_error_names_the_field_but_never_carries_the_frame() -> None:
    from terminal_emulator.codec import MessageDecodeError

    profile = load_profile("iso87-binary")
    body = encode_message(profile, IsoMessage("0200", {2: "4761739001010119", 3: "000000"}))
    with pytest.raises(MessageDecodeError) as error:
        decode_message(profile, body[:-3])
    assert "field 3" in str(error.value)
    assert "4761739001010119" not in str(error.value)
    assert error.value.__cause__ is None
    assert error.value.__suppress_context__
