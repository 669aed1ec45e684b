"""What the fuzzing test (``test_fuzz.py``) is made of: valid requests of every kind in both iso87
profiles, mutations of them, an independent framer, and the card numbers a run's bytes carried.

Requests start from the interoperability vectors (``tests/vectors/<profile>.jsonl``, made by an
implementation that is not pyiso8583) and are re-encoded with pyiso8583's own specs with fresh
values: a STAN per request, the connection's terminal, references to earlier requests. Nothing here
imports the gateway: a bug there cannot cancel itself out here. Every choice is drawn from the
``random.Random`` it is given.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import iso8583
import iso8583.specs

PROFILES = ("iso87-binary", "iso87-ascii")
SPECS: dict[str, Any] = {"iso87-binary": iso8583.specs.default, "iso87-ascii": iso8583.specs.default_ascii}
#: ``max_frame_bytes`` of both profiles (docs/profiles.md): a header announcing more closes the connection
MAX_FRAME = 8192
VECTORS = Path(__file__).resolve().parent.parent / "vectors"

#: the cards the requests carry (DE2, or the PAN of DE35): 16, 16, 19 and 13 digits, all Luhn-valid
PANS = ("4761739001010119", "4111111111111111", "6212345678901234569", "4222222222222")

#: vector description -> kind name, for the requests the fuzzer sends (responses are left out)
_KINDS = {
    "network echo": "network-echo",
    "network sign-on": "network-sign-on",
    "pre-authorization": "preauth",
    "purchase": "purchase",
    "purchase with track 2 instead of PAN": "purchase-track2",
    "purchase with expiry date": "purchase-expiry",
    "void by original RRN": "void-rrn",
    "refund by original RRN": "refund-rrn",
    "refund by original data elements": "refund-de90",
    "unreferenced refund": "refund-unreferenced",
    "pre-auth completion advice": "completion",
    "reversal request": "reversal-0400",
    "reversal advice": "reversal-0420",
    "reversal advice repeat": "reversal-0421",
    "partial reversal advice": "partial-reversal",
    "batch settlement": "settlement",
}
#: kinds whose originals later requests point at
ORIGINAL_KINDS = frozenset({"purchase", "purchase-track2", "purchase-expiry", "preauth"})


# --------------------------------------------------------------------------- luhn, digits


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check, written here rather than taken from the gateway."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_ok(prefix + d))


assert all(luhn_ok(pan) for pan in PANS)


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A request kind as a vector shows it: its MTI and data elements."""

    kind: str
    mti: str
    fields: dict[int, str]


def templates(profile: str) -> list[Template]:
    """Every request kind of the vectors, plus 0401 (a reversal repeat) and a void by DE90. Each
    vector is checked first: pyiso8583's spec must encode its fields to its very bytes."""
    found: list[Template] = []
    for line in (VECTORS / f"{profile}.jsonl").read_text().splitlines():
        vector = json.loads(line)
        kind = _KINDS.get(vector["description"])
        if kind is None:
            continue
        fields = {int(k): v for k, v in vector["fields"].items()}
        expected = bytes.fromhex(vector["frame_hex"])
        assert frame(profile, encode(profile, vector["mti"], fields)[0]) == expected, (
            f"{profile}: pyiso8583's spec does not re-encode the vector {vector['description']!r}"
        )
        found.append(Template(kind, vector["mti"], fields))
    by_kind = {t.kind: t for t in found}
    assert set(by_kind) == set(_KINDS.values()), f"{profile}: vectors missing {set(_KINDS.values()) - set(by_kind)}"
    found.append(Template("reversal-0401", "0401", by_kind["reversal-0400"].fields))
    void = dict(by_kind["void-rrn"].fields)
    del void[37]
    found.append(Template("void-de90", "0200", {**void, 90: by_kind["refund-de90"].fields[90]}))
    return found


def encode(profile: str, mti: str, fields: dict[int, str]) -> tuple[bytes, dict[str, dict[str, bytes]]]:
    raw, parts = iso8583.encode({"t": mti, **{str(k): v for k, v in fields.items()}}, SPECS[profile])
    return bytes(raw), parts


