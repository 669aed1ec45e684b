"""Load mode's fast paths must agree with the full codec."""

from __future__ import annotations

from typing import Any

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from terminal_emulator import messages
from terminal_emulator.codec import IsoMessage, encode_message
from terminal_emulator.errors import UsageError
from terminal_emulator.framing import frame
from terminal_emulator.load import ResponseScanner, Template, parse_mix, percentile
from terminal_emulator.messages import Stamp
from terminal_emulator.profile import load_profile

PROFILES = {name: load_profile(name) for name in ("iso87-binary", "iso87-ascii")}
PLACEHOLDER = Stamp("000000", "0000000000", "000000", "0000")
COMMON: dict[str, Any] = {
    "tid": "L0000001", "mid": "MERCHANT0000001", "pan": "4761739001010119", "currency": "840", "amount": 1000,
}


@pytest.mark.parametrize("name", PROFILES)
def test_a_rendered_template_is_byte_identical_to_a_freshly_encoded_request(name: str) -> None:
    profile = PROFILES[name]
    template = Template(profile, messages.void(PLACEHOLDER, original_rrn="000000000000", **COMMON))
    assert template.fields == (7, 11, 12, 13, 37)
    texts = {7: "1122103015", 11: "004711", 12: "113015", 13: "1122", 37: "000000000042"}
    rendered = template.render({n: template.value(n, t) for n, t in texts.items()})
    fresh = messages.void(Stamp("004711", "1122103015", "113015", "1122"), original_rrn="000000000042", **COMMON)
    assert rendered == frame(encode_message(profile, fresh), profile.framing)


@pytest.mark.parametrize("name", PROFILES)
def test_a_reversal_template_patches_its_de90_far_from_the_time_fields(name: str) -> None:
    profile = PROFILES[name]
    original = ("0200", "000000", "0000000000")
    template = Template(profile, messages.reversal(
        PLACEHOLDER, tid="L0000001", mid="MERCHANT0000001", pan="4761739001010119", processing_code="000000",
        amount=1000, currency="840", original=original))
    st = Stamp("000002", "1122103015", "113015", "1122")
    de90 = messages.original_data_elements("0200", "000001", "1122103014")
    values = {7: st.transmitted, 11: st.stan, 12: st.local_time, 13: st.local_date, 90: de90}
    rendered = template.render({n: template.value(n, t) for n, t in values.items()})
    fresh = messages.reversal(st, tid="L0000001", mid="MERCHANT0000001", pan="4761739001010119",
                              processing_code="000000", amount=1000, currency="840",
                              original=("0200", "000001", "1122103014"))
    assert rendered == frame(encode_message(profile, fresh), profile.framing)


def test_a_patch_must_keep_the_field_size() -> None:
    profile = PROFILES["iso87-binary"]
    template = Template(profile, messages.purchase(PLACEHOLDER, **COMMON))
    with pytest.raises(ValueError, match="size"):
        template.value(11, "1234567")


field_text = st.text(alphabet="0123456789", min_size=1, max_size=19)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(PROFILES)),
    pan=st.one_of(st.none(), field_text.filter(lambda s: len(s) >= 12)),
    stan=st.one_of(st.none(), st.from_regex(r"\A[0-9]{6}\Z")),
    rrn=st.one_of(st.none(), st.from_regex(r"\A[0-9A-Z]{12}\Z")),
    code=st.one_of(st.none(), st.from_regex(r"\A[0-9A-Z]{2}\Z")),
    extra=st.dictionaries(st.sampled_from([3, 4, 32, 35, 38, 41, 44, 90]), field_text, max_size=4),
)
def test_the_response_scanner_reads_the_same_stan_rrn_and_code_as_a_full_decode(
    name: str, pan: str | None, stan: str | None, rrn: str | None, code: str | None, extra: dict[int, str]
) -> None:
    profile = PROFILES[name]
    fields: dict[int, str] = {}
    for number, value in extra.items():
        spec = profile.spec[str(number)]
        fields[number] = value.ljust(spec["max_len"], "0")[: spec["max_len"]] if spec["len_type"] == 0 else \
            value[: spec["max_len"]]
    chosen: dict[int, str | None] = {2: pan, 11: stan, 37: rrn, 39: code}
    fields.update({number: value for number, value in chosen.items() if value is not None})
    body = encode_message(profile, IsoMessage("0210", fields))
    decoded, _ = iso8583.decode(body, profile.spec)
    got = ResponseScanner(profile).scan(body)
    expected = tuple(decoded[k].encode() if k in decoded else None for k in ("11", "37", "39"))
    assert got == expected


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 99) == 0.0
    assert percentile([7.0], 1) == 7.0


def test_a_mix_reads_as_weights_and_sale_means_purchase() -> None:
    assert parse_mix("sale=70,refund=10,void=10,reversal=10") == {"purchase": 70, "refund": 10, "void": 10,
                                                                  "reversal": 10}
    with pytest.raises(UsageError):
        parse_mix("purchase=1,teleport=2")
    with pytest.raises(UsageError):
        parse_mix("purchase=0")
