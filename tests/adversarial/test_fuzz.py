"""Issue 21, build 7: mutated frames of every request kind, in both iso87 profiles, against
``iso-gateway serve``.

One gateway process per profile. Four terminals, each on its own connections, send sessions of 1
to 10 frames: valid requests of every kind (network, pre-authorization, purchase with PAN, track 2
or expiry, void and refund by DE37 or DE90, unreferenced refund, completion, reversal 0400 / 0401 /
0420 / 0421, partial reversal, settlement; voids, refunds, completions and reversals point at
earlier valid sales and pre-authorizations), mutated ones (bit flips, bytes inserted or deleted,
truncation, a length prefix changed, bitmap bits flipped, card data shifted into DE41 / DE42, the
MTI changed, an element overwritten, oversized or zero or non-digit length headers, garbage, the
unreadable 0xFF MTI), and retransmissions, valid and broken ones together in one write or cut into
chunks. A session then half-closes and reads every answer until the gateway closes; or (8%)
vanishes with a reset right after its last write; or (3%) reads late, through a 4 KB receive
buffer, after 100 to 200 echoes that fill it, its chunks 50 ms apart; or (2%) is a pipelining
terminal's burst: 100 to 200 valid requests in one write, then the half-close. The client reads
with a plain socket: a write refused because the gateway closed first must not throw away the
answers already in its kernel (the gateway counts them delivered once they are acknowledged).

Checked, each failure saying the seed, the session and its frames:

- the process never dies, and exits 0 on SIGTERM; no ``request.crashed`` and no error line;
- every answer decodes with pyiso8583's own spec, its MTI answers a request of the session (0200 ->
  0210, 0401 -> 0410), it carries DE39, and DE11 as the request had it; every request before the
  first frame that may close the connection is answered, none after one that must close it is
  decided; the gateway closes each connection within ``HANG_S`` of the client's half-close;
- every ledger record approved (``status`` approved, or answered 00 before a void or reversal
  changed it) was answered to its terminal (terminal, STAN and MTI class, or RRN) or is listed by
  ``iso-gateway transactions --unanswered --json``;
- no log line and no event (received over MQTT, or in the outbox table) gives away a card number
  the frames carried: the PANs of DE2 and DE35 before mutation (the check of
  ``test_card_data_in_logs.py``: the whole line's digits, each value, neighbouring values either way
  round), and every Luhn-valid 13-19 digit run of the mutated bytes and every DE2 / DE35 they
  decode to (each value; see ``fuzzing.given_away``).

Bounded: ``FUZZ_FRAMES`` frames per profile (default 6,000, a quarter per terminal; the echoes that
fill a late reader's buffer are not counted) or ``FUZZ_SECONDS`` of sending per profile (default
15; 1,800 when ``FUZZ_FRAMES`` is set), whichever comes first: about 25 s for both profiles on a
2-core machine. Each terminal draws from ``random.Random(f"{FUZZ_SEED}/{profile}/{terminal}")``
(``FUZZ_SEED`` default 21), so its frames are the same from run to run but for the RRNs it quotes.
Failing sessions are written to ``failed-sessions.jsonl``, every failure to ``failures.txt``, in
the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import iso8583
import pytest
from fuzzing import (
    PANS,
    PROFILES,
    SPECS,
    Item,
    Mutator,
    Requests,
    card_numbers_in,
    cut,
    decode_partial,
    frame,
    given_away,
    mti_of,
    response_mti,
)
from harness import MERCHANT, GatewayProcess
from hostile import ledger_rows, unanswered

from gateway.adapters.mqtt import parse_mqtt_url

SEED = int(os.environ.get("FUZZ_SEED", "21"))
_FRAMES_SET = bool(os.environ.get("FUZZ_FRAMES"))
FRAMES = int(os.environ.get("FUZZ_FRAMES") or 6_000)
SECONDS = float(os.environ.get("FUZZ_SECONDS") or (1_800 if _FRAMES_SET else 15))
WORKERS = 4
#: the gateway must close a half-closed connection within this (it answers in milliseconds)
HANG_S = 15.0
#: how much of a frame a failure message shows
SHOWN = 400
#: a DE11 that pyiso8583 could not read out of a frame (see ``fuzzing.decode_partial``)
UNKNOWN = "unknown"


@dataclass
class Session:
    """One connection: the frames it sent, how, and what came back."""

    worker: int
    number: int
    items: list[Item]
    chunks: list[bytes]
    pauses: list[float]
    vanish: bool
    #: reads late through a 4 KB receive buffer, after ``filler`` echoes that fill it
    late: bool = False
    filler: int = 0
    #: 100 to 200 valid requests in one write, then the half-close
    burst: bool = False
    received: bytes = b""
    write_failed: bool = False
    #: the gateway reset the connection (after the answers that were read)
    reset: bool = False
    #: when this client reset the connection (vanish), by the clock of the gateway's log lines
    reset_at: float = 0.0
    hung: bool = False

    @property
    def stream(self) -> bytes:
        return b"".join(self.chunks)

    def describe(self, profile: str) -> str:
        frames = "; ".join(f"{item.label}: {item.data.hex()[:SHOWN]}" for item in self.items)
        sizes = [len(chunk) for chunk in self.chunks]
        how = "one write" if len(sizes) == 1 else f"writes of {sizes} bytes"
        if self.vanish:
            how += ", vanished"
        if self.burst:
            how += f", a burst of {len(self.items)} valid requests, then the half-close"
        if self.late:
            how += f", read late through a 4 KB buffer, {self.filler} echoes first"
            frames = "; ".join(f"{item.label}: {item.data.hex()[:SHOWN]}" for item in self.items[self.filler :])
        return f"seed {SEED}, {profile}, worker {self.worker}, session {self.number} ({how}): {frames}"


@dataclass
class Run:
    profile: str
    proc: GatewayProcess
    deadline: float
    sessions: list[Session] = field(default_factory=list)
    frames_sent: int = 0
    #: echoes that fill a late reader's receive buffer (not counted in ``frames_sent``)
    filler: int = 0
    failures: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    #: every answer received: (mti, fields)
    answers: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    died: int | None = None
    #: sessions a failure names, written to ``failed-sessions.jsonl`` to be replayed
    failed: list[Session] = field(default_factory=list)

    def fail(self, what: str, detail: str, session: Session | None = None) -> None:
        self.failures[what].append(detail)
        if session is not None and session not in self.failed:
            self.failed.append(session)

    def going(self, sent: int) -> bool:
        """Whether a terminal that sent ``sent`` frames goes on."""
        return self.died is None and sent < FRAMES // WORKERS and time.monotonic() < self.deadline


# --------------------------------------------------------------------------- sessions


def make_session(rng: random.Random, requests: Requests, mutator: Mutator, worker: int, number: int) -> Session:
    profile = requests.profile
    shape = rng.random()
    vanish, late, burst = shape < 0.08, 0.08 <= shape < 0.11, 0.11 <= shape < 0.13
    items: list[Item] = []
    for _ in range(rng.randint(100, 200) if burst else rng.randint(1, 10)):
        draw = rng.random()
        if draw < 0.05 and items and not burst:
            again = rng.choice(items)
            items.append(Item(again.data, f"again({again.label})", again.request))
        elif draw < 0.40 or burst:
            request = requests.make()
            items.append(Item(frame(profile, request.payload), f"valid {request.kind}", request))
        else:
            request = requests.make(remember=False)
            mutated = mutator.mutate(request)
            items.append(Item(mutated.data, f"{request.kind}: {mutated.label}", request))
    filler = rng.randint(100, 200) if late else 0
    echoes = [requests.make(kind="network-echo") for _ in range(filler)]
    items = [Item(frame(profile, echo.payload), "filler echo", echo) for echo in echoes] + items
    stream = b"".join(item.data for item in items)
    if (rng.random() < 0.5 and not late) or burst or len(stream) < 2:
        chunks = [stream]
    else:
        first = sum(len(item.data) for item in items[: filler + 1]) if late else 1
        cuts = sorted({first, *rng.sample(range(1, len(stream)), min(rng.randint(1, 4), len(stream) - 1))})
        cuts = [at for at in cuts if 0 < at < len(stream)]
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pauses = [rng.choice([0.0, 0.0, 0.001, 0.005]) for _ in chunks]
    if vanish or burst:
        # vanish: back to back, then a reset: within microseconds, before any decision reaches the
        # ledger, so that no answer is acknowledged by this side's kernel and left unread (it would
        # count as delivered, rightly, and be listed nowhere); burst: a pipelining terminal's batch,
        # then its half-close
        pauses = [0.0] * len(chunks)
    if late:
        # the gateway has closed for a bad frame by the time the next chunk comes
        pauses = [0.05] * len(chunks)
    return Session(worker, number, items, chunks, pauses, vanish, late, filler, burst)


async def play(port: int, session: Session) -> None:
    """Send the session's chunks; then vanish (RST at once), or half-close and read until the gateway
    closes (at most HANG_S). A plain socket, not asyncio's streams: a write refused because the gateway
    closed must not throw away the answers already in the kernel's receive queue (the gateway counts
    them delivered once the kernel acknowledged them)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if session.late:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        for chunk, pause in zip(session.chunks, session.pauses, strict=True):
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), HANG_S)
            except OSError:
                session.write_failed = True  # the gateway closed first: allowed
                break
            if pause:
                await asyncio.sleep(pause)
        if session.vanish:
            with contextlib.suppress(OSError):
                session.received = sock.recv(1 << 20, socket.MSG_DONTWAIT)  # what came already (echoes)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            session.reset_at = time.time()
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            async with asyncio.timeout(HANG_S):
                while data := await loop.sock_recv(sock, 65536):
                    received += data
        except TimeoutError:
            session.hung = True
        except OSError:
            session.reset = True  # by the gateway: what it had sent before was read
        session.received = bytes(received)
    finally:
        sock.close()