def header(profile: str, size: int) -> bytes:
    """The length header: 2 bytes big-endian (iso87-binary) or 4 ASCII digits (iso87-ascii)."""
    return struct.pack(">H", size) if profile == "iso87-binary" else f"{size:04d}".encode()


def frame(profile: str, payload: bytes) -> bytes:
    return header(profile, len(payload)) + payload


# --------------------------------------------------------------------------- requests


@dataclass
class Original:
    """A request later ones may point at (DE37 once its answer told it, DE90 from the start)."""

    mti: str
    stan: str
    transmission_time: str
    amount: int
    rrn: str | None = None


@dataclass
class Request:
    """One valid request as sent before any mutation."""

    kind: str
    mti: str
    fields: dict[int, str]
    payload: bytes
    #: offset in ``payload`` of each element's length prefix and data: key -> (start, prefix size, data size)
    layout: dict[str, tuple[int, int, int]]
    pans: frozenset[str]


class Requests:
    """Valid requests of one terminal, each with a STAN of its own; originals are remembered for the
    voids, refunds, completions and reversals that follow (``answered`` adds their RRN)."""

    def __init__(self, profile: str, rng: random.Random, terminal: str, merchant: str, first_stan: int) -> None:
        self.profile = profile
        self.rng = rng
        self.terminal = terminal
        self.merchant = merchant
        self.templates = templates(profile)
        self.stan = first_stan
        self.originals: dict[str, list[Original]] = {"0100": [], "0200": []}
        #: sales whose approved answer gave their RRN
        self.with_rrn: list[Original] = []
        self.by_stan: dict[str, Original] = {}

    def _pick(self, items: list[Original]) -> Original | None:
        # one draw whatever the list holds: the choices that follow do not depend on how many answers came
        draw = self.rng.random()
        return items[int(draw * len(items))] if items else None

    def _time(self) -> tuple[str, str, str]:
        """DE7, DE12, DE13 drawn from the generator (a valid time of day and date)."""
        rng = self.rng
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        clock = f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
        return f"{month:02d}{day:02d}{clock}", clock, f"{month:02d}{day:02d}"

    def make(self, *, remember: bool = True, kind: str | None = None) -> Request:
        """A valid request of ``kind``, or of a kind drawn at random; ``remember``: later requests may
        point at it (an original that will be sent unmutated)."""
        rng = self.rng
        template = rng.choice(self.templates) if kind is None else next(t for t in self.templates if t.kind == kind)
        fields = dict(template.fields)
        self.stan = self.stan % 999_999 + 1
        stan = f"{self.stan:06d}"
        de7, de12, de13 = self._time()
        fields[11] = stan
        for number, value in ((7, de7), (12, de12), (13, de13), (41, self.terminal), (42, self.merchant)):
            if number in fields:
                fields[number] = value
        pan = rng.choice(PANS)
        if 2 in fields:
            fields[2] = pan
        if 35 in fields:
            fields[35] = f"{pan}=2812{rng.randint(100, 999)}{rng.randint(0, 10**9):09d}"[:37]
        amount = rng.randint(100, 9_999)
        if 4 in fields:
            fields[4] = f"{amount:012d}"
        kind = template.kind
        sales, preauths = self.originals["0200"], self.originals["0100"]
        reference = self._pick(preauths if kind == "completion" else sales)
        with_rrn = self._pick(self.with_rrn)
        if kind in ("void-rrn", "refund-rrn"):
            fields[37] = with_rrn.rrn if with_rrn is not None and with_rrn.rrn else "999999999999"
            if with_rrn is not None:
                fields[4] = f"{with_rrn.amount if kind == 'void-rrn' else max(1, with_rrn.amount // 2):012d}"
        if 90 in fields:
            if reference is not None:
                fields[90] = f"{reference.mti}{reference.stan}{reference.transmission_time}" + "0" * 22
                if kind == "refund-de90":
                    fields[4] = f"{max(1, reference.amount // 3):012d}"
                else:
                    fields[4] = f"{reference.amount:012d}"
            else:
                fields[90] = f"{template.fields[90][:4]}{rng.randint(1, 999_999):06d}{de7}" + "0" * 22
        if 95 in fields:
            replacement = rng.randint(0, int(fields[4]))
            fields[95] = f"{replacement:012d}" + "0" * 30
        if kind == "settlement":
            fields.update({74: f"{rng.randint(0, 50):010d}", 86: f"{rng.randint(0, 10**6):016d}",
                           76: f"{rng.randint(0, 50):010d}", 88: f"{rng.randint(0, 10**6):016d}"})  # fmt: skip
        payload, parts = encode(self.profile, template.mti, fields)
        layout, at = {}, 0
        for key, part in parts.items():
            layout[key] = (at, len(part["len"]), len(part["data"]))
            at += len(part["len"]) + len(part["data"])
        pans = frozenset({pan} if (2 in fields or 35 in fields) else set())
        if remember and kind in ORIGINAL_KINDS:
            original = Original(template.mti, stan, de7, int(fields[4]))
            self.originals[template.mti].append(original)
            self.by_stan[stan] = original
        return Request(kind, template.mti, fields, payload, layout, pans)

    def answered(self, mti: str, fields: dict[int, str]) -> None:
        """An approved answer to an unmutated original: its RRN can be quoted now."""
        original = self.by_stan.get(fields.get(11, ""))
        if original is not None and mti[:3] == f"{original.mti[:2]}1" and fields.get(39) == "00" and fields.get(37):
            if original.rrn is None and original.mti == "0200":
                self.with_rrn.append(original)
            original.rrn = fields[37]


