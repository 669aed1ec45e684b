"""The codec turns payloads into Messages and back, checks content, and fails safely."""

from __future__ import annotations

import pytest

from gateway.protocol.codec import Codec, DecodeError, EncodeError
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile

PAN = "4761739001010119"
TRACK2 = "4761739001010119=28122011758928889"
PURCHASE = Message(
    "0200",
    {
        2: PAN,
        3: "000000",
        4: "000000001234",
        7: "1122103015",
        11: "000123",
        12: "103015",
        13: "1122",
        41: "TERM0001",
        42: "MERCHANT0000001",
        49: "840",
    },
)


@pytest.fixture(scope="module")
def binary() -> Codec:
    return Codec(load_profile("iso87-binary"))


@pytest.fixture(scope="module")
def ascii_() -> Codec:
    return Codec(load_profile("iso87-ascii"))


def with_fields(message: Message, **changes: str | None) -> Message:
    """A copy of ``message`` with fields set (``f4="..."``) or removed (``f4=None``)."""
    fields = dict(message.fields)
    for name, value in changes.items():
        number = int(name[1:])
        if value is None:
            fields.pop(number, None)
        else:
            fields[number] = value
    return Message(message.mti, fields)


def replace_once(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert payload.count(old) == 1, "test setup: the text to replace must occur once"
    return payload.replace(old, new)


# --- happy paths ---------------------------------------------------------------------------------


def test_a_purchase_encodes_and_decodes_to_the_same_message(binary: Codec) -> None:
    assert binary.decode(binary.encode(PURCHASE)) == PURCHASE


def test_decoded_fields_come_out_in_data_element_order(binary: Codec) -> None:
    shuffled = Message("0200", dict(reversed(list(PURCHASE.fields.items()))))

    assert list(binary.decode(binary.encode(shuffled)).fields) == sorted(PURCHASE.fields)


def test_fields_above_64_use_the_secondary_bitmap(binary: Codec) -> None:
    message = Message("0800", {7: "1122103015", 11: "000001", 70: "301"})
    payload = binary.encode(message)

    assert payload[4] & 0x80  # bit 1: a secondary bitmap follows
    assert binary.decode(payload) == message


def test_binary_fields_come_out_as_upper_case_hex(binary: Codec) -> None:
    payload = binary.encode(with_fields(PURCHASE, f52="0123456789abcdef", f55="9f0206000000001234"))

    decoded = binary.decode(payload)

    assert decoded.fields[52] == "0123456789ABCDEF"
    assert decoded.fields[55] == "9F0206000000001234"
    assert bytes.fromhex("0123456789abcdef") in payload


def test_the_ascii_profile_carries_binary_fields_as_hex_text(ascii_: Codec) -> None:
    payload = ascii_.encode(with_fields(PURCHASE, f52="0123456789ABCDEF"))

    assert b"0123456789ABCDEF" in payload
    assert ascii_.decode(payload).fields[52] == "0123456789ABCDEF"


def test_track_2_data_with_a_separator_decodes(binary: Codec) -> None:
    message = with_fields(PURCHASE, f2=None, f35=TRACK2)

    assert binary.decode(binary.encode(message)) == message


def test_an_empty_variable_field_round_trips(binary: Codec) -> None:
    message = with_fields(PURCHASE, f44="")

    assert binary.decode(binary.encode(message)) == message


def test_the_codec_exposes_its_profile() -> None:
    profile = load_profile("iso87-ascii")

    assert Codec(profile).profile is profile


# --- decode errors -------------------------------------------------------------------------------


def test_a_non_numeric_amount_names_mti_and_field_and_keeps_the_other_fields(binary: Codec) -> None:
    payload = replace_once(binary.encode(PURCHASE), b"000000001234", b"00000000123X")

    with pytest.raises(DecodeError) as caught:
        binary.decode(payload)

    error = caught.value
    assert (error.mti, error.field) == ("0200", 4)
    assert error.position == payload.index(b"00000000123X")
    assert error.partial == with_fields(PURCHASE, f4=None)
    assert str(error) == f"cannot decode 0200: field 4 at byte {error.position}: content 'n' expected (digits only)"


def test_a_truncated_message_keeps_the_fields_before_the_cut(binary: Codec) -> None:
    payload = binary.encode(PURCHASE)
    cut = payload.index(b"TERM0001") + 4

    with pytest.raises(DecodeError) as caught:
        binary.decode(payload[:cut])

    error = caught.value
    assert (error.mti, error.field) == ("0200", 41)
    assert error.position == cut - 4
    assert error.partial is not None
    assert set(error.partial.fields) == {2, 3, 4, 7, 11, 12, 13}
    assert "field data is 4 bytes, expecting 8" in error.reason


def test_an_unreadable_message_type_leaves_mti_and_partial_empty(binary: Codec) -> None:
    with pytest.raises(DecodeError) as caught:
        binary.decode(b"\xff\xfe" + binary.encode(PURCHASE)[2:])

    assert caught.value.mti is None
    assert caught.value.partial is None
    assert "message type" in str(caught.value)


def test_a_message_type_that_is_not_four_digits_is_refused(binary: Codec) -> None:
    with pytest.raises(DecodeError) as caught:
        binary.decode(b"02A0" + binary.encode(PURCHASE)[4:])

    assert caught.value.mti is None
    assert caught.value.reason == "message type is not 4 digits"


def test_extra_bytes_after_the_last_field_are_refused_with_all_fields_kept(binary: Codec) -> None:
    payload = binary.encode(PURCHASE) + b"junk"

    with pytest.raises(DecodeError) as caught:
        binary.decode(payload)

    assert caught.value.reason == "extra data after the last field"
    assert caught.value.field is None
    assert caught.value.position == len(payload) - 4
    assert caught.value.partial == PURCHASE


def test_a_tertiary_bitmap_is_refused_as_bit_65(binary: Codec) -> None:
    payload = bytearray(binary.encode(Message("0800", {11: "000001", 70: "301"})))
    payload[12] |= 0x80  # bit 65, first bit of the secondary bitmap
    payload[20:20] = bytes(8)  # an empty tertiary bitmap after it

    with pytest.raises(DecodeError) as caught:
        binary.decode(bytes(payload))

    assert caught.value.field == 65
    assert "tertiary bitmap" in caught.value.reason


def test_a_field_beyond_128_is_refused_as_bit_65(binary: Codec) -> None:
    payload = bytearray(binary.encode(Message("0800", {11: "000001", 70: "301"})))
    payload[12] |= 0x80
    payload[20:20] = b"\x80" + bytes(7)  # field 129

    with pytest.raises(DecodeError) as caught:
        binary.decode(bytes(payload))

    assert caught.value.field == 65
    assert caught.value.mti == "0800"


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        (39, "Q7", "Q!"),  # an: no punctuation
        (43, "SHOP ONE" + " " * 32, "SHOP\x01ONE" + " " * 32),  # ans: printable only
        (35, TRACK2, TRACK2.replace("=", "X")),  # z: digits, '=' or 'D'
        (49, "978", "EUR"),  # n: ISO 4217 numeric
    ],
    ids=["an", "ans", "z", "n"],
)
def test_each_content_class_is_enforced_on_decode(binary: Codec, field: int, good: str, bad: str) -> None:
    payload = binary.encode(with_fields(PURCHASE, **{f"f{field}": good}))
    payload = replace_once(payload, good.encode(), bad.encode())

    with pytest.raises(DecodeError) as caught:
        binary.decode(payload)

    assert caught.value.field == field
    partial = caught.value.partial
    assert partial is not None
    assert field not in partial.fields
    assert partial.fields[11] == "000123"


