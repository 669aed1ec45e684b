"""Issue 21, finding 4: no full card number in the logs, even split across values or written with
separators.

A shifted bitmap makes track-2 bytes parse as DE41 (8 characters) and DE42 (15): both are valid
``ans`` fields, so today ``message.processed`` carries ``"merchant":"01010119=281210",
"terminal":"47617390"``, the PAN 4761739001010119 split across two keys. The frames here are
encoded directly with the split values, which is what the gateway sees after such a shift.

The check (``leaks``): a line leaks a PAN when its digits, with every non-digit removed, contain the
PAN in order: the whole line, each value, and each pair of adjacent string values in either order
(the line writes ``merchant`` before ``terminal``, so a track 2 shifted into DE41 then DE42 reads
backwards in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiomqtt
import pytest
from brokers import free_port
from harness import CARD, GatewayProcess, IsoClient
from hostile import async_wait_for, frame, log_lines

from gateway.adapters.mqtt import parse_mqtt_url
from gateway.core.cards import luhn_checksum_ok


def luhn_complete(prefix: str) -> str:
    """``prefix`` with the check digit that makes it pass Luhn."""
    return next(prefix + d for d in "0123456789" if luhn_checksum_ok(prefix + d))


PAN_16 = CARD  # 4761739001010119
PAN_19 = luhn_complete("621234567890123456")
PAN_13 = "4222222222222"
assert luhn_checksum_ok(PAN_13)

_NON_DIGITS = re.compile(r"[^0-9]")


def digits(text: str) -> str:
    return _NON_DIGITS.sub("", text)


def string_values(value: Any) -> Iterator[str]:
    """Every string leaf of a JSON document, in document order (keys are not values)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from string_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from string_values(item)
    elif isinstance(value, str):
        yield value


def leaks(line: str, pan: str) -> bool:
    """Whether ``line`` gives ``pan`` away (see the module docstring)."""
    if pan in digits(line):
        return True
    try:
        document = json.loads(line)
    except ValueError:
        return False
    values = list(string_values(document))
    keys = list(document) if isinstance(document, dict) else []
    if any(pan in digits(value) for value in values + keys):
        return True
    return any(pan in digits(a + b) or pan in digits(b + a) for a, b in itertools.pairwise(values))


def leaking_lines(proc: GatewayProcess, pan: str) -> list[str]:
    return [line for line in log_lines(proc) if leaks(line, pan)]


def test_the_leak_check_finds_a_pan_split_across_adjacent_values_in_either_order() -> None:
    assert leaks('{"merchant":"01010119=281210","terminal":"47617390"}', PAN_16)
    assert leaks('{"merchant":"476173900101011","terminal":"9=281210"}', PAN_16)
    assert leaks('{"event":"Client 4761-7390-0101-0119 is already connected"}', PAN_16)
    assert not leaks('{"merchant":"MERCHANT0000001","terminal":"TERM0001","pan":"476173******0119"}', PAN_16)


# Each split: (DE41 terminal id, DE42 merchant id), both valid ans of their fixed length.
def _track2_shifted(pan: str) -> tuple[str, str]:
    """Track 2 (PAN = expiry ...) shifted so that DE41 takes its first 8 characters, DE42 the next 15."""
    track2 = f"{pan}=2812101123456789"
    return track2[:8], track2[8:23]


def _in_line_order(pan: str) -> tuple[str, str]:
    """DE42 takes the first 15 digits, DE41 the rest: the PAN reads left to right in the log line."""
    return f"{pan[15:]}=2812101"[:8], pan[:15]


SPLITS = {
    "track2-shifted-16": _track2_shifted(PAN_16),
    "track2-shifted-19": _track2_shifted(PAN_19),
    "line-order-16": _in_line_order(PAN_16),
    "line-order-19": _in_line_order(PAN_19),
}
SEPARATED = {
    # "4761 7390 0101 0119" across DE41 and DE42, in field order (backwards in the line)
    "spaces-field-order": ("4761 739", "0 0101 0119    "),
    # "4761-7390-0101-0119" across DE42 and DE41, in line order
    "dashes-line-order": ("0119    ", "4761-7390-0101-"),
    # a whole 13-digit PAN with separators in one logged value (DE42)
    "dashes-one-value-13": ("TERM0013", "4222-2222-22222"),
}


