"""Load mode: many terminals on many connections, as fast as a single Python process can go.

What keeps it cheap per message (so it measures the host, not itself):
- requests are encoded once per kind as templates (built by the profile's dialect); each send copies
  the template and patches the fixed-width bytes of STAN (DE11), times (DE7/12/13) and references
  (iso87 DE37, DE90; cup 37, 61 and the reversal's repeated DE11) in place;
- responses are not fully decoded: a scanner walks the bitmap and reads only DE11, DE37 and DE39
  (every response code is still counted);
- asyncio protocols (uvloop when installed), several requests in flight per connection if asked
  (``pipeline``), and all the requests a read makes due written with one ``write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import iso8583

from . import messages
from .codec import IsoMessage, pyiso8583_document
from .dialects import Card, Dialect, LoadReference, Station, dialect_for
from .errors import UsageError
from .framing import FrameDecoder, FramingError, encode_length
from .messages import Stamp
from .profile import WireProfile

__all__ = [
    "KINDS",
    "LoadConfig",
    "LoadStats",
    "ResponseScanner",
    "Template",
    "parse_mix",
    "percentile",
    "run_load",
]

KINDS = ("purchase", "refund", "void", "reversal")

_PLACEHOLDER = Stamp(stan="000000", transmitted="0000000000", local_time="000000", local_date="0000")


@dataclass(frozen=True, slots=True)
class LoadConfig:
    host: str = "127.0.0.1"
    port: int = 8583
    connections: int = 4
    duration: float | None = 10.0
    count: int | None = None
    pipeline: int = 1
    rate: float | None = None  # total requests per second (open loop); None = closed loop
    mix: Mapping[str, int] = field(default_factory=lambda: {"purchase": 100})
    amount: int = 1000
    currency: str | None = None  # None: the dialect's
    mid: str = "MERCHANT0000001"
    tid_prefix: str = "L"
    pan: str | None = None  # None: the dialect's test card
    tpdu: bytes | None = None  # None: the profile's
    response_timeout: float = 10.0
    seed: int | None = None


def parse_mix(text: str) -> dict[str, int]:
    """``"purchase=70,refund=10,void=10,reversal=10"`` -> weights (kinds: purchase, refund, void,
    reversal; ``sale`` is accepted for ``purchase``)."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = "purchase" if name.strip() == "sale" else name.strip()
        if name not in KINDS:
            raise UsageError(f"unknown transaction kind {name!r} in --mix (use {', '.join(KINDS)})")
        try:
            value = int(weight) if weight else 1
        except ValueError:
            raise UsageError(f"--mix weight for {name} must be an integer") from None
        if value < 0:
            raise UsageError("--mix weights must not be negative")
        mix[name] = mix.get(name, 0) + value
    if not mix or sum(mix.values()) == 0:
        raise UsageError("--mix needs at least one kind with a positive weight")
    return mix


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


# --- templates ----------------------------------------------------------------------------------
def _value_bytes(spec: Mapping[str, Any], value: str) -> bytes:
    if spec["data_enc"] == "b":
        return bytes.fromhex(value)
    return value.encode(spec["data_enc"])


