"""Structured logs: JSON lines, console output, and card data masked wherever it hides."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.cards import luhn_checksum_ok as luhn_valid
from gateway.core.cards import mask_pan
from gateway.logs import bound_contextvars, configure_logging, get_logger, reset_logging
from gateway.logs import mask_text as redact_text
from gateway.protocol.message import Message

PAN = "4761739001010119"  # Luhn-valid test card
MASKED = "476173******0119"
NOT_LUHN = "4761739001010118"
TRACK_TAIL = "1019876543"  # track 2 service code and discretionary data: never logged


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    reset_logging()


def json_lines(buf: io.BytesIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


def log_to_buffer(level: str = "info") -> tuple[Any, io.BytesIO]:
    buf = io.BytesIO()
    configure_logging(level, "json", buf)
    return get_logger("test"), buf


def test_the_masked_form_keeps_the_first_six_and_last_four_digits() -> None:
    assert mask_pan(PAN) == MASKED
    assert mask_pan("4761730000000") == "476173***0000"
    assert mask_pan("1234567890") == "**********"


def test_luhn_check_accepts_valid_card_numbers_and_refuses_a_changed_digit() -> None:
    assert luhn_valid(PAN)
    assert luhn_valid("79927398713")
    assert not luhn_valid(NOT_LUHN)


def test_a_pan_inside_free_text_is_masked_and_the_rest_of_the_text_kept() -> None:
    assert redact_text(f"card={PAN};exp=2512") == f"card={MASKED};exp=2512"
    assert redact_text(f";{PAN}=25121010000012300000?") == f";{MASKED}=25121010000012300000?"


def test_digit_runs_that_fail_luhn_or_are_too_long_or_short_are_left_alone() -> None:
    de90 = "020000012311221000000000000000000000000000"  # 42 digits
    for text in (f"x {NOT_LUHN} y", de90, "rrn 000000000001", f"{PAN}0000", f"123{PAN}9"):
        assert redact_text(text) == text


def test_json_lines_parse_and_carry_event_level_logger_and_a_utc_timestamp() -> None:
    log, buf = log_to_buffer()
    log.info("gateway.started", listen="127.0.0.1:8583")
    log.warning("relay.broker_down", attempt=3)
    first, second = json_lines(buf)
    assert first["event"] == "gateway.started"
    assert first["level"] == "info"
    assert first["logger"] == "test"
    assert first["listen"] == "127.0.0.1:8583"
    assert second["level"] == "warning"
    assert second["attempt"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    stamped = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - stamped).total_seconds()) < 60


def test_the_message_processed_line_shows_only_the_masked_pan() -> None:
    log, buf = log_to_buffer()
    log.info(
        "message.processed",
        mti="0200",
        kind="purchase",
        merchant="MERCHANT0000001",
        terminal="TERM0001",
        stan="000123",
        rrn="000000000001",
        response_code="00",
        reason=None,
        latency_ms=1.25,
        pan=PAN,
    )
    raw = buf.getvalue()
    assert PAN.encode() not in raw
    (line,) = json_lines(buf)
    assert line["pan"] == MASKED
    assert line["merchant"] == "MERCHANT0000001"
    assert line["stan"] == "000123"
    assert line["rrn"] == "000000000001"


def test_a_pan_like_key_is_masked_even_when_the_number_fails_luhn() -> None:
    log, buf = log_to_buffer()
    log.info("x", pan=NOT_LUHN, card_number=int(NOT_LUHN), masked_pan=MASKED, cardNumber=NOT_LUHN)
    (line,) = json_lines(buf)
    assert line["pan"] == "476173******0118"
    assert line["card_number"] == "476173******0118"
    assert line["cardNumber"] == "476173******0118"
    assert line["masked_pan"] == MASKED


@pytest.mark.parametrize(
    "key",
    ["track2", "track_2", "track", "track2_data", "pin", "pin_block", "pinBlock", "icc", "icc_data", "emv",
     "emv_data", "cvv", "cvv2", "cvc"],
)  # fmt: skip
def test_keys_naming_track_pin_emv_or_cvv_data_are_redacted_whatever_their_value(key: str) -> None:
    log, buf = log_to_buffer()
    log.info("x", **{key: "1234ABCD" if "pin" in key.lower() else f"{PAN}=2512101"})
    (line,) = json_lines(buf)
    assert line[key] == "[redacted]"


def test_keys_that_merely_contain_the_letters_are_not_redacted() -> None:
    log, buf = log_to_buffer()
    log.info("x", shipping="ok", span_id="abc", opinion="fine", tracking_id="t-1")
    (line,) = json_lines(buf)
    assert (line["shipping"], line["span_id"], line["opinion"], line["tracking_id"]) == ("ok", "abc", "fine", "t-1")


def test_pans_in_nested_dicts_lists_and_tuples_are_masked_without_touching_the_callers_data() -> None:
    log, buf = log_to_buffer()
    payload: dict[str, Any] = {
        "request": {"note": f"card {PAN}", "track2": f"{PAN}=2512{TRACK_TAIL}", "items": [PAN, ("x", f"<{PAN}>")]},
        PAN: "a pan as a key",
        "fields": {2: NOT_LUHN, 35: f"{PAN}D2512{TRACK_TAIL}", 52: "A1B2C3D4E5F60718", 11: "000123"},
        "decoded": {"2": NOT_LUHN, "55": "9F2608A1B2C3D4E5F60718"},
    }
    log.info("nested", payload=payload, many=[{"pin_block": "0123456789ABCDEF"}])
    raw = buf.getvalue()
    assert PAN.encode() not in raw
    assert NOT_LUHN.encode() not in raw
    assert TRACK_TAIL.encode() not in raw  # track 2 content went with its key
    assert b"A1B2C3D4E5F60718" not in raw
    assert b"0123456789ABCDEF" not in raw
    (line,) = json_lines(buf)
    assert line["payload"]["request"]["note"] == f"card {MASKED}"
    assert line["payload"]["request"]["items"] == [MASKED, ["x", f"<{MASKED}>"]]
    assert line["payload"][MASKED] == "a pan as a key"
    assert line["payload"]["fields"]["11"] == "000123"
    assert payload["request"]["note"] == f"card {PAN}"  # the caller's dict is unchanged


def test_an_exception_message_and_traceback_are_masked() -> None:
    log, buf = log_to_buffer()
    try:
        raise ValueError(f"no original for card {PAN}")
    except ValueError:
        log.exception("request.failed")
    (line,) = json_lines(buf)
    assert PAN.encode() not in buf.getvalue()
    assert "Traceback" in line["exception"]
    assert f"ValueError: no original for card {MASKED}" in line["exception"]


def test_an_exception_passed_as_a_value_is_rendered_masked() -> None:
    log, buf = log_to_buffer()
    log.warning("upstream.failed", error=ConnectionError(f"host refused {PAN}"))
    (line,) = json_lines(buf)
    assert line["error"] == f"ConnectionError: host refused {MASKED}"


def test_bytes_are_never_written_only_their_length() -> None:
    log, buf = log_to_buffer()
    frame = b"\x00\x1e0200" + PAN.encode()
    log.info("frame.rejected", frame=frame, nested={"raw": bytearray(frame)})
    (line,) = json_lines(buf)
    assert line["frame"] == "<22 bytes>"
    assert line["nested"]["raw"] == "<22 bytes>"


def test_messages_and_other_objects_are_rendered_through_their_redacting_repr() -> None:
    @dataclass
    class Carrier:
        note: str

    log, buf = log_to_buffer()
    message = Message("0200", {2: PAN, 4: "000000001000", 35: f"{PAN}=2512{TRACK_TAIL}", 11: "000123"})
    log.info("x", message=message, carrier=Carrier(f"card {PAN}"), when=datetime(2026, 11, 22, tzinfo=UTC))
    raw = buf.getvalue()
    assert PAN.encode() not in raw
    assert TRACK_TAIL.encode() not in raw
    (line,) = json_lines(buf)
    assert "<redacted>" in line["message"]
    assert "000000001000" in line["message"]
    assert MASKED in line["carrier"]
    assert line["when"] == "2026-11-22T00:00:00+00:00"


def test_a_logger_made_before_configuration_writes_where_logging_was_configured_later() -> None:
    reset_logging()
    early = get_logger("gateway.early")  # as a module-level logger is, at import time
    buf = io.BytesIO()
    configure_logging("info", "json", buf)
    early.info("gateway.started", pan=PAN)
    (line,) = json_lines(buf)
    assert line["logger"] == "gateway.early"
    assert line["pan"] == MASKED


def test_context_variables_are_merged_into_every_line() -> None:
    log, buf = log_to_buffer()
    with bound_contextvars(conn_id=7, peer="10.0.0.1:40000"):
        log.info("connection.opened")
    log.info("after")
    inside, after = json_lines(buf)
    assert inside["conn_id"] == 7
    assert inside["peer"] == "10.0.0.1:40000"
    assert "conn_id" not in after


def test_lines_below_the_configured_level_are_dropped() -> None:
    log, buf = log_to_buffer("warning")
    log.info("quiet")
    log.debug("quieter")
    log.error("loud")
    assert [line["event"] for line in json_lines(buf)] == ["loud"]


def test_standard_library_records_go_through_the_same_masking_pipeline() -> None:
    _, buf = log_to_buffer()
    logging.getLogger("aiomqtt.client").warning("publish failed for %s", PAN)
    (line,) = json_lines(buf)
    assert line == {**line, "event": f"publish failed for {MASKED}", "logger": "aiomqtt.client", "level": "warning"}


def test_a_text_stream_gets_the_same_json_lines() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    get_logger("t").info("hello", pan=PAN)
    line = orjson.loads(out.getvalue())
    assert line["event"] == "hello"
    assert line["pan"] == MASKED


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_console_on_a_terminal_and_json_elsewhere() -> None:
    tty = _Terminal()
    configure_logging("info", "auto", tty)
    get_logger("t").info("gateway.started", card=f"x{PAN}x")
    text = tty.getvalue()
    assert "gateway.started" in text
    assert MASKED in text
    assert PAN not in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)

    pipe = io.BytesIO()
    configure_logging("info", "auto", pipe)
    get_logger("t").info("gateway.started")
    assert orjson.loads(pipe.getvalue())["event"] == "gateway.started"


def test_console_format_is_readable_and_masks_exceptions() -> None:
    out = io.StringIO()
    configure_logging("debug", "console", out)
    log = get_logger("gateway.tcp")
    log.debug("connection.opened", peer="10.0.0.1:1234")
    try:
        raise RuntimeError(f"card {PAN}")
    except RuntimeError:
        log.exception("boom")
    text = out.getvalue()
    assert "connection.opened" in text
    assert "peer=10.0.0.1:1234" in text
    assert "gateway.tcp" in text
    assert f"RuntimeError: card {MASKED}" in text
    assert PAN not in text
    assert "\x1b[" not in text  # no colour codes when the stream is not a terminal


def test_console_format_also_writes_to_a_byte_stream_without_closing_it() -> None:
    out = io.BytesIO()
    configure_logging("info", "console", out)
    get_logger("t").info("gateway.started", note=f"card {PAN}")
    configure_logging("info", "json", io.BytesIO())  # the console writer goes away
    text = out.getvalue().decode()
    assert "gateway.started" in text
    assert MASKED in text
    assert not out.closed


def test_unknown_levels_and_formats_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(st.integers(0, 9), min_size=12, max_size=18),
    before=st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=20),
    after=st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=20),
)
def test_any_luhn_valid_pan_between_non_digits_never_reaches_the_output(
    body: list[int], before: str, after: str
) -> None:
    digits = "".join(map(str, body))
    pan = digits + next(str(d) for d in range(10) if luhn_valid(digits + str(d)))
    buf = io.BytesIO()
    configure_logging("info", "json", buf)
    get_logger("p").info(f"event {before}{pan}{after}", note=[{"k": f"{before}{pan}{after}"}])
    text = buf.getvalue().decode()
    assert pan not in text
    assert text.count(mask_pan(pan) or "") == 2


class _CountingStream(io.BytesIO):
    """A byte stream that counts its writes (one write is one system call on a real file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


async def test_coalesced_lines_written_during_one_loop_iteration_leave_in_one_write() -> None:
    import asyncio

    out = _CountingStream()
    configure_logging("info", "json", out, coalesce=True)
    log = get_logger("test")
    for number in range(50):
        log.info("message.processed", n=number, pan=PAN)
    assert out.writes == 0  # nothing yet: the iteration is not over
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert out.writes == 1
    lines = json_lines(out)
    assert [line["n"] for line in lines] == list(range(50))
    assert {line["pan"] for line in lines} == {MASKED}  # masking happens before the buffer


def test_coalesced_lines_written_without_a_running_loop_go_out_at_once_and_in_order() -> None:
    import asyncio

    from gateway.logs import flush_logs

    out = _CountingStream()
    configure_logging("info", "json", out, coalesce=True)
    log = get_logger("test")

    async def inside() -> None:
        log.info("first")  # waits for the end of the iteration, which never comes: the loop stops

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(inside())
    finally:
        loop.close()
    log.info("second")  # no loop: written at once, after the line still pending
    assert [line["event"] for line in json_lines(out)] == ["first", "second"]
    log.info("third")
    flush_logs()
    assert [line["event"] for line in json_lines(out)] == ["first", "second", "third"]



async def test_a_line_from_another_thread_goes_out_at_once_after_the_loops_pending_lines() -> None:
    import asyncio
    import threading

    out = _CountingStream()
    configure_logging("info", "json", out, coalesce=True)
    log = get_logger("test")
    log.info("loop 1")
    log.info("loop 2")
    other = threading.Thread(target=log.info, args=("thread",))
    other.start()
    other.join()
    assert [line["event"] for line in json_lines(out)] == ["loop 1", "loop 2", "thread"]
    log.info("loop 3")  # the drain that was due ran early: this one schedules another
    assert out.writes == 1
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [line["event"] for line in json_lines(out)] == ["loop 1", "loop 2", "thread", "loop 3"]
    assert out.writes == 2


def test_coalesced_lines_of_a_loop_that_stopped_early_do_not_hold_back_the_next_loop() -> None:
    import asyncio

    out = _CountingStream()
    configure_logging("info", "json", out, coalesce=True)
    log = get_logger("test")

    async def one(event: str) -> None:
        log.info(event)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    first = asyncio.new_event_loop()
    try:
        first.call_soon(lambda: (log.info("first"), first.stop()))  # stops before its drain runs
        first.run_forever()
    finally:
        first.close()
    assert out.writes == 0
    asyncio.run(one("second"))
    assert [line["event"] for line in json_lines(out)] == ["first", "second"]


def _textbook_luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = int(char) * (2 if index % 2 else 1)
        total += digit - 9 if digit > 9 else digit
    return total % 10 == 0


@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_the_luhn_check_agrees_with_the_textbook_algorithm(digits: str) -> None:
    from gateway.core.cards import luhn_valid as card_luhn_valid

    assert luhn_valid(digits) is _textbook_luhn(digits)
    assert card_luhn_valid(digits) is (12 <= len(digits) <= 19 and _textbook_luhn(digits))


def test_a_pan_of_non_ascii_digits_is_not_luhn_valid() -> None:
    from gateway.core.cards import luhn_valid as card_luhn_valid

    arabic_indic = "".join(chr(0x0660 + int(d)) for d in "4761739001010119")  # Luhn-valid as ASCII
    assert arabic_indic.isdigit()
    assert not card_luhn_valid(arabic_indic)


# --- card numbers that hide: in groups, or split across neighbouring values ------------------------


@pytest.mark.parametrize("written", ["4761 7390 0101 0119", "4761-7390-0101-0119", "476173 9001 010119"])
def test_a_card_number_written_in_groups_is_masked(written: str) -> None:
    log, buf = log_to_buffer()
    log.info("x", detail=f"customer said {written} at the till")
    (line,) = json_lines(buf)
    assert PAN not in re.sub(r"[^0-9]", "", line["detail"])
    assert line["detail"].startswith("customer said 4761") and line["detail"].endswith("0119 at the till")


def test_a_card_number_split_across_the_terminal_and_merchant_values_is_masked() -> None:
    pan = "334917530212345673"  # 18 digits, Luhn-valid: the first 8 landed in DE41, the rest in DE42
    assert luhn_valid(pan)
    log, buf = log_to_buffer()
    log.info("message.processed", mti="0200", terminal=pan[:8], merchant=pan[8:] + "=2812", kind="purchase")
    raw = buf.getvalue().decode()
    assert pan not in re.sub(r"[^0-9]", "", raw)
    (line,) = json_lines(buf)
    assert line["terminal"] == "334917**" and line["merchant"] == "******5673=2812"


def test_a_split_number_through_an_all_digit_value_is_masked_and_other_values_break_the_chain() -> None:
    pan = "4761739001010119"
    log, buf = log_to_buffer()
    log.info("x", a=f"id {pan[:5]}", b=pan[5:10], c=f"{pan[10:]} end")
    log.info("y", a=f"id {pan[:5]}", n=3, c=f"{pan[5:]} end")  # a number between: no longer one value
    first, second = json_lines(buf)
    assert pan not in re.sub(r"[^0-9]", "", "".join(str(v) for v in first.values()))
    assert (second["a"], second["c"]) == (f"id {pan[:5]}", f"{pan[5:]} end")


def test_the_request_line_values_of_the_gateway_are_never_taken_for_card_numbers() -> None:
    log, buf = log_to_buffer()
    for stan, rrn in (("123456", "000000001234"), ("987654", "100000000005"), ("000123", "999999999999")):
        log.info("message.processed", mti="0200", terminal="TERM0001", merchant="898310048160001",
                 kind="purchase", stan=stan, reason=None, rrn=rrn, replayed=None, response_code="00",
                 latency_ms=1.5, pan=MASKED)  # fmt: skip
    for line, (stan, rrn) in zip(json_lines(buf), [("123456", "000000001234"), ("987654", "100000000005"),
                                                   ("000123", "999999999999")], strict=True):  # fmt: skip
        assert (line["stan"], line["rrn"], line["terminal"]) == (stan, rrn, "TERM0001")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(st.integers(0, 9), min_size=12, max_size=18),
    cut=st.integers(1, 12),
    before=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ ", max_size=6),
    after=st.text(alphabet="=D^ ABC", max_size=6),
)
def test_any_card_number_split_between_two_neighbouring_values_never_reaches_the_output(
    body: list[int], cut: int, before: str, after: str
) -> None:
    digits = "".join(map(str, body))
    pan = digits + next(str(d) for d in range(10) if luhn_valid(digits + str(d)))
    if pan[0] == "0":  # no card number starts with 0 (ISO/IEC 7812)
        pan = "4" + pan[1:-1] + next(str(d) for d in range(10) if luhn_valid("4" + pan[1:-1] + str(d)))
    buf = io.BytesIO()
    configure_logging("info", "json", buf)
    get_logger("p").info("message.processed", terminal=f"{before}{pan[:cut]}", merchant=f"{pan[cut:]}{after}")
    (line,) = json_lines(buf)
    assert pan not in re.sub(r"[^0-9]", "", line["terminal"] + line["merchant"])



