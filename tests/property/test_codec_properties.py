"""Properties of the codec over generated messages and random bytes, for every shipped profile."""

from __future__ import annotations

import string
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.codec import Codec, DecodeError, EncodeError
from gateway.protocol.message import Message
from gateway.protocol.profile import FieldDef, Profile, load_profile

PROFILES = ["iso87-binary", "iso87-ascii", "cup-pos"]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEX_UPPER = "0123456789ABCDEF"
ALPHABETS = {
    "n": string.digits,
    "an": string.digits + string.ascii_letters + " ",
    "ans": "".join(chr(c) for c in range(0x20, 0x7F)),
    "z": string.digits + "=D",
}


@cache
def codec_for(name: str) -> Codec:
    return Codec(load_profile(name))


def value_of(profile: Profile, field: FieldDef) -> st.SearchStrategy[str]:
    """Valid text for one data element: its content class, its length rules."""
    spec = profile.iso_spec[str(field.number)]
    if field.content == "b":
        # Binary data decodes to upper-case hex; hex *text* (ascii profile) keeps its case.
        alphabet = HEX_UPPER if spec["data_enc"] == "b" else HEX_UPPER + "abcdef"
    elif field.content == "z" and spec["data_enc"] == "b":
        alphabet = string.digits + "D"  # packed BCD track data: the separator is the nibble D
    else:
        alphabet = ALPHABETS[field.content]
    if not field.variable:
        sizes: st.SearchStrategy[int] = st.just(field.max_len)
    else:
        sizes = st.one_of(st.integers(0, min(field.max_len, 40)), st.just(field.max_len))
    if field.even_length:
        sizes = sizes.map(lambda n: n - n % 2)
    return sizes.flatmap(lambda n: st.text(alphabet, min_size=n, max_size=n))


@st.composite
def messages(draw: st.DrawFn, profile: Profile, max_fields: int = 12) -> Message:
    mti = draw(st.text(string.digits, min_size=4, max_size=4))
    numbers = draw(st.sets(st.sampled_from(sorted(profile.fields)), max_size=max_fields))
    fields = {number: draw(value_of(profile, profile.fields[number])) for number in sorted(numbers)}
    return Message(mti, fields)


def decode_error(codec: Codec, payload: bytes) -> DecodeError | None:
    """The DecodeError raised for ``payload``, or None when it decodes. Any other exception escapes."""
    try:
        codec.decode(payload)
    except DecodeError as error:
        return error
    return None


@st.composite
def profile_and_message(draw: st.DrawFn) -> tuple[Codec, Message]:
    codec = codec_for(draw(st.sampled_from(PROFILES)))
    return codec, draw(messages(codec.profile))


@pytest.mark.parametrize("name", PROFILES)
def test_decoding_an_encoded_valid_message_gives_it_back_and_encoding_it_again_the_same_bytes(
    name: str,
) -> None:
    codec = codec_for(name)

    @SETTINGS
    @given(messages(codec.profile))
    def round_trip(message: Message) -> None:
        payload = codec.encode(message)
        decoded = codec.decode(payload)
        assert decoded == message
        assert codec.encode(decoded) == payload

    round_trip()


@SETTINGS
@given(st.sampled_from(PROFILES), st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_a_decode_error(name: str, payload: bytes) -> None:
    decode_error(codec_for(name), payload)


@SETTINGS
@given(profile_and_message(), st.data())
def test_a_damaged_message_decodes_or_raises_a_decode_error_whose_partial_can_be_answered(
    codec_and_message: tuple[Codec, Message], data: st.DataObject
) -> None:
    codec, message = codec_and_message
    payload = bytearray(codec.encode(message))
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        where = data.draw(st.integers(0, len(payload)))
        if action == "flip" and where < len(payload):
            payload[where] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del payload[where:]
        else:
            payload[where:where] = data.draw(st.binary(min_size=1, max_size=4))
    error = decode_error(codec, bytes(payload))
    if error is not None and error.partial is not None:
        # Everything kept in the partial message is valid: a format-error answer can echo it.
        codec.encode(error.partial)
        assert error.mti == error.partial.mti


@SETTINGS
@given(profile_and_message(), st.data())
def test_a_truncated_message_raises_a_decode_error_that_never_shows_the_pan(
    codec_and_message: tuple[Codec, Message], data: st.DataObject
) -> None:
    codec, message = codec_and_message
    message = Message(message.mti, {**message.fields, 2: "4761739001010119"})
    payload = codec.encode(message)
    cut = data.draw(st.integers(0, len(payload) - 1))
    error = decode_error(codec, payload[:cut])

    assert error is not None, "a truncated message never decodes"
    assert "4761739001010119"[:8] not in str(error)
    assert "4761739001010119"[-8:] not in str(error)
    assert error.__cause__ is None
    assert error.__context__ is None


field_numbers = st.one_of(st.integers(-2, 200), st.sampled_from([1, 65, 129]))
any_text = st.text(max_size=30)


@SETTINGS
@given(
    st.sampled_from(PROFILES),
    st.one_of(st.text(max_size=6), st.text(string.digits, min_size=4, max_size=4)),
    st.dictionaries(field_numbers, any_text, max_size=8),
)
def test_encoding_any_message_succeeds_or_raises_an_encode_error(name: str, mti: str, fields: dict[int, str]) -> None:
    codec = codec_for(name)
    try:
        payload = codec.encode(Message(mti, fields))
    except EncodeError:
        return
    # What was accepted is valid: it decodes to the same fields (binary hex comes back upper-case).
    decoded = codec.decode(payload)
    assert decoded.mti == mti
    assert {k: v.upper() for k, v in decoded.fields.items()} == {k: v.upper() for k, v in fields.items()}


@pytest.mark.parametrize("name", PROFILES)
@SETTINGS
@given(data=st.data())
def test_encoding_a_checked_message_gives_the_same_bytes_as_the_full_checks(name: str, data: st.DataObject) -> None:
    codec = codec_for(name)
    message = data.draw(messages(codec.profile))
    try:
        expected: bytes | type[EncodeError] = codec.encode(message)
    except EncodeError:
        expected = EncodeError
    if expected is EncodeError:
        with pytest.raises(EncodeError):
            codec.encode(message, checked=True)
    else:
        assert codec.encode(message, checked=True) == expected


def test_a_checked_message_with_a_field_outside_the_profile_still_fails_clearly() -> None:
    codec = codec_for("iso87-binary")
    with pytest.raises(EncodeError, match="not a data element"):
        codec.encode(Message("0210", {11: "000001", 999: "x"}), checked=True)


#: text that hits the edges of every class: ASCII controls, DEL, Latin-1 and other Unicode digits,
#: letters and spaces
_EDGY = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0, max_codepoint=0x7F),
        st.sampled_from("\u00a0\u00b2\u0660\u0966\uff10\u00e9\u00df\u2028\u3000"),
        st.characters(),
    ),
    max_size=12,
)


@pytest.mark.parametrize("content", [*sorted(ALPHABETS), "b"])
@pytest.mark.parametrize("even_length", [False, True])
@SETTINGS
@given(value=_EDGY)
def test_the_fast_content_checks_answer_exactly_as_the_regular_expressions(
    content: str, even_length: bool, value: str
) -> None:
    from gateway.protocol.codec import _checker, _pattern_check

    field = FieldDef(number=2, content=content, max_len=12, variable=True, desc="test", even_length=even_length)
    assert _checker(field)(value) is _pattern_check(content, even_length)(value)