# --------------------------------------------------------------------------- mutations


@dataclass
class Item:
    """Bytes of one element of a session: a frame, valid or not, or garbage."""

    data: bytes
    label: str
    request: Request | None = None


def _bitmap_span(profile: str, payload: bytes) -> tuple[int, int]:
    """Where the bitmaps are in ``payload``: (start, size), the secondary included when bit 1 says so."""
    if profile == "iso87-binary":
        secondary = len(payload) > 4 and payload[4] & 0x80
        return 4, 16 if secondary else 8
    secondary = len(payload) > 4 and chr(payload[4]) in "89ABCDEFabcdef"
    return 4, 32 if secondary else 16


def _flip_bitmap_bits(profile: str, payload: bytearray, bits: Iterable[int], clear_only: bool = False) -> None:
    """Flip (or clear) data element bits (1..128) in the bitmaps of ``payload``."""
    start, size = _bitmap_span(profile, bytes(payload))
    for bit in bits:
        index = bit - 1
        if profile == "iso87-binary":
            byte = start + index // 8
            if byte >= start + size or byte >= len(payload):
                continue
            mask = 0x80 >> (index % 8)
            payload[byte] = payload[byte] & ~mask if clear_only else payload[byte] ^ mask
        else:
            char = start + index // 4
            if char >= start + size or char >= len(payload):
                continue
            try:
                nibble = int(chr(payload[char]), 16)
            except ValueError:
                continue
            mask = 0x8 >> (index % 4)
            nibble = nibble & ~mask if clear_only else nibble ^ mask
            payload[char] = ord(f"{nibble:X}")


def _set_bits(request: Request) -> list[int]:
    return sorted(int(key) for key in request.layout if key.isdigit())


def _with_header(profile: str, payload: bytes, size: int | None = None) -> bytes:
    return header(profile, len(payload) if size is None else size) + payload