class Template:
    """A pre-encoded request frame, cut around its patchable fixed-width fields.

    :meth:`render` joins the static pieces with new field values (one ``bytes.join``), so a request
    costs no encoding at all; :meth:`value` encodes a field value and checks it keeps its width.
    """

    __slots__ = ("_fields", "_pieces", "frame", "offsets", "specs")

    def __init__(
        self, profile: WireProfile, message: IsoMessage, patchable: Sequence[int] = (7, 11, 12, 13, 37, 61, 90),
        tpdu: bytes | None = None,
    ) -> None:
        doc = pyiso8583_document(profile, message)
        encoded, doc_enc = iso8583.encode(doc, profile.spec)
        framing = profile.framing
        prefix_len = framing.header_size + (5 if framing.tpdu is not None else 0)
        body = bytes(encoded)
        length = len(body) + (5 if framing.tpdu is not None else 0)
        if framing.length_includes_header:
            length += framing.header_size
        self.frame = encode_length(length, framing) + ((tpdu or framing.tpdu) if framing.tpdu else b"") + body
        self.offsets: dict[int, tuple[int, int]] = {}
        self.specs: dict[int, Mapping[str, Any]] = {}
        pos = prefix_len
        order = ["h", "t", "p"] + (["1"] if "1" in doc_enc else [])
        order += [str(n) for n in sorted(int(k) for k in doc_enc if k.isdigit() and k != "1")]
        for key in order:
            part = doc_enc.get(key)
            if part is None:
                continue
            pos += len(part["len"])
            if key.isdigit():
                self.offsets[int(key)] = (pos, len(part["data"]))
                self.specs[int(key)] = profile.spec[key]
            pos += len(part["data"])
        if pos != len(self.frame):
            raise ValueError("template layout does not add up")  # pragma: no cover - pyiso8583 invariant
        self._fields = tuple(n for n in sorted(self.offsets) if n in patchable)
        pieces: list[bytes] = []
        cursor = 0
        for number in self._fields:
            start, size = self.offsets[number]  # a variable field keeps its length prefix: same size only
            pieces.append(self.frame[cursor:start])
            cursor = start + size
        pieces.append(self.frame[cursor:])
        self._pieces = tuple(pieces)

    @property
    def fields(self) -> tuple[int, ...]:
        """The patchable fields present in this template, in frame order."""
        return self._fields

    def value(self, number: int, text: str) -> bytes:
        """``text`` encoded as field ``number`` is on the wire; it must keep the field's width."""
        data = _value_bytes(self.specs[number], text)
        if len(data) != self.offsets[number][1]:
            raise ValueError(f"patched field {number} must keep its size")
        return data

    def render(self, values: Mapping[int, bytes]) -> bytes:
        """The frame with every patchable field replaced by ``values[field]`` (already encoded)."""
        pieces = self._pieces
        parts = [pieces[0]]
        for index, number in enumerate(self._fields, 1):
            parts.append(values[number])
            parts.append(pieces[index])
        return b"".join(parts)


