"""Issue 21, findings 1 and "kill -9 under load": no request is booked and left unanswered unseen.

A frame that closes a connection stops that connection's reading at once: what came before it is
answered, what came after it is never decided. A request whose connection died while it was decided
is either not recorded, or recorded and listed by ``iso-gateway transactions --unanswered --json``
(each item at least ``rrn``, ``stan``, ``terminal_id``, ``status``), and the terminal's reversal
matches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from harness import MERCHANT, GatewayProcess, IsoClient
from hostile import (
    OVERSIZE_HEADER,
    UNREADABLE_FRAME,
    async_wait_for,
    connect,
    echo_frame,
    frame,
    ledger_rows,
    read_until_closed,
    reset,
    sale_fields,
    sale_frame,
    split_frames,
    unanswered,
)

#: STANs of this module (IsoClient's counter is shared by the run; these start far above it)
_STANS = itertools.count(700_001)


def next_stan() -> str:
    return f"{next(_STANS) % 1_000_000:06d}"


def recorded_stans(proc: GatewayProcess, terminal: str) -> dict[str, str]:
    """STAN -> status of every record of ``terminal`` in the ledger file."""
    rows = ledger_rows(proc.db, "SELECT stan, status FROM txns WHERE merchant_id = ? AND terminal_id = ?",
                       MERCHANT, terminal)  # fmt: skip
    return {row["stan"]: row["status"] for row in rows}


# =========================================================================== 1. nothing read after a closing frame


@pytest.mark.parametrize(
    "closing",
    [
        pytest.param(UNREADABLE_FRAME, id="unreadable-mti"),
        # not in the text: the same for a framing error (a length above max_frame_bytes)
        pytest.param(OVERSIZE_HEADER, id="oversize-length"),
    ],
)
async def test_a_request_before_a_closing_frame_is_answered_and_one_after_it_is_never_decided(
    gateway: Callable[..., GatewayProcess], closing: bytes
) -> None:
    proc = gateway()
    terminal = "TERM2101"
    stan_a, stan_b = next_stan(), next_stan()
    sock = connect(proc.port)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(sale_frame(stan_a, terminal=terminal) + closing + sale_frame(stan_b, terminal=terminal))  # one write
    data, closed = await read_until_closed(reader, timeout=10)
    writer.close()
    answers = {fields.get(11): (mti, fields.get(39)) for mti, fields in split_frames(data)}
    assert proc.signal(signal.SIGTERM) == 0

    records = recorded_stans(proc, terminal)
    seen = {
        "connection closed by the gateway": closed,
        "A answered": answers.get(stan_a),
        "A recorded": stan_a in records,
        "B answered": answers.get(stan_b),
        "B recorded": stan_b in records,
    }
    expected = {
        "connection closed by the gateway": True,
        "A answered": ("0210", "00"),
        "A recorded": True,
        "B answered": None,
        "B recorded": False,
    }
    assert seen == expected, f"A {stan_a} before the closing frame, B {stan_b} after it; ledger: {records}"
    listed = [item for item in unanswered(proc) if item.get("stan") == stan_a]
    assert listed == [], f"A was answered, yet it is listed as unanswered: {listed}"


async def test_a_sale_whose_terminal_vanished_before_its_answer_is_listed_as_unanswered_and_its_reversal_matches(
    gateway: Callable[..., GatewayProcess],
) -> None:
    # design: answered into the void only if committed, and then findable; the terminal's reversal matches it
    proc = gateway()
    terminal = "TERM2102"
    sales: dict[str, dict[int, str]] = {}
    received: set[str] = set()
    for _ in range(10):
        stan = next_stan()
        sales[stan] = sale_fields(stan, terminal=terminal, amount=2_100)
        sock = connect(proc.port)
        sock.sendall(frame("0200", sales[stan]) + echo_frame(next_stan()))
        # the echo's answer proves the sale was read; the sale's own answer waits for the ledger's commit
        data = b""
        while not any(mti == "0810" for mti, _ in split_frames(data)):
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the connection before answering the echo"
            data += chunk
        received.update(fields[11] for mti, fields in split_frames(data) if mti == "0210")
        reset(sock)  # the terminal vanishes (power cut): RST, before the sale's answer

    records = await _wait_for_records(proc, terminal, set(sales))
    booked_unseen = {stan for stan, status in records.items() if status == "approved"} - received
    print(f"vanished terminal: {len(sales)} sales sent, {len(records)} recorded, {len(received)} answers received")
    assert proc.signal(signal.SIGTERM) == 0
    listed = {item["stan"]: item for item in unanswered(proc) if item.get("terminal_id") == terminal}
    assert booked_unseen <= listed.keys(), (
        f"{len(booked_unseen)} sales booked approved and never delivered; listed as unanswered: "
        f"{sorted(listed)}; missing: {sorted(booked_unseen - listed.keys())}"
    )
    # the other way is the safe one, and cannot be ruled out: an answer the terminal read but whose TCP
    # acknowledgement the gateway had not seen yet when the reset came is listed (its operator checks it)
    print(f"listed though received: {sorted(listed.keys() & received)}")

    proc.start()
    pos = await IsoClient.connect(proc.port)
    try:
        # the terminal reverses what it never got an answer for: the first by STAN + DE4 (no DE90), the
        # second by DE90 (original MTI + STAN + DE7)
        for how, stan in zip(("by STAN and amount", "by DE90"), sorted(listed), strict=False):
            original = sales[stan]
            reversal = {**pos.base(2_100, terminal=terminal), 3: "000000"}
            if how == "by DE90":
                reversal[90] = "0200" + stan + original[7] + "0" * 22
            else:
                reversal.update({11: stan, 7: original[7]})
            mti, answer = await pos.send("0400", reversal)
            assert (mti, answer[39]) == ("0410", "00"), f"the reversal {how} of listed sale {stan}: {answer[39]}"
    finally:
        await pos.close()


async def _wait_for_records(
    proc: GatewayProcess, terminal: str, stans: set[str], timeout: float = 5.0
) -> dict[str, str]:
    """The ledger's records of ``stans`` once none of them is still being decided (bounded wait)."""
    deadline = time.monotonic() + timeout
    records = recorded_stans(proc, terminal)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        again = recorded_stans(proc, terminal)
        if again == records and again:
            break
        records = again
    return {stan: status for stan, status in records.items() if stan in stans}