_LOG_TEXT = st.text(alphabet="0123456789 -=AB", max_size=24)
_LOG_VALUE = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), _LOG_TEXT,
                       st.lists(_LOG_TEXT, max_size=2), st.binary(max_size=3))  # fmt: skip
_LOG_KEY = st.one_of(st.sampled_from(["event", "terminal", "stan", "pan", "track2", "cvv", "de2", "x"]), _LOG_TEXT)


@st.composite
def _card_pieces(draw: st.DrawFn) -> list[str]:
    """A card number, whole, grouped, or cut in up to three pieces (text around it) to land anywhere."""
    card = draw(st.sampled_from(["4761739001010119", "4761 7390 0101 0119", "334917530212345673", "4222222222222"]))
    first, second = sorted(draw(st.lists(st.integers(0, len(card)), min_size=2, max_size=2)))
    around = draw(st.sampled_from(["", "A", "=2812"]))
    return [around + card[:first], card[first:second], card[second:] + around]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_LOG_KEY, _LOG_VALUE), max_size=8), _card_pieces(), st.data())
def test_the_masking_shortcut_gives_every_line_as_the_full_masking_does(
    items: list[tuple[str, Any]], pieces: list[str], data: st.DataObject
) -> None:
    from gateway.masking import _clean_mapping, mask_card_data

    at = data.draw(st.integers(0, len(items)))
    for n, piece in enumerate(data.draw(st.permutations(pieces))):  # together in any order, or apart, or keys
        if data.draw(st.booleans()):
            at = data.draw(st.integers(0, len(items)))
        key = data.draw(st.sampled_from([f"p{n}", "pan", piece, "".join(pieces)]))
        items.insert(at, (key, piece))
    line = dict(items)
    assert mask_card_data(None, "info", dict(line)) == _clean_mapping(line)