def test_hex_text_fields_of_the_ascii_profile_must_be_hex(ascii_: Codec) -> None:
    payload = replace_once(ascii_.encode(with_fields(PURCHASE, f52="0123456789ABCDEF")), b"ABCDEF", b"ABCDEG")

    with pytest.raises(DecodeError) as caught:
        ascii_.decode(payload)

    assert caught.value.field == 52


def test_hex_text_of_odd_length_is_refused(ascii_: Codec) -> None:
    payload = replace_once(ascii_.encode(with_fields(PURCHASE, f55="9F02")), b"0049F02", b"0039F0")

    with pytest.raises(DecodeError) as caught:
        ascii_.decode(payload)

    assert caught.value.field == 55
    assert "even number" in caught.value.reason


def test_a_decode_error_never_shows_card_data_and_hides_pyiso8583s_exception(binary: Codec) -> None:
    payload = binary.encode(with_fields(PURCHASE, f35=TRACK2))
    cut = payload[: payload.index(TRACK2.encode()) + 10]

    with pytest.raises(DecodeError) as caught:
        binary.decode(cut)

    error = caught.value
    assert error.field == 35
    assert error.__cause__ is None
    assert error.__context__ is None
    for secret in (PAN, TRACK2[:10], PAN[6:12]):
        assert secret not in str(error)
        assert secret not in repr(error)
        assert secret not in repr(error.partial)
        assert secret not in repr(error.args)