async def _send_each(proc: GatewayProcess, splits: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """A sale and a format error (bad DE4) for each split; returns the answers' DE39 per split."""
    answers: dict[str, list[str]] = {}
    pos = await IsoClient.connect(proc.port)
    try:
        for name, (terminal, merchant) in splits.items():
            sale = await pos.sale(1_000, terminal=terminal, merchant=merchant, pan=PAN_13 if "13" in name else CARD)
            fields = {3: "000000", **pos.base(1_000, terminal=terminal, merchant=merchant)}
            raw = frame("0200", fields).replace(fields[4].encode(), b"00000000100X")  # DE4 not digits: 30
            pos.writer.write(raw)
            await pos.writer.drain()
            _, error = await pos.read()
            answers[name] = [sale[39], error[39]]
    finally:
        await pos.close()
    return answers


async def test_a_pan_split_across_the_terminal_and_merchant_ids_never_reaches_the_logs(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    answers = await _send_each(proc, SPLITS)
    assert proc.signal(signal.SIGTERM) == 0
    found = {pan: leaking_lines(proc, pan) for pan in (PAN_16, PAN_19)}
    assert all(codes[1] == "30" for codes in answers.values()), answers
    assert not found[PAN_16] and not found[PAN_19], (
        f"{len(found[PAN_16])} log lines give away {PAN_16}, {len(found[PAN_19])} give away {PAN_19}; "
        f"first: {(found[PAN_16] + found[PAN_19])[:2]}"
    )


async def test_a_pan_written_with_separators_in_logged_values_never_reaches_the_logs(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    await _send_each(proc, SEPARATED)
    assert proc.signal(signal.SIGTERM) == 0
    found = {pan: leaking_lines(proc, pan) for pan in (PAN_16, PAN_13)}
    assert not found[PAN_16] and not found[PAN_13], (
        f"{len(found[PAN_16])} log lines give away {PAN_16}, {len(found[PAN_13])} give away {PAN_13}; "
        f"first: {(found[PAN_16] + found[PAN_13])[:3]}"
    )


async def test_a_pan_with_separators_as_an_mqtt_client_id_never_reaches_the_gateways_log(
    gateway: Callable[..., GatewayProcess],
) -> None:
    # beyond the list: the embedded broker logs a client id it is given (a take-over warning)
    port = free_port()
    proc = gateway({"GATEWAY_MQTT_URL": "embedded", "GATEWAY_MQTT__EMBEDDED_LISTEN": f"127.0.0.1:{port}"})
    client_id = "4761-7390-0101-0119"
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):  # the second connection with the same id takes the first one's session over
            client = aiomqtt.Client("127.0.0.1", port, identifier=client_id, clean_session=False, timeout=5)
            await stack.enter_async_context(_quietly(client))
        await async_wait_for(lambda: "take-over" in proc.logs(), timeout=3)
    assert proc.signal(signal.SIGTERM) == 0
    found = leaking_lines(proc, PAN_16)
    assert not found, f"{len(found)} log lines give away {PAN_16}: {found[:2]}"


async def test_a_pan_split_across_the_terminal_and_merchant_ids_never_reaches_an_event(
    gateway: Callable[..., GatewayProcess], mqtt_broker_url: str
) -> None:
    # beyond the list: design section 7 promises no full PAN in events either; a refund (declined
    # 58 without a reference) publishes pos.refund.declined with both ids in its topic, subject and data.
    # A gateway that refuses such ids and publishes nothing passes.
    proc = gateway()
    address = parse_mqtt_url(mqtt_broker_url)
    prefix = proc.env["GATEWAY_MQTT_TOPIC_PREFIX"]
    received: list[tuple[str, str]] = []
    async with aiomqtt.Client(address.host, address.port, identifier=f"t21-{uuid.uuid4().hex[:12]}", timeout=5) as c:
        await c.subscribe(f"{prefix}/#", qos=1)
        pos = await IsoClient.connect(proc.port)
        try:
            for terminal, merchant in SPLITS.values():  # today: 58, unreferenced_refund_disabled
                await pos.refund(None, 500, terminal=terminal, merchant=merchant)
        finally:
            await pos.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                async for message in c.messages:
                    payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                    received.append((message.topic.value, bytes(payload).decode()))
                    if len(received) == len(SPLITS):
                        break
    given_away = [(topic, payload[:400]) for topic, payload in received
                  if any(leaks(topic, pan) or leaks(payload, pan) for pan in (PAN_16, PAN_19))]  # fmt: skip
    assert not given_away, f"{len(given_away)} of {len(received)} events give a PAN away: {given_away[:2]}"


@contextlib.asynccontextmanager
async def _quietly(client: aiomqtt.Client) -> Any:
    """``client`` connected; its disconnection by the broker is no error here."""
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aenter__()
    try:
        yield client
    finally:
        with contextlib.suppress(aiomqtt.MqttError, RuntimeError):
            await client.__aexit__(None, None, None)


@pytest.mark.parametrize("pan", [PAN_16, PAN_19, PAN_13])
def test_the_test_pans_pass_luhn(pan: str) -> None:
    assert luhn_checksum_ok(pan)
