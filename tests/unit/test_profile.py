"""Wire profiles load from specs/ and a broken one fails at load time with a useful message."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from iso8583 import specs as iso_specs

from gateway.protocol.profile import (
    SPECS_DIR,
    STANDARD_REASONS,
    FieldDef,
    Framing,
    Profile,
    ProfileError,
    load_profile,
)

ISO87 = ["iso87-binary", "iso87-ascii"]
SHIPPED = [*ISO87, "cup-pos"]
BASE = SPECS_DIR / "iso87-binary.toml"
CUP = SPECS_DIR / "cup-pos.toml"


def broken_copy(tmp_path: Path, old: str, new: str, *, base: Path = BASE) -> Path:
    """A copy of a shipped profile with one piece of text replaced (the text must be there)."""
    text = base.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in {base.name}"
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def field_line(number: int, *, base: Path = BASE) -> str:
    for line in base.read_text(encoding="utf-8").splitlines():
        if re.match(rf"{number}\s+= \{{", line):
            return line
    raise AssertionError(f"no line for field {number}")


# --- the shipped profiles ------------------------------------------------------------------------


def test_the_specs_folder_holds_exactly_the_three_shipped_profiles() -> None:
    assert sorted(path.stem for path in SPECS_DIR.glob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", ISO87)
def test_each_iso87_profile_loads_by_name_with_every_data_element_but_65(name: str) -> None:
    profile = load_profile(name)

    assert profile.name == name
    assert profile.dialect == "iso87"
    assert profile.source == SPECS_DIR / f"{name}.toml"
    assert sorted(profile.fields) == [n for n in range(2, 129) if n != 65]
    assert all(isinstance(f, FieldDef) and f.number == n for n, f in profile.fields.items())


@pytest.mark.parametrize(
    ("name", "pyiso_spec"), [("iso87-binary", iso_specs.default), ("iso87-ascii", iso_specs.default_ascii)]
)
def test_the_iso87_field_layouts_are_exactly_pyiso8583s_specs(
    name: str, pyiso_spec: dict[str, dict[str, object]]
) -> None:
    profile = load_profile(name)

    expected = {key: value for key, value in pyiso_spec.items() if key != "65"}
    assert {key: dict(value) for key, value in profile.iso_spec.items()} == expected


def test_the_binary_profile_frames_with_a_two_byte_binary_length_and_no_tpdu() -> None:
    assert load_profile("iso87-binary").framing == Framing("2b", False, False, 8192)


def test_the_ascii_profile_frames_with_four_ascii_digits_and_no_tpdu() -> None:
    assert load_profile("iso87-ascii").framing == Framing("4a", False, False, 8192)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_profile_maps_every_standard_reason_to_a_response_code(name: str) -> None:
    profile = load_profile(name)

    assert set(profile.response_codes) >= STANDARD_REASONS
    assert all(re.fullmatch(r"[0-9A-Z]{2}", code) for code in profile.response_codes.values())


@pytest.mark.parametrize("name", ISO87)
def test_the_response_codes_are_those_of_the_design(name: str) -> None:
    profile = load_profile(name)
    expected = {
        "approved": "00",
        "original_not_found": "25",
        "original_not_approved": "12",
        "batch_settled": "12",
        "pan_mismatch": "14",
        "amount_mismatch": "64",
        "unreferenced_refund_disabled": "58",
        "invalid_amount": "13",
        "exceeds_refundable": "64",
        "refund_velocity_count": "65",
        "refund_velocity_amount": "61",
        "over_limit": "61",
        "luhn_failed": "14",
        "expired_card": "54",
        "reversed_before_arrival": "12",
        "already_completed": "12",
        "preauth_expired": "12",
        "duplicate_conflict": "94",
        "settlement_mismatch": "95",
        "unknown_message": "12",
        "unsupported_message": "12",
        "not_completable": "12",
        "reversal_unmatched": "25",
        "terminal_not_allowed": "58",
        "format_error": "30",
        "system_error": "96",
    }

    assert {reason: profile.response_code(reason) for reason in expected} == expected


#: where the cup dialect answers otherwise than iso87 (UnionPay practice, issue 25; docs/rules.md)
CUP_OWN_CODES = {
    "refund_window_expired": "22",
    "unknown_message": "40",
    "unsupported_message": "40",
    "terminal_not_allowed": "97",
    "settlement_mismatch": "00",  # the result digit in DE48 says "not balanced"
    "upstream_timeout": "98",  # UnionPay's "no answer from the host"
}


def test_the_cup_codes_are_the_iso87_codes_but_for_unionpays_own() -> None:
    cup = load_profile("cup-pos").response_codes
    iso87 = load_profile("iso87-binary").response_codes

    assert set(cup) == set(iso87)
    assert {reason: code for reason, code in cup.items() if iso87[reason] != code} == CUP_OWN_CODES


def test_an_unknown_reason_gets_the_system_error_code() -> None:
    profile = load_profile("iso87-binary")

    assert profile.response_code("no_such_reason_anywhere") == "96"


def test_field_definitions_give_text_lengths_and_content_classes() -> None:
    binary = load_profile("iso87-binary")
    ascii_ = load_profile("iso87-ascii")

    assert binary.fields[2] == FieldDef(2, "n", 19, True, "Primary Account Number (PAN)", False)
    assert binary.fields[4] == FieldDef(4, "n", 12, False, "Amount, Transaction", False)
    assert binary.fields[35].content == "z"
    assert binary.fields[41].content == "ans"
    # A binary PIN block of 8 bytes is 16 hex digits in a Message, in both layouts.
    assert binary.fields[52] == FieldDef(52, "b", 16, False, "PIN", True)
    assert ascii_.fields[52] == FieldDef(52, "b", 16, False, "PIN", True)
    assert binary.fields[55].max_len == ascii_.fields[55].max_len == 510


def test_a_profile_loads_from_a_path_string_a_path_object_or_another_specs_dir(tmp_path: Path) -> None:
    copy = tmp_path / "mine.toml"
    copy.write_text(BASE.read_text(encoding="utf-8"), encoding="utf-8")

    by_string = load_profile(str(copy))
    by_path = load_profile(copy)
    by_name = load_profile("mine", specs_dir=tmp_path)

    assert by_string.source == by_path.source == by_name.source == copy
    assert by_string.fields == load_profile("iso87-binary").fields


def test_loading_twice_gives_equal_but_independent_profiles() -> None:
    first = load_profile("iso87-ascii")
    second = load_profile("iso87-ascii")

    assert first == second
    assert first is not second


def test_a_loaded_profile_cannot_be_changed() -> None:
    profile: Profile = load_profile("iso87-binary")

    with pytest.raises(TypeError):
        profile.response_codes["approved"] = "05"  # type: ignore[index]
    with pytest.raises(TypeError):
        profile.fields[4] = profile.fields[3]  # type: ignore[index]


def test_the_cup_profile_frames_with_a_binary_length_and_a_tpdu() -> None:
    profile = load_profile("cup-pos")

    assert profile.framing == Framing("2b", length_includes_header=False, tpdu=True, max_frame_bytes=8192)
    assert profile.dialect == "cup"


def test_the_cup_profile_packs_numerics_as_bcd_and_sends_a_six_byte_header() -> None:
    profile = load_profile("cup-pos")

    assert set(profile.fields) <= set(range(2, 65))
    assert {2, 3, 4, 11, 35, 37, 38, 39, 41, 42, 49, 55, 60, 61, 64} <= set(profile.fields)
    assert profile.iso_spec["t"]["data_enc"] == "b"
    assert profile.iso_spec["4"]["data_enc"] == "b"
    assert profile.iso_spec["h"]["max_len"] == 6
    assert profile.iso_spec["h"]["value"] == "603100000000"
    assert profile.fields[2] == FieldDef(2, "n", 19, True, "Primary Account Number (PAN)", False)
    assert profile.fields[35].content == "z"
    assert profile.fields[60].max_len == 17
    assert profile.fields[62] == FieldDef(62, "b", 1024, True, "Reserved Private", True)


# --- broken profiles -----------------------------------------------------------------------------


def test_an_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile("iso87-klingon")

    message = str(caught.value)
    assert "iso87-klingon" in message
    assert "iso87-binary" in message
    assert "iso87-ascii" in message


def test_a_missing_profile_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    assert str(path) in str(caught.value)
    assert "no such file" in str(caught.value)


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = broken_copy(tmp_path, "tpdu = false ", "tpdu = = ")

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: TOML syntax error")
    assert "line 16" in message


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    raw = BASE.read_bytes()
    assert b"binary" in raw
    path.write_bytes(raw.replace(b"binary", b"bin\xe4ry", 1))

    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(path)


BROKEN = [
    pytest.param('header = "2b"', 'header = "3b"', "framing.header", "unknown header kind '3b'", id="header kind"),
    pytest.param("tpdu = false", 'tpdu = "no"', "framing.tpdu", "must be true or false", id="tpdu not bool"),
    pytest.param(
        "max_frame_bytes = 8192", "max_frame_bytes = 0", "framing.max_frame_bytes", "at least 1", id="frame 0"
    ),
    pytest.param(
        "max_frame_bytes = 8192", "max_frame_bytes = 8192\nmax_frame = 1", "framing.max_frame", "unknown key", id="typo"
    ),
    pytest.param(
        'approved = "00"', 'approved = "0"', "dialect.response_codes.approved", "not 2 digits", id="rc 1 char"
    ),
    pytest.param('approved = "00"', 'approved = "000"', "dialect.response_codes.approved", "not 2 digits", id="rc 3"),
    pytest.param('approved = "00"', "approved = 0", "dialect.response_codes.approved", "must be a string", id="rc int"),
    pytest.param('pan_mismatch = "14"', "", "dialect.response_codes", "pan_mismatch", id="reason missing"),
    pytest.param(
        'approved = "00"',
        'approved = "00"\nNotSnake = "05"',
        "dialect.response_codes.NotSnake",
        "snake_case",
        id="reason name",
    ),
    pytest.param('name = "iso87"', 'name = ""', "dialect.name", "must not be empty", id="dialect empty"),
    pytest.param('name = "iso87-binary"', "", "profile.name", "missing key", id="name missing"),
    pytest.param("[dialect]", "[dialects]", "dialects", "unknown key", id="unknown table"),
]


@pytest.mark.parametrize(("old", "new", "key", "words"), BROKEN)
def test_a_broken_section_names_the_file_the_key_and_the_problem(
    tmp_path: Path, old: str, new: str, key: str, words: str
) -> None:
    path = broken_copy(tmp_path, old, new)

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    assert caught.value.source == path
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert words in str(caught.value)


def _field(number: int, changes: dict[str, object]) -> tuple[str, str]:
    """(old line, new line) for field ``number`` with some keys replaced, or removed (value None)."""
    old = field_line(number)
    table = dict(tomllib.loads(old)[str(number)])
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    new = f"{number} = {{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"
    return old, new


BROKEN_FIELDS = [
    pytest.param(4, {"data_enc": None}, "fields.4.data_enc", "missing key", id="no data_enc"),
    pytest.param(4, {"content": "x"}, "fields.4.content", "unknown content type 'x'", id="content type"),
    pytest.param(4, {"content": None}, "fields.4.content", "missing key", id="no content"),
    pytest.param(4, {"data_enc": "klingon"}, "fields.4.data_enc", "neither", id="unknown codec"),
    pytest.param(4, {"len_enc": "base64"}, "fields.4.len_enc", "neither", id="bytes codec"),
    pytest.param(4, {"len_type": 7}, "fields.4.len_type", "0 (fixed) to 4", id="len_type"),
    pytest.param(4, {"max_len": 0}, "fields.4.max_len", "at least 1", id="max_len 0"),
    pytest.param(4, {"max_len": "12"}, "fields.4.max_len", "must be an integer", id="max_len text"),
    pytest.param(2, {"max_len": 100}, "fields.2.max_len", "does not fit a 2-byte", id="LL too long"),
    pytest.param(4, {"max_length": 12}, "fields.4.max_length", "unknown key", id="typo"),
    pytest.param(4, {"len_count": "nibbles"}, "fields.4.len_count", 'needs data_enc = "b"', id="nibbles text"),
    pytest.param(4, {"left_pad": "0"}, "fields.4.left_pad", "padding needs", id="pad without nibbles"),
    pytest.param(
        4,
        {"data_enc": "b", "len_count": "nibbles", "max_len": 3},
        "fields.4",
        "needs left_pad or right_pad",
        id="odd BCD no pad",
    ),
    pytest.param(41, {"data_enc": "b"}, "fields.41.content", "cannot travel as data_enc", id="ans as binary"),
]


@pytest.mark.parametrize(("number", "changes", "key", "words"), BROKEN_FIELDS)
def test_a_broken_field_names_the_file_the_key_and_the_problem(
    tmp_path: Path, number: int, changes: dict[str, object], key: str, words: str
) -> None:
    old, new = _field(number, changes)
    path = broken_copy(tmp_path, old, new)

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    assert caught.value.key == key
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert words in str(caught.value)


def test_field_65_is_refused_because_it_announces_a_tertiary_bitmap(tmp_path: Path) -> None:
    old = field_line(64)
    path = broken_copy(tmp_path, old, old + "\n" + old.replace("64 ", "65 ", 1))

    with pytest.raises(ProfileError, match=r"fields\.65: bit 65 announces a tertiary bitmap"):
        load_profile(path)


def test_a_field_number_outside_2_to_128_is_refused(tmp_path: Path) -> None:
    old = field_line(128)
    path = broken_copy(tmp_path, old, old + "\n" + old.replace("128", "129", 1))

    with pytest.raises(ProfileError, match=r"fields\.129: a field key must be"):
        load_profile(path)


def test_the_message_type_is_required(tmp_path: Path) -> None:
    path = broken_copy(tmp_path, "t   = {", "# t = {")

    with pytest.raises(ProfileError, match=r"fields\.t: missing table"):
        load_profile(path)


def test_fields_above_64_need_the_secondary_bitmap(tmp_path: Path) -> None:
    path = broken_copy(tmp_path, "1   = {", "# 1 = {")

    with pytest.raises(ProfileError, match=r"fields\.1: missing table"):
        load_profile(path)


def test_a_bitmap_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    old = next(line for line in BASE.read_text(encoding="utf-8").splitlines() if line.startswith("p "))
    path = broken_copy(tmp_path, old, old.replace("max_len = 8,", "max_len = 16,"))

    with pytest.raises(ProfileError, match=r"fields\.p\.max_len: must be 8"):
        load_profile(path)


def header_line(base: Path) -> str:
    return next(line for line in base.read_text(encoding="utf-8").splitlines() if line.startswith("h "))


@pytest.mark.parametrize(
    ("value", "words"),
    [('"6031"', "must be 12 hex digits"), ('"60310000000G"', "must be 12 hex digits"), ("6031", "must be a string")],
    ids=["short", "not hex", "number"],
)
def test_a_header_value_that_does_not_fill_the_header_is_refused(tmp_path: Path, value: str, words: str) -> None:
    old = header_line(CUP)
    path = broken_copy(tmp_path, old, old.replace('"603100000000"', value), base=CUP)

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    assert caught.value.key == "fields.h.value"
    assert words in str(caught.value)


def test_a_header_without_a_value_is_refused(tmp_path: Path) -> None:
    old = header_line(CUP)
    path = broken_copy(tmp_path, old, old.replace('value = "603100000000", ', ""), base=CUP)

    with pytest.raises(ProfileError, match=r"fields\.h\.value: missing key"):
        load_profile(path)


def test_a_header_of_length_zero_cannot_have_a_value(tmp_path: Path) -> None:
    old = header_line(BASE)
    path = broken_copy(tmp_path, old, old.replace("max_len = 0,", 'max_len = 0, value = "60",'))

    with pytest.raises(ProfileError, match=r"fields\.h\.value: a header of max_len 0 has no value"):
        load_profile(path)


def test_docs_profiles_md_lists_the_fields_each_request_must_carry_as_the_dialect_checks_them() -> None:
    from gateway.core.model import Kind
    from gateway.protocol.iso87 import REQUIRED_FIELDS

    text = (Path(__file__).resolve().parents[2] / "docs" / "profiles.md").read_text()
    table = text[text.index("<!-- required-fields"):text.index("<!-- /required-fields -->")]
    rows = re.findall(r"^\| ([a-z -]+) \| [^|]+ \| ([0-9, ]+) \| (yes|no) \|$", table, re.M)
    names = {"network management": Kind.NETWORK, "pre-authorization": Kind.PREAUTH, "purchase": Kind.PURCHASE,
             "pre-auth completion": Kind.COMPLETION, "void": Kind.VOID, "refund": Kind.REFUND,
             "reversal": Kind.REVERSAL, "settlement": Kind.SETTLEMENT}  # fmt: skip
    documented = {names[name]: tuple(int(n) for n in fields.split(", ")) for name, fields, _ in rows}
    assert documented == REQUIRED_FIELDS
    assert all(7 not in fields for fields in REQUIRED_FIELDS.values())