@pytest.mark.parametrize("payload", [b"", b"0", b"0200", b"\x00" * 12, bytes(range(256))], ids=repr)
def test_garbage_raises_only_a_decode_error(binary: Codec, ascii_: Codec, payload: bytes) -> None:
    for codec in (binary, ascii_):
        with pytest.raises(DecodeError):
            codec.decode(payload)


def test_a_payload_that_is_not_bytes_raises_a_decode_error(binary: Codec) -> None:
    with pytest.raises(DecodeError, match="malformed message"):
        binary.decode("0200")  # type: ignore[arg-type]


# --- encode errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [0, 1, 65, 129, -4])
def test_encoding_a_field_the_profile_does_not_define_is_refused(binary: Codec, number: int) -> None:
    with pytest.raises(EncodeError) as caught:
        binary.encode(Message("0200", {**PURCHASE.fields, number: "1"}))

    assert caught.value.field == number
    assert "not a data element of profile iso87-binary" in str(caught.value)


def test_encoding_bad_content_names_the_field_but_not_the_value(binary: Codec) -> None:
    bad_pan = "4761739001O10119"

    with pytest.raises(EncodeError) as caught:
        binary.encode(with_fields(PURCHASE, f2=bad_pan))

    assert caught.value.field == 2
    assert caught.value.mti == "0200"
    assert bad_pan not in str(caught.value)
    assert str(caught.value) == "cannot encode 0200: field 2: content 'n' expected (digits only)"


def test_encoding_a_fixed_field_of_the_wrong_length_is_refused(binary: Codec) -> None:
    with pytest.raises(EncodeError) as caught:
        binary.encode(with_fields(PURCHASE, f4="1234"))

    assert caught.value.field == 4
    assert "expecting 12" in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_encoding_a_variable_field_over_its_maximum_is_refused(binary: Codec) -> None:
    with pytest.raises(EncodeError, match=r"field 2: .*larger than maximum 19"):
        binary.encode(with_fields(PURCHASE, f2="4" * 20))


def test_encoding_odd_length_hex_is_refused(binary: Codec, ascii_: Codec) -> None:
    for codec in (binary, ascii_):
        with pytest.raises(EncodeError) as caught:
            codec.encode(with_fields(PURCHASE, f55="9F0"))
        assert caught.value.field == 55


@pytest.mark.parametrize("mti", ["200", "02000", "02A0", ""])
def test_encoding_a_message_type_that_is_not_four_digits_is_refused(binary: Codec, mti: str) -> None:
    with pytest.raises(EncodeError, match="message type must be 4 digits"):
        binary.encode(Message(mti, PURCHASE.fields))


def test_encoding_a_value_that_is_not_text_is_refused(binary: Codec) -> None:
    with pytest.raises(EncodeError, match="value must be text, not int"):
        binary.encode(Message("0200", {**PURCHASE.fields, 4: 1234}))  # type: ignore[dict-item]
