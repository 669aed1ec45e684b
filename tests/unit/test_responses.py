"""build_response: MTI + 10, the echoed request fields, DE37 / DE38 / DE39, in field-number order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.iso87 import ECHO_FIELDS, build_response
from gateway.protocol.message import Message


def reference(request: Message, code: str, rrn: str | None, approval: str | None) -> Message:
    """The answer as the design states it, computed the plain way."""
    fields = {n: v for n, v in request.fields.items() if n in ECHO_FIELDS}
    if rrn is not None:
        fields[37] = rrn
    if approval is not None:
        fields[38] = approval
    fields[39] = code
    mti = request.mti
    return Message(f"{mti[:2]}{int(mti[2]) + 1}0", dict(sorted(fields.items())))


def test_a_purchase_answer() -> None:
    request = Message(
        "0200",
        {2: "4761739001010119", 3: "000000", 4: "000000001000", 7: "1122101010", 11: "000001", 12: "101010",
         13: "1122", 14: "2812", 41: "TERM0001", 42: "MERCHANT0000001", 49: "840"},
    )  # fmt: skip
    answer = build_response(request, "00", rrn="000000000001", approval_code="1J2M97")
    assert answer.mti == "0210"
    assert list(answer.fields.items()) == [
        (3, "000000"), (4, "000000001000"), (7, "1122101010"), (11, "000001"), (12, "101010"), (13, "1122"),
        (37, "000000000001"), (38, "1J2M97"), (39, "00"), (41, "TERM0001"), (42, "MERCHANT0000001"), (49, "840"),
    ]  # fmt: skip  (no PAN, no expiry: never echoed)


@given(
    mti=st.sampled_from(["0100", "0200", "0201", "0220", "0400", "0420", "0421", "0500", "0800"]),
    fields=st.dictionaries(st.integers(2, 128), st.text("0123456789ABC ", min_size=1, max_size=12), max_size=30),
    code=st.sampled_from(["00", "05", "12", "30", "96"]),
    rrn=st.none() | st.just("000000000042"),
    approval=st.none() | st.just("ABC123"),
)
def test_any_request_is_answered_as_the_design_says(
    mti: str, fields: dict[int, str], code: str, rrn: str | None, approval: str | None
) -> None:
    request = Message(mti, fields)
    answer = build_response(request, code, rrn=rrn, approval_code=approval)
    expected = reference(request, code, rrn, approval)
    assert answer == expected
    assert list(answer.fields) == list(expected.fields)  # the same order, not only the same fields