def check_answers(run: Run, session: Session, requests: Requests) -> None:
    """Every answer of a session is well-formed and answers one of its requests, and every request
    before a frame that may close the connection is answered (see the module docstring). A session
    that vanished is held to what it read before its reset."""
    profile = run.profile
    shown = session.describe(profile)
    if session.hung:
        run.fail("hang", f"the connection was still open {HANG_S:.0f}s after the half-close; {shown}", session)
    framed = cut(profile, session.stream)
    # what each frame must be answered with: (answer MTI, DE11) by pyiso8583's reading of the frame;
    # UNKNOWN: pyiso8583 could not say what it read (any DE11 or none will do)
    expected: list[tuple[str | None, str | None]] = []
    for payload in framed.payloads:
        doc = decode_partial(profile, payload)
        stan = UNKNOWN if doc is None else doc.get("11")
        if stan != UNKNOWN and not (isinstance(stan, str) and len(stan) == 6 and stan.isascii() and stan.isdigit()):
            stan = None
        mti = mti_of(payload)
        expected.append((response_mti(mti) if mti else None, stan))
    # the first frame that must close the connection (no readable MTI), and the first that may (a
    # response MTI: ignored when it decodes, closing when it does not)
    must_close = next((n for n, p in enumerate(framed.payloads) if mti_of(p) is None), len(framed.payloads))
    may_close = next((n for n, (answer, _) in enumerate(expected) if answer is None), len(framed.payloads))

    # the gateway closed before the client's last write (its kernel answers that write with a reset,
    # which throws away what it had not sent yet: answers may be missing or cut short)
    reset = " (the client wrote after the gateway closed)" if session.reset or session.write_failed else ""
    got = cut(profile, session.received)
    if (got.error or got.rest) and not session.vanish:
        run.fail(f"malformed answer{reset}", f"answers cannot be framed ({got.error or f'{got.rest} bytes left'}"
                 f"): {session.received.hex()[-SHOWN:]}; {shown}", session)  # fmt: skip
    matched: dict[int, tuple[str, dict[str, str]]] = {}
    for body in got.payloads:
        try:
            doc, _ = iso8583.decode(body, SPECS[profile])
        except iso8583.DecodeError as exc:
            run.fail("malformed answer", f"pyiso8583 cannot decode an answer ({exc.msg}, field {exc.field}): "
                     f"{body.hex()[:SHOWN]}; {shown}", session)  # fmt: skip
            continue
        mti, fields = doc["t"], {k: v for k, v in doc.items() if k.isdigit() and k != "1"}
        run.answers.append((mti, fields))
        if len(fields.get("39", "")) != 2:
            run.fail("malformed answer", f"answer {mti} without DE39: {fields}; {shown}", session)
        key = (mti, fields.get("11"))
        index = next((n for n, exp in enumerate(expected) if exp == key and n not in matched), None)
        if index is None:
            index = next((n for n, exp in enumerate(expected) if exp == (mti, UNKNOWN) and n not in matched), None)
        if index is None:
            run.fail("answer to no request", f"answer {mti} DE11 {fields.get('11')!r} DE39 {fields.get('39')!r} "
                     f"matches no request sent (expected {expected}); {shown}", session)  # fmt: skip
            continue
        matched[index] = (mti, fields)
        if index > must_close:
            run.fail("decided after a closing frame", f"frame {index} answered {fields.get('39')!r} though frame "
                     f"{must_close} has no readable MTI; {shown}", session)  # fmt: skip
    unanswered_frames = [n for n in range(min(must_close, may_close)) if n not in matched]
    if unanswered_frames and not session.vanish:
        wanted = [expected[n] for n in unanswered_frames]
        run.fail(f"request not answered{reset}", f"frames {unanswered_frames} (expected {wanted}) got no answer "
                 f"before any closing frame; {shown}", session)  # fmt: skip
    valid = {item.data: item for item in session.items if item.label.startswith("valid")}
    for index, (mti, fields) in matched.items():
        if frame(profile, framed.payloads[index]) in valid:  # an original's RRN, for later voids and refunds
            requests.answered(mti, {int(k): v for k, v in fields.items()})