class Mutator:
    """Mutations of valid requests; each returns the bytes to send and a label saying what was done."""

    def __init__(self, profile: str, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self.ops = [
            (self.bit_flips, 14), (self.insert_bytes, 8), (self.delete_bytes, 8), (self.truncate, 8),
            (self.length_digits, 12), (self.bitmap_bits, 12), (self.shift_card_data, 10), (self.mti, 6),
            (self.value, 10), (self.oversize_header, 4), (self.garbage, 5), (self.unreadable, 3),
        ]  # fmt: skip
        self.weights = [weight for _, weight in self.ops]

    def mutate(self, request: Request) -> Item:
        """One mutation, or two or three stacked (the header is made last, from the final payload)."""
        rng = self.rng
        count = 1 if rng.random() < 0.8 else rng.randint(2, 3)
        payload, size, labels = bytearray(request.payload), None, []
        for _ in range(count):
            op = rng.choices(self.ops, self.weights)[0][0]
            result = op(request, payload)
            if isinstance(result, bytes):  # a whole item of its own (garbage, headers)
                return Item(result, "+".join([*labels, op.__name__]), request)
            label, stale = result
            labels.append(label)
            if stale is not None:
                size = stale
        data = _with_header(self.profile, bytes(payload), size)
        return Item(data, "+".join(labels), request)

    # each op changes ``payload`` in place and returns (label, a stale header size or None), or
    # returns the whole item's bytes

    def _stale(self, before: int) -> int | None:
        """Half the time the header keeps announcing the payload's former size."""
        return before if self.rng.random() < 0.5 else None

    def bit_flips(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        for _ in range(self.rng.randint(1, 4)):
            at = self.rng.randrange(len(payload))
            payload[at] ^= 1 << self.rng.randrange(8)
        return "bit-flips", None

    def insert_bytes(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        before = len(payload)
        for _ in range(self.rng.randint(1, 4)):
            payload.insert(self.rng.randrange(len(payload) + 1), self.rng.randrange(256))
        stale = self._stale(before)
        return f"insert{'-stale-header' if stale else ''}", stale

    def delete_bytes(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        before = len(payload)
        for _ in range(min(self.rng.randint(1, 4), len(payload) - 1)):
            del payload[self.rng.randrange(len(payload))]
        stale = self._stale(before)
        return f"delete{'-stale-header' if stale else ''}", stale

    def truncate(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        before = len(payload)
        del payload[self.rng.randint(1, max(1, len(payload) - 1)) :]
        stale = self._stale(before)
        return f"truncate{'-stale-header' if stale else ''}", stale

    def length_digits(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        """Change the length prefix of a variable element (DE2, DE35, ...) without moving anything."""
        variable = [(key, at, size) for key, (at, size, _) in request.layout.items() if size]
        if not variable:
            return self.bitmap_bits(request, payload)
        key, at, size = self.rng.choice(variable)
        if at + size > len(payload):
            return "length-digits-skipped", None
        text = payload[at : at + size].decode("latin-1")
        current = int(text) if text.isascii() and text.isdigit() else 0
        how = self.rng.random()
        if how < 0.5:
            value = f"{max(0, current + self.rng.choice([-3, -2, -1, 1, 2, 3])):0{size}d}"[-size:]
        elif how < 0.85:
            value = f"{self.rng.randrange(10**size):0{size}d}"
        else:
            value = "".join(self.rng.choice("9 A=-\x00") for _ in range(size))
        payload[at : at + size] = value.encode("latin-1")
        return f"length-digits-de{key}", None

    def bitmap_bits(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        bits = [self.rng.randint(1, 128 if self.rng.random() < 0.3 else 64) for _ in range(self.rng.randint(1, 3))]
        _flip_bitmap_bits(self.profile, payload, bits)
        return f"bitmap-bits-{'-'.join(map(str, bits))}", None

    def shift_card_data(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        """Clear bitmap bits so that card data (DE2, DE35) is read as the elements after it: the bit
        of the card field, or every bit from it up to DE40 (the card bytes land in DE41 and DE42)."""
        present = _set_bits(request)
        card = [bit for bit in (2, 35) if bit in present]
        if not card:
            return self.bitmap_bits(request, payload)
        bit = self.rng.choice(card)
        cleared = [bit] if self.rng.random() < 0.5 else [n for n in present if bit <= n <= 40]
        _flip_bitmap_bits(self.profile, payload, cleared, clear_only=True)
        return f"shift-clear-{'-'.join(map(str, cleared))}", None

    def mti(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        choices = ["0100", "0200", "0220", "0400", "0401", "0420", "0421", "0500", "0800",  # requests
                   "0210", "0110", "0810", "0430",  # responses (not answered)
                   "0300", "9200", "0000", "0240", "0600",  # unknown requests
                   "\xff\xff\xff\xff", "02x0", "020", " 200"]  # fmt: skip
        mti = self.rng.choice(choices).encode("latin-1")
        payload[0:4] = mti
        return f"mti-{mti.hex()}", None

    def value(self, request: Request, payload: bytearray) -> tuple[str, int | None]:
        """Overwrite one element's data (same length): wrong content, bytes outside ASCII, other
        digits; in the terminal and merchant ids, half the time, card data (see ``_card_in_ids``)."""
        data_fields = [(key, at + size, data) for key, (at, size, data) in request.layout.items()
                       if key.isdigit() and data]  # fmt: skip
        key, at, size = self.rng.choice(data_fields)
        if key in ("41", "42") and self.rng.random() < 0.5:
            return self._card_in_ids(request, payload, next(iter(request.pans), PANS[0]))
        how = self.rng.randrange(3)
        if how == 0:
            text = "".join(self.rng.choice("ABCxyz=") for _ in range(size))
        elif how == 1:
            text = "".join(self.rng.choice(["\x00", "\x7f", "\x80", "\xff", "\n", '"']) for _ in range(size))
        else:
            text = str(self.rng.randrange(10**size)).rjust(size, "0")
        payload[at : at + size] = text.encode("latin-1")[:size].ljust(size, b" ")
        return f"value-de{key}-{how}", None

    def _card_in_ids(self, request: Request, payload: bytearray, pan: str) -> tuple[str, int | None]:
        """A whole PAN in DE42 (13 digits fit), or one split across DE41 and DE42, in field order or
        in the order a log line writes them, padded with spaces, zeros or '='."""
        if "41" not in request.layout or "42" not in request.layout:
            return "value-skipped", None
        pad = self.rng.choice(" 0=")
        how = self.rng.choice(["whole", "field-order", "line-order"])
        if how == "whole" or len(pan) <= 15:
            ids = {"42": pan[:15]}
        elif how == "field-order":  # DE41 then DE42: reads backwards in the log line (merchant first)
            ids = {"41": pan[:8], "42": pan[8:]}
        else:
            ids = {"42": pan[:15], "41": pan[15:]}
        for key, text in ids.items():
            at, prefix, size = request.layout[key]
            payload[at + prefix : at + prefix + size] = text.ljust(size, pad).encode()
        return f"card-in-ids-{how}-pad{pad!r}", None

    def oversize_header(self, request: Request, payload: bytearray) -> bytes:
        """A length header above MAX_FRAME (or zero, or not digits): a framing error."""
        rng = self.rng
        if self.profile == "iso87-binary":
            head = struct.pack(">H", rng.choice([0, rng.randint(MAX_FRAME + 1, 0xFFFF)]))
        else:
            head = rng.choice([b"0000", b"%04d" % rng.randint(MAX_FRAME + 1, 9999), b"00A5", b" 120", b"-001"])
        return head + bytes(payload)

    def garbage(self, request: Request, payload: bytearray) -> bytes:
        body = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 120)))
        return _with_header(self.profile, body) if self.rng.random() < 0.6 else body

    def unreadable(self, request: Request, payload: bytearray) -> bytes:
        """The issue's frame: a message type that cannot be read (four 0xFF bytes)."""
        return _with_header(self.profile, b"\xff" * 4)


# --------------------------------------------------------------------------- what the gateway sees


@dataclass
class Framed:
    """The stream of one connection as the gateway's framing must cut it."""

    payloads: list[bytes] = field(default_factory=list)
    #: why the stream cannot be framed past the last payload (None: it can, maybe with a partial frame left)
    error: str | None = None
    #: bytes of the stream that are in no complete frame
    rest: int = 0


def cut(profile: str, stream: bytes) -> Framed:
    """Frames of ``stream`` per docs/profiles.md: a 2-byte big-endian or 4-ASCII-digit length not
    counting itself, at most MAX_FRAME, not zero."""
    framed, at = Framed(), 0
    size_of = 2 if profile == "iso87-binary" else 4
    while len(stream) - at >= size_of:
        head = stream[at : at + size_of]
        if profile == "iso87-binary":
            size = struct.unpack(">H", head)[0]
        elif head.isdigit():
            size = int(head)
        else:
            framed.error = "length header is not 4 digits"
            break
        if size == 0 or size > MAX_FRAME:
            framed.error = f"length {size}"
            break
        if len(stream) - at - size_of < size:
            break
        framed.payloads.append(stream[at + size_of : at + size_of + size])
        at += size_of + size
    framed.rest = len(stream) - at
    return framed


def decode_partial(profile: str, payload: bytes) -> dict[str, Any] | None:
    """What pyiso8583 decodes of ``payload``: all of it, or what came before the element it failed on;
    None when it fails otherwise than with its DecodeError and says nothing of what it read (a
    KeyError for bit 65 set in a secondary bitmap, which it reads as announcing a third one)."""
    try:
        doc, _ = iso8583.decode(payload, SPECS[profile])
    except iso8583.DecodeError as exc:
        return dict(exc.doc_dec)
    except Exception:
        return None
    return doc


def response_mti(mti: str) -> str | None:
    """The answer's MTI, ISO 8583:1987 style: 0200 -> 0210, 0401 -> 0410 (a repeat is answered as the
    request it repeats); None when ``mti`` is no request (odd third digit)."""
    if len(mti) != 4 or not (mti.isascii() and mti.isdigit()) or int(mti[2]) % 2:
        return None
    return f"{mti[:2]}{int(mti[2]) + 1}0"


def mti_of(payload: bytes) -> str | None:
    """The message type of a payload when its first 4 bytes are ASCII digits."""
    head = payload[:4]
    return head.decode("ascii") if len(head) == 4 and head.isascii() and head.isdigit() else None


# --------------------------------------------------------------------------- card numbers


_DIGIT_RUN = re.compile(rb"[0-9]+")
_NON_DIGITS = re.compile(r"[^0-9]")
_GROUPED_DIGITS = re.compile(r"[0-9]+(?:[ -][0-9]+)*")


def card_numbers_in(profile: str, stream: bytes, payloads: Iterable[bytes]) -> set[str]:
    """Card numbers ``stream`` carries once mutated: each run of 13 to 19 digits that passes Luhn, and
    DE2 or DE35's PAN as pyiso8583 reads each payload (a changed length digit makes another number).
    A number that starts with 0 is left out: no card number does (ISO/IEC 7812 gives 0 to no
    issuer), and runs of zeros (DE3 and DE4 side by side) pass Luhn."""
    found = {match.decode() for match in _DIGIT_RUN.findall(stream) if 13 <= len(match) <= 19}
    for payload in payloads:
        doc = decode_partial(profile, payload) or {}
        found.add(str(doc.get("2", "")))
        found.add(re.split("[=D]", str(doc.get("35", "")))[0])
    return {n for n in found if 13 <= len(n) <= 19 and n.isascii() and n.isdigit() and n[0] != "0" and luhn_ok(n)}


def digits(text: str) -> str:
    return _NON_DIGITS.sub("", text)


def string_values(value: Any) -> Iterator[str]:
    """Every string leaf of a JSON document, in document order."""
    if isinstance(value, dict):
        for item in value.values():
            yield from string_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from string_values(item)
    elif isinstance(value, str):
        yield value


def given_away(text: str, originals: set[str], found_in_frames: set[str]) -> set[str]:
    """The card numbers a log line, an event's topic or its payload gives away.

    ``originals`` (the PANs of the requests before mutation) as ``test_card_data_in_logs.leaks``
    looks for them: in the digits of the whole text, of each JSON string value or key, and of each
    pair of neighbouring string values read in either order (a PAN split across DE41 and DE42).
    ``found_in_frames`` (numbers the mutated bytes carried: hundreds in a long run, many of them
    mostly zeros) in each run of digits of a value or key, written together or in groups joined by
    a space or a dash: not across other characters or values, which join unrelated numbers into runs
    that some of them match by chance (an event's subject "MERCHANT0000001/FZA00004/000000000196"
    reads "4000000000196" with its separators dropped, a Luhn-valid run a mutated frame carried).
    A text that is no JSON: its whitespace-separated words."""
    found = {pan for pan in originals if pan in digits(text)}
    try:
        document = json.loads(text)
    except ValueError:
        values, pairs = text.split(), []
    else:
        values = list(string_values(document))
        if isinstance(document, dict):
            values += [str(key) for key in document]
        pairs = [digits(ab) for a, b in itertools.pairwise(values) for ab in (a + b, b + a)]
    found |= {pan for pan in originals for part in [*map(digits, values), *pairs] if pan in part}
    for value in values:
        for run in _GROUPED_DIGITS.findall(value):
            part = digits(run)
            for size in range(13, min(19, len(part)) + 1):
                for start in range(len(part) - size + 1):
                    if part[start : start + size] in found_in_frames:
                        found.add(part[start : start + size])
    return found
