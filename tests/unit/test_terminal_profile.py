"""The emulator's own loader for the specs/ TOML wire profiles."""

from __future__ import annotations

from pathlib import Path

import iso8583.specs
import pytest

from terminal_emulator.profile import DEFAULT_SPECS_DIR, Framing, ProfileError, load_profile, parse_profile


def test_the_binary_profile_loads_with_a_two_byte_binary_header_and_no_tpdu() -> None:
    profile = load_profile("iso87-binary")
    assert profile.name == "iso87-binary"
    assert profile.framing == Framing(header="2b", length_includes_header=False, tpdu=None, max_frame_bytes=8192)


def test_the_ascii_profile_loads_with_four_ascii_digits_and_hex_text_bitmaps() -> None:
    profile = load_profile("iso87-ascii")
    assert profile.framing.header == "4a"
    assert profile.spec["p"]["data_enc"] == "ascii"
    assert profile.spec["p"]["max_len"] == 16


def test_the_content_key_is_dropped_before_the_spec_reaches_pyiso8583() -> None:
    profile = load_profile("iso87-binary")
    assert all("content" not in entry for entry in profile.spec.values())


@pytest.mark.parametrize(("name", "reference"), [("iso87-binary", iso8583.specs.default),
                                                 ("iso87-ascii", iso8583.specs.default_ascii)])
def test_the_data_elements_the_emulator_sends_match_pyiso8583s_reference_layout(
    name: str, reference: dict[str, dict[str, object]]
) -> None:
    profile = load_profile(name)
    for key in ("t", "p", "2", "3", "4", "7", "11", "12", "13", "14", "37", "38", "39", "41", "42", "49", "70",
                "74", "76", "86", "88", "90", "95"):
        for attribute in ("data_enc", "len_enc", "len_type", "max_len"):
            assert profile.spec[key][attribute] == reference[key][attribute], (key, attribute)


def test_a_profile_can_be_given_as_a_path(tmp_path: Path) -> None:
    source = (DEFAULT_SPECS_DIR / "iso87-binary.toml").read_text()
    target = tmp_path / "mine.toml"
    target.write_text(source)
    assert load_profile(str(target)).framing.header == "2b"


def test_an_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile("no-such-profile")


def test_a_bad_header_kind_is_refused() -> None:
    with pytest.raises(ProfileError, match="header"):
        parse_profile({"framing": {"header": "3x"}, "fields": {"t": {}, "p": {}}})


def test_a_tpdu_given_as_hex_is_kept_and_true_means_the_usual_60_tpdu() -> None:
    fields = {k: dict(v) for k, v in iso8583.specs.default.items()}
    assert parse_profile({"framing": {"tpdu": "6000120000"}, "fields": fields}).framing.tpdu == bytes.fromhex(
        "6000120000")
    assert parse_profile({"framing": {"tpdu": True}, "fields": fields}).framing.tpdu == bytes.fromhex("6000000000")


def test_a_field_without_its_length_type_is_refused() -> None:
    with pytest.raises(ProfileError, match="len_type"):
        parse_profile({"fields": {"t": {"data_enc": "ascii", "len_enc": "ascii", "max_len": 4}, "p": {}}})


def test_a_profile_with_a_tpdu_and_an_application_header_keeps_both_for_sending() -> None:
    if not (DEFAULT_SPECS_DIR / "cup-pos.toml").exists():
        pytest.skip("specs/cup-pos.toml not present")
    profile = load_profile("cup-pos")
    assert profile.framing.tpdu is not None
    assert len(profile.framing.tpdu) == 5
    assert profile.header_value == "603100000000"
    assert profile.spec["h"]["max_len"] == 6
    assert "value" not in profile.spec["h"]


def test_the_dialect_name_is_read_so_peers_can_refuse_one_they_do_not_speak() -> None:
    assert load_profile("iso87-binary").dialect == "iso87"
    assert load_profile("iso87-ascii").dialect == "iso87"
    assert load_profile("cup-pos").dialect == "cup"