async def worker(run: Run, number: int) -> None:
    profile = run.profile
    rng = random.Random(f"{SEED}/{profile}/{number}")
    terminal = f"FZ{profile[6].upper()}{number:05d}"  # FZB00001 / FZA00001
    requests = Requests(profile, rng, terminal, MERCHANT, first_stan=0)
    mutator = Mutator(profile, rng)
    assert run.proc.process is not None
    sessions = sent = 0
    while run.going(sent):
        sessions += 1
        session = make_session(rng, requests, mutator, number, sessions)
        sent += len(session.items) - session.filler
        run.frames_sent += len(session.items) - session.filler
        run.filler += session.filler
        run.sessions.append(session)
        try:
            await play(run.proc.port, session)
        except (TimeoutError, OSError) as exc:
            run.fail("connect", f"{type(exc).__name__}: {exc}; {session.describe(profile)}", session)
        check_answers(run, session, requests)
        code = run.proc.process.poll()
        if code is not None:
            run.died = code
            run.fail("process died", f"exit code {code} after {session.describe(profile)}", session)


# --------------------------------------------------------------------------- after the run


def check_ledger(run: Run) -> dict[str, int]:
    """Every approved record was answered to its terminal or is listed as unanswered.

    One exception: a session that vanished may have had an answer acknowledged by its kernel
    between its last read and its reset (the OS can pause the test there for milliseconds), and the
    gateway then rightly counts it delivered. So an approval of a vanished session that the gateway
    logged (just before writing its answer) before the reset is not held against it."""
    rows = ledger_rows(
        run.proc.db,
        "SELECT id, kind, mti, mti_class, merchant_id, terminal_id, stan, rrn, status, response_code FROM txns "
        "WHERE status = 'approved' OR response_code = '00'",
    )
    approved_answers = [(mti, fields) for mti, fields in run.answers if fields.get("39") == "00"]
    by_key = {(fields.get("42", "").strip(), fields.get("41", "").strip(), fields.get("11"),
               f"{mti[:2]}{int(mti[2]) - 1}") for mti, fields in approved_answers}  # fmt: skip
    by_rrn = {fields["37"] for _, fields in approved_answers if "37" in fields}
    listed = {item["id"] for item in unanswered(run.proc)}
    answered = {row["id"] for row in rows if row["rrn"] in by_rrn
                or (row["merchant_id"], row["terminal_id"], row["stan"], row["mti_class"]) in by_key}  # fmt: skip
    missing = [row for row in rows if row["id"] not in answered and row["id"] not in listed]
    logged = answer_times(run) if missing else {}
    excused = 0
    for row in missing:
        carriers = [s for s in run.sessions
                    if any(i.request and i.request.fields.get(11) == row["stan"]
                           and i.request.fields.get(41) == row["terminal_id"] for i in s.items)]  # fmt: skip
        if not carriers:  # a mutated frame: its ids as the wire has them
            wire = (row["terminal_id"].ljust(8) + row["merchant_id"].ljust(15)).encode("latin-1", "replace")
            carriers = [s for s in run.sessions if wire in s.stream]
        at = logged.get((row["terminal_id"], row["stan"], row["mti"]))
        if carriers and at is not None and all(s.vanish and at < s.reset_at for s in carriers):
            excused += 1
            continue
        run.fail("approved, not answered, not listed",
                 f"{dict(row)}; sent in: {[s.describe(run.profile) for s in carriers[:2]]}", *carriers[:1])
    return {"approved records": len(rows), "answered": len(answered), "listed unanswered": len(listed),
            "listed though answered": len(answered & listed), "answered before a vanishing client's reset": excused}