# =========================================================================== kill -9 under load


@dataclass
class Stream:
    """One terminal's connection streaming sales with a window of unanswered requests."""

    terminal: str
    sent: dict[str, dict[int, str]] = field(default_factory=dict)
    answers: dict[str, dict[int, str]] = field(default_factory=dict)


async def _stream_sales(port: int, stream: Stream, stop: asyncio.Event, window: int = 24) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    room = asyncio.Semaphore(window)
    pos = IsoClient(reader, writer, "iso87-binary")

    async def read_answers() -> None:
        while True:
            _, answer = await pos.read(timeout=30)
            stream.answers[answer[11]] = answer
            room.release()

    reading = asyncio.create_task(read_answers())
    try:
        while not stop.is_set() and not reading.done():
            try:
                await asyncio.wait_for(room.acquire(), 0.5)
            except TimeoutError:
                continue
            stan = next_stan()
            fields = sale_fields(stan, terminal=stream.terminal, amount=1_700)
            stream.sent[stan] = fields
            writer.write(frame("0200", fields))
            await writer.drain()
        await asyncio.wait({reading}, timeout=10)  # until the gateway's death ends the connection
    except (ConnectionError, OSError):
        await asyncio.wait({reading}, timeout=10)
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
        writer.close()


async def test_after_kill_9_under_load_every_approval_received_is_recorded_and_every_recorded_one_is_listed_if_unsent(
    gateway: Callable[..., GatewayProcess], record_property: Callable[[str, object], None]
) -> None:
    proc = gateway()
    streams = [Stream(f"TERM23{n:02d}") for n in range(4)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_stream_sales(proc.port, stream, stop)) for stream in streams]
    await async_wait_for(lambda: sum(len(s.answers) for s in streams) >= 2_000, timeout=10, interval=0.05)
    assert proc.process is not None
    proc.process.send_signal(signal.SIGKILL)  # mid-stream
    proc.process.wait(timeout=10)
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=15)
    for task in pending:
        task.cancel()

    proc.start()  # same ledger file
    by_terminal = {s.terminal: s for s in streams}
    rows = ledger_rows(
        proc.db,
        f"SELECT terminal_id, stan, rrn, status, kind FROM txns WHERE merchant_id = ? "
        f"AND terminal_id IN ({', '.join('?' * len(streams))})",
        MERCHANT, *by_terminal,
    )  # fmt: skip
    in_ledger = {(row["terminal_id"], row["stan"]): row for row in rows}
    received = {(s.terminal, stan): a for s in streams for stan, a in s.answers.items() if a.get(39) == "00"}
    approved = {key for key, row in in_ledger.items() if row["kind"] == "purchase" and row["status"] == "approved"}
    sent = sum(len(s.sent) for s in streams)
    figures = {
        "sent": sent,
        "answered": sum(len(s.answers) for s in streams),
        "approved received": len(received),
        "approved in ledger": len(approved),
        "recorded, not received": len(approved - received.keys()),
    }
    record_property("kill9_figures", figures)
    print(f"kill -9 under load: {figures}")

    lost = {key: a[37] for key, a in received.items() if key not in in_ledger or in_ledger[key]["rrn"] != a[37]}
    assert not lost, f"approvals the terminals received are missing from the ledger: {lost}; {figures}"

    listed_items = unanswered(proc)
    listed = {(item["terminal_id"], item["stan"]) for item in listed_items}
    figures["listed unanswered"] = len(listed)
    record_property("kill9_figures", figures)
    unseen = approved - received.keys()
    assert unseen <= listed, f"recorded approved, never received, not listed: {sorted(unseen - listed)}; {figures}"
    # after kill -9 a gateway cannot know which of its last answers arrived: listing one that did is no fault

    if unseen:  # the terminal reverses a sale it got no answer for; the reversal matches the listed record
        terminal, stan = sorted(unseen)[0]
        original = by_terminal[terminal].sent[stan]
        pos = await IsoClient.connect(proc.port)
        try:
            reversal = {**pos.base(1_700, terminal=terminal), 3: "000000", 90: "0200" + stan + original[7] + "0" * 22}
            mti, answer = await pos.send("0400", reversal)
        finally:
            await pos.close()
        assert (mti, answer[39]) == ("0410", "00"), f"the reversal of listed {terminal}/{stan}: {answer[39]}"
        status = ledger_rows(proc.db, "SELECT status FROM txns WHERE merchant_id = ? AND terminal_id = ? AND stan = ?"
                             " AND kind = 'purchase'", MERCHANT, terminal, stan)  # fmt: skip
        assert [row["status"] for row in status] == ["reversed"]