# --- response scanner ---------------------------------------------------------------------------
class ResponseScanner:
    """Reads DE11, DE37 and DE39 (ASCII/text encodings) from a response body without decoding it."""

    __slots__ = ("_bitmap_hex", "_bitmap_len", "_layout", "_plans", "_stan_hex", "_start")

    WANTED = (11, 37, 39)

    def __init__(self, profile: WireProfile) -> None:
        spec = profile.spec
        h = spec["h"]
        if h["max_len"] > 0 and h["len_type"] != 0:
            raise UsageError("load mode needs a fixed-length message header")
        header = h["max_len"] if h["len_type"] == 0 else 0
        self._start = header + spec["t"]["max_len"]  # bytes, whether ASCII digits or BCD
        p = spec["p"]
        self._bitmap_hex = p["data_enc"] != "b"
        self._bitmap_len = 16 if self._bitmap_hex else 8
        # (len_type, len_enc, fixed byte length or -1, nibbles?, data_enc) for fields 2..39
        self._layout: dict[int, tuple[int, str, int, bool, str]] = {}
        for n in range(2, max(self.WANTED) + 1):
            fs = spec.get(str(n))
            if fs is None:
                continue
            nibbles = fs.get("len_count", "bytes") == "nibbles"
            fixed = -1
            if fs["len_type"] == 0:
                fixed = (fs["max_len"] + 1) // 2 if nibbles else fs["max_len"]
            self._layout[n] = (fs["len_type"], fs["len_enc"], fixed, nibbles, fs["data_enc"])
        self._plans: dict[int, tuple[int, ...]] = {}
        self._stan_hex = spec["11"]["data_enc"] == "b"

    def scan(self, body: bytes) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(STAN, RRN, response code) as raw text bytes; ``None`` when absent."""
        pos = self._start
        raw_bitmap = body[pos : pos + self._bitmap_len]
        bitmap = int(raw_bitmap, 16) if self._bitmap_hex else int.from_bytes(raw_bitmap, "big")
        pos += self._bitmap_len
        if bitmap >> 63:
            pos += self._bitmap_len
        plan = self._plans.get(bitmap)
        if plan is None:
            plan = tuple(n for n in range(2, 40) if bitmap >> (64 - n) & 1)
            self._plans[bitmap] = plan
        stan = rrn = code = None
        layout = self._layout
        for n in plan:
            len_type, len_enc, size, nibbles, _ = layout[n]
            if size < 0:
                raw_len = body[pos : pos + len_type]
                if len_enc == "b":
                    size = int.from_bytes(raw_len, "big")
                elif len_enc == "bcd":
                    size = int(raw_len.hex())
                else:
                    size = int(raw_len)
                if nibbles:
                    size = (size + 1) // 2
                pos += len_type
            if n == 11:
                stan = body[pos : pos + size]
            elif n == 37:
                rrn = body[pos : pos + size]
            elif n == 39:
                code = body[pos : pos + size]
                break
            pos += size
        if self._stan_hex and stan is not None:  # BCD profiles: hand back text like the ASCII ones
            stan = stan.hex().encode()
        return stan, rrn, code


# --- statistics ---------------------------------------------------------------------------------
@dataclass(slots=True)
class LoadStats:
    sent: int = 0
    received: int = 0
    timeouts: int = 0
    errors: int = 0
    late: int = 0
    response_codes: Counter[str] = field(default_factory=Counter)
    sent_by_kind: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def summary(self, config: LoadConfig) -> dict[str, Any]:
        duration = max(self.finished - self.started, 1e-9)
        ordered = sorted(self.latencies_ms)
        return {
            "tps": round(self.received / duration, 1),
            "p50_ms": round(percentile(ordered, 50), 3),
            "p95_ms": round(percentile(ordered, 95), 3),
            "p99_ms": round(percentile(ordered, 99), 3),
            "max_ms": round(ordered[-1], 3) if ordered else 0.0,
            "response_codes": dict(sorted(self.response_codes.items())),
            "errors": self.errors,
            "timeouts": self.timeouts,
            "sent": self.sent,
            "received": self.received,
            "duration_s": round(duration, 3),
            "late": self.late,
            "sent_by_kind": dict(sorted(self.sent_by_kind.items())),
            "connections": config.connections,
            "pipeline": config.pipeline,
            "target_rate": config.rate,
        }


# --- the generator ------------------------------------------------------------------------------
class _Clock:
    """DE7/DE12/DE13 (those the profile has), as text and as wire bytes, recomputed once per second."""

    __slots__ = ("_encode", "_numbers", "_second", "stamp", "values")

    def __init__(self, encode: Callable[[int, str], bytes], numbers: Sequence[int]) -> None:
        self._encode = encode
        self._numbers = frozenset(numbers)
        self._second = -1
        self.stamp = _PLACEHOLDER
        self.values: dict[int, bytes] = {}

    def now(self) -> Stamp:
        second = int(time.time())
        if second != self._second:
            self._second = second
            st = messages.stamp(0, datetime.fromtimestamp(second, UTC))
            self.stamp = st
            texts = {7: st.transmitted, 12: st.local_time, 13: st.local_date}
            self.values = {n: self._encode(n, t) for n, t in texts.items() if n in self._numbers}
        return self.stamp


class _Terminal(asyncio.Protocol):
    """One load terminal on one connection."""

    def __init__(self, run: _Run, index: int) -> None:
        self.run = run
        self.tid = f"{run.config.tid_prefix}{index:0{8 - len(run.config.tid_prefix)}d}"[:8]
        self.templates = run.build_templates(self.tid)
        self.decoder = FrameDecoder(run.profile.framing)
        self.transport: asyncio.Transport | None = None
        self.inflight: dict[bytes, tuple[float, str, tuple[str, str, str] | None]] = {}
        self.approved: deque[tuple[str, str, str, bytes]] = deque(maxlen=4096)  # (stan, DE7, date, rrn)
        self.stan = 0
        rng = random.Random(None if run.config.seed is None else run.config.seed + index)
        cycle = [k for k, w in run.config.mix.items() for _ in range(w)]
        rng.shuffle(cycle)
        self.kinds = itertools.cycle(cycle)
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        run = self.run
        stats = run.stats
        now = time.perf_counter()
        try:
            bodies = self.decoder.feed(data)
        except FramingError:
            stats.errors += 1 + len(self.inflight)
            self._forget_all()
            self._abort()
            return
        scan = run.scanner.scan
        for body in bodies:
            try:
                stan, rrn, code = scan(body)
            except (ValueError, IndexError, TypeError):
                stats.errors += 1
                continue
            entry = self.inflight.pop(stan, None) if stan is not None else None
            if entry is None:
                stats.late += 1
                continue
            started, kind, ref = entry
            run.answered(1)
            stats.received += 1
            stats.latencies_ms.append((now - started) * 1000.0)
            text = code.decode("ascii", "replace") if code is not None else "none"
            stats.response_codes[text] += 1
            if kind == "purchase" and text == "00" and ref is not None:
                self.approved.append((ref[0], ref[1], ref[2], rrn or b"000000000000"))
        if run.closed_loop:
            self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.run.stats.errors += len(self.inflight)
            self._forget_all()
        self.closed = True
        self.run.connection_done()

    # sending
    def fill(self) -> None:
        run = self.run
        want = run.config.pipeline - len(self.inflight)
        if want <= 0 or self.closed or not run.sending:
            return
        frames = [self._next_frame() for _ in range(min(want, run.budget()))]
        if frames and self.transport is not None:
            self.transport.write(b"".join(frames))

    def send_one(self) -> bool:
        if self.closed or len(self.inflight) >= self.run.config.pipeline or self.transport is None:
            return False
        self.transport.write(self._next_frame())
        return True

    def _next_frame(self) -> bytes:
        run = self.run
        self.stan = self.stan % 999_999 + 1
        stan = f"{self.stan:06d}"
        clock = run.clock.now()
        kind = next(self.kinds)
        original: tuple[str, str, str, bytes] | None = None
        if kind != "purchase":
            if self.approved:
                original = self.approved.popleft()
            else:
                kind = "purchase"
        template = self.templates[kind]
        values = dict(run.clock.values)
        references: dict[int, str] = {11: stan}
        if original is not None:
            ref = LoadReference(original[0], original[1], original[3].decode("ascii", "replace"), original[2])
            references.update(run.dialect.load_reference(kind, ref, 1))
        stan = references[11]  # a UnionPay reversal repeats its original's STAN
        key = stan.encode()
        for number, text in references.items():
            values[number] = key if number == 11 and run.ascii_stan else template.value(number, text)
        sale = (stan, clock.transmitted, clock.local_date) if kind == "purchase" else None
        self.inflight[key] = (time.perf_counter(), kind, sale)
        run.stats.sent += 1
        run.inflight_total += 1
        run.stats.sent_by_kind[kind] += 1
        return template.render(values)

    def expire(self, deadline: float) -> None:
        expired = [k for k, (started, _, _) in self.inflight.items() if started < deadline]
        for key in expired:
            del self.inflight[key]
        if expired:
            self.run.stats.timeouts += len(expired)
            self.run.answered(len(expired))
            if self.run.closed_loop:
                self.fill()

    def _forget_all(self) -> None:
        count = len(self.inflight)
        self.inflight.clear()
        self.run.answered(count)

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Run:
    def __init__(self, config: LoadConfig, profile: WireProfile) -> None:
        self.config = config
        self.profile = profile
        self.dialect: Dialect = dialect_for(profile)
        self.scanner = ResponseScanner(profile)
        self.stats = LoadStats()
        self.clock = _Clock(self.encode_field, [n for n in (7, 12, 13) if str(n) in profile.spec])
        self.ascii_stan = profile.spec["11"]["data_enc"] == "ascii" and profile.spec["11"]["max_len"] == 6
        self.sending = True
        self.closed_loop = config.rate is None
        self._open = 0
        self._all_closed = asyncio.Event()
        self.inflight_total = 0
        self.drained = asyncio.Event()

    def build_templates(self, tid: str) -> dict[str, Template]:
        """One template per kind; load terminals never sign on, so they work in batch 1."""
        c, d = self.config, self.dialect
        card = Card(c.pan or d.default_pan)
        built = d.load_templates(_PLACEHOLDER, Station(tid, c.mid, 1), card, c.amount, c.currency or d.default_currency)
        return {kind: Template(self.profile, message, tpdu=c.tpdu) for kind, message in built.items()}

    def budget(self) -> int:
        count = self.config.count
        if count is None:
            return 1 << 30
        left = count - self.stats.sent
        if left <= 0:
            self.sending = False
        return max(0, left)

    def encode_field(self, number: int, text: str) -> bytes:
        return _value_bytes(self.profile.spec[str(number)], text)

    def _factory(self, index: int) -> Callable[[], _Terminal]:
        return lambda: _Terminal(self, index)

    def answered(self, count: int) -> None:
        """``count`` requests left the in-flight set (answered, expired or failed)."""
        self.inflight_total -= count
        if not self.sending and self.inflight_total <= 0:
            self.drained.set()

    def connection_done(self) -> None:
        self._open -= 1
        if self._open <= 0:
            self._all_closed.set()

    async def execute(self, progress: Callable[[LoadStats, float], None] | None) -> LoadStats:
        loop = asyncio.get_running_loop()
        c = self.config
        terminals: list[_Terminal] = []
        for index in range(1, c.connections + 1):
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(self._factory(index), c.host, c.port), c.response_timeout
                )
            except (OSError, TimeoutError) as exc:
                for t in terminals:
                    t._abort()
                raise ConnectionError(f"cannot connect to {c.host}:{c.port}: {exc}") from None
            terminals.append(proto)
            self._open += 1
        self.stats.started = time.perf_counter()
        end = self.stats.started + c.duration if c.duration is not None else None
        if self.closed_loop:
            for t in terminals:
                t.fill()
        last_report = self.stats.started
        sent_at_tick = 0
        tick = 0.005 if not self.closed_loop else 0.05
        try:
            while True:
                await asyncio.sleep(tick)
                now = time.perf_counter()
                if end is not None and now >= end:
                    break
                if c.count is not None and self.stats.sent >= c.count:
                    self.sending = False
                    if all(not t.inflight for t in terminals):
                        break
                if all(t.closed for t in terminals):
                    break
                if not self.closed_loop and self.sending and c.rate is not None:
                    due = int((now - self.stats.started) * c.rate) - sent_at_tick
                    due = min(due, self.budget())
                    progress_made = True
                    while due > 0 and progress_made:
                        progress_made = False
                        for t in terminals:
                            if due <= 0:
                                break
                            if t.send_one():
                                due -= 1
                                sent_at_tick += 1
                                progress_made = True
                deadline = now - c.response_timeout
                for t in terminals:
                    t.expire(deadline)
                if progress is not None and now - last_report >= 1.0:
                    last_report = now
                    progress(self.stats, now - self.stats.started)
            # Stop sending; give what is in flight the time-out to come back.
            self.sending = False
            self.answered(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), c.response_timeout)
            self.stats.finished = time.perf_counter()
            for t in terminals:
                self.stats.timeouts += len(t.inflight)
                t.inflight.clear()
        finally:
            for t in terminals:
                t.closed = True
                if t.transport is not None:
                    t.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 2.0)
        return self.stats


async def run_load(
    config: LoadConfig,
    profile: WireProfile,
    progress: Callable[[LoadStats, float], None] | None = None,
) -> LoadStats:
    """Run the load described by ``config``; ``progress`` is called about once a second."""
    if config.connections < 1 or config.pipeline < 1:
        raise UsageError("connections and pipeline must be at least 1")
    if config.duration is None and config.count is None:
        raise UsageError("give a duration or a count")
    if config.rate is not None and config.rate <= 0:
        raise UsageError("the target rate must be positive")
    if not 1 <= len(config.tid_prefix) <= 4:
        raise UsageError("the terminal id prefix must be 1 to 4 characters")
    return await _Run(config, profile).execute(progress)