def answer_times(run: Run) -> dict[tuple[str, str, str], float]:
    """(terminal, STAN, MTI) -> when the gateway first logged the request's answer (``message.processed``)."""
    times: dict[tuple[str, str, str], float] = {}
    for line in run.proc.logs().splitlines():
        if '"message.processed"' not in line:
            continue
        doc = json.loads(line)
        key = (str(doc.get("terminal") or "").strip(), str(doc.get("stan")), str(doc.get("mti")))
        when = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
        times[key] = min(when, times.get(key, when))
    return times


def card_numbers(run: Run) -> set[str]:
    found: set[str] = set()
    for session in run.sessions:
        stream = session.stream
        found |= card_numbers_in(run.profile, stream, cut(run.profile, stream).payloads)
    return found


def check_text(run: Run, where: str, text: str, cards: set[str]) -> None:
    """``text`` (a log line, an event's topic or payload) gives no card number away."""
    given = given_away(text, set(PANS), cards)
    if given:
        sent = carrier(run, text) if len(run.failures[f"card number in {where}"]) < 3 else None
        shown = f"; sent in: {sent.describe(run.profile)}" if sent else ""
        run.fail(f"card number in {where}", f"{sorted(given)} in {text[:600]}{shown}", sent)


def carrier(run: Run, text: str) -> Session | None:
    """The first session with a frame that pyiso8583 reads as the MTI, terminal and merchant ids of a
    log line or event (DE41 and DE42 as the wire has them)."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    ids = document.get("data", document)
    terminal, merchant = ids.get("terminal", ids.get("terminal_id")), ids.get("merchant", ids.get("merchant_id"))
    mti = ids.get("mti", (ids.get("request") or {}).get("mti", ""))
    if not isinstance(terminal, str) or not isinstance(merchant, str) or not isinstance(mti, str):
        return None
    wire = terminal.strip().encode("latin-1", "replace")
    for session in run.sessions:
        if wire not in session.stream:
            continue
        for payload in cut(run.profile, session.stream).payloads:
            if payload.startswith(mti.encode()) and wire in payload:
                doc = decode_partial(run.profile, payload) or {}
                if (doc.get("41", "").strip(), doc.get("42", "").strip()) == (terminal.strip(), merchant.strip()):
                    return session
    return None


def check_logs(run: Run, cards: set[str]) -> int:
    lines = run.proc.logs().splitlines()
    for line in lines:
        check_text(run, "a log line", line, cards)
        if not line.startswith("{"):
            run.fail("not a JSON log line", line[:600])
        elif any(mark in line for mark in ('"request.crashed"', '"level":"error"', '"level":"critical"')):
            run.fail("error logged", line[:600])
    return len(lines)


def outbox(run: Run) -> Iterator[tuple[str, str]]:
    for row in ledger_rows(run.proc.db, "SELECT topic, payload FROM outbox"):
        payload = row["payload"]
        yield row["topic"], payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)


async def collect_events(url: str, prefix: str, into: list[tuple[str, str]], ready: asyncio.Event) -> None:
    address = parse_mqtt_url(url)
    async with aiomqtt.Client(address.host, address.port, identifier=f"fuzz-{uuid.uuid4().hex[:12]}", timeout=5) as c:
        await c.subscribe(f"{prefix}/#", qos=1)
        ready.set()
        async for message in c.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            into.append((message.topic.value, bytes(payload).decode("utf-8", "replace")))


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(int(SECONDS * 2 + 240))
@pytest.mark.parametrize("profile", PROFILES)
async def test_mutated_frames_of_every_kind_never_crash_hang_misanswer_lose_an_approval_or_leak_a_card_number(
    profile: str, tmp_path: Path, mqtt_broker_url: str, record_property: Any
) -> None:
    proc = GatewayProcess(tmp_path, mqtt_broker_url, profile=profile,
                          env={"GATEWAY_POLICY__UNREFERENCED_REFUND_TERMINALS": '["*"]'})  # fmt: skip
    events: list[tuple[str, str]] = []
    ready = asyncio.Event()
    prefix = proc.env["GATEWAY_MQTT_TOPIC_PREFIX"]
    collector = asyncio.create_task(collect_events(mqtt_broker_url, prefix, events, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        proc.start()
        assert proc.process is not None
        started = time.monotonic()
        run = Run(profile, proc, deadline=started + SECONDS)
        await asyncio.gather(*(worker(run, n) for n in range(1, WORKERS + 1)))
        sending = time.monotonic() - started
        code = proc.process.poll()
        if run.died is None and code is not None:
            run.died = code
            run.fail("process died", f"exit code {code} at the end of the run")
        if run.died is None:
            code = proc.signal(signal.SIGTERM)
            if code != 0:
                run.fail("exit code", f"SIGTERM: exit code {code}, not 0")
        with contextlib.suppress(TimeoutError):  # the last events the relay published before it stopped
            async with asyncio.timeout(3):
                count = -1
                while count != len(events):
                    count = len(events)
                    await asyncio.sleep(0.5)
    finally:
        collector.cancel()
        with contextlib.suppress(BaseException):
            await collector
        proc.kill()

    figures: dict[str, Any] = {
        "profile": profile, "seed": SEED, "frames": run.frames_sent, "connections": len(run.sessions),
        "sending_s": round(sending, 1), "answers": len(run.answers),
        "answer codes": dict(collections.Counter(f.get("39") for _, f in run.answers).most_common(8)),
        "vanished": sum(s.vanish for s in run.sessions), "read late": sum(s.late for s in run.sessions),
        "bursts": sum(s.burst for s in run.sessions),
        "filler echoes": run.filler, "write refused": sum(s.write_failed for s in run.sessions),
        "reset by the gateway": sum(s.reset for s in run.sessions),
    }  # fmt: skip
    if run.died is None:
        figures.update(check_ledger(run))
    cards = card_numbers(run)
    figures["card numbers looked for"] = len(cards)
    figures["log lines"] = check_logs(run, cards)
    stored = list(outbox(run))
    for topic, payload in [*events, *stored]:
        check_text(run, "an event", topic, cards)
        check_text(run, "an event", payload, cards)
    figures["events received"], figures["events stored"] = len(events), len(stored)
    figures["checking_s"] = round(time.monotonic() - started - sending, 1)
    record_property("fuzz_figures", figures)
    print(f"fuzz {figures}")
    if run.failed:
        replay = tmp_path / "failed-sessions.jsonl"
        replay.write_text("".join(json.dumps({
            "profile": profile, "seed": SEED, "worker": s.worker, "session": s.number, "vanish": s.vanish,
            "labels": [item.label for item in s.items], "chunks": [chunk.hex() for chunk in s.chunks],
            "pauses": s.pauses, "received": s.received.hex()}) + "\n" for s in run.failed))  # fmt: skip
        figures["failed sessions"] = str(replay)
    if run.failures:
        (tmp_path / "failures.txt").write_text("".join(f"{what}: {detail}\n" for what, found in run.failures.items()
                                                       for detail in found))  # fmt: skip
    summary = {what: len(found) for what, found in run.failures.items()}
    details = "\n".join(f"- {what}: {found[0]}" for what, found in run.failures.items())
    if run.failures:
        pytest.fail(f"seed {SEED}, {profile}: {summary}; first of each:\n{details}\n{figures}", pytrace=False)
