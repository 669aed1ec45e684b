"""UnionPay POS frames built and read by hand, for tests that drive the gateway as an outsider.

Written from the published terminal field layout (docs/profiles.md "cup-pos"), not with the gateway's
codec nor pyiso8583, so that a codec bug cannot cancel itself out; tests/unit/test_cup_frames.py checks
it against the shared vectors byte for byte.

    | length (2 bytes, big-endian, not counting itself) | TPDU 60 dddd ssss | header 60 31 00 00 00 00 |
    | MTI (2 BCD bytes) | primary bitmap (8 bytes) | fields in number order |

Numerics are packed BCD, left-aligned with a 0 nibble pad when odd; LL / LLL lengths are BCD (1 / 2
bytes) and count digits for BCD data, bytes for ASCII data.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct

TPDU = bytes.fromhex("6000030000")
HEADER = bytes.fromhex("603100000000")

#: fixed-length BCD numerics: field -> digits
BCD_FIXED = {3: 6, 4: 12, 11: 6, 12: 6, 13: 4, 14: 4, 15: 4, 22: 3, 25: 2, 26: 2}
#: variable BCD numerics (and tracks, separator nibble D): field -> length prefix bytes (1 LL, 2 LLL)
BCD_VARIABLE = {2: 1, 32: 1, 35: 1, 36: 2, 48: 2, 60: 2, 61: 2}
#: fixed-length ASCII: field -> bytes
ASCII_FIXED = {37: 12, 38: 6, 39: 2, 41: 8, 42: 15, 49: 3}
#: variable ASCII with a BCD length prefix counting bytes: field -> prefix bytes
ASCII_VARIABLE = {44: 1, 63: 2}


def bcd(digits: str) -> bytes:
    """Packed BCD, a 0 nibble on the right when odd (the letter D stays the nibble D)."""
    return bytes.fromhex(digits + "0" * (len(digits) % 2))


def _length(count: int, prefix: int) -> bytes:
    return bytes.fromhex(f"{count:0{2 * prefix}d}")


def _field(number: int, value: str) -> bytes:
    if number in BCD_FIXED:
        assert len(value) == BCD_FIXED[number], f"field {number} is n{BCD_FIXED[number]}"
        return bcd(value)
    if number in BCD_VARIABLE:
        return _length(len(value), BCD_VARIABLE[number]) + bcd(value)
    if number in ASCII_FIXED:
        assert len(value) == ASCII_FIXED[number], f"field {number} is an{ASCII_FIXED[number]}"
        return value.encode("ascii")
    if number in ASCII_VARIABLE:
        return _length(len(value), ASCII_VARIABLE[number]) + value.encode("ascii")
    raise ValueError(f"field {number} is not in this test builder's layout")


def build(mti: str, fields: dict[int, str], tpdu: bytes = TPDU) -> bytes:
    """The whole frame as it travels on TCP, length header included."""
    bitmap = bytearray(8)
    for number in fields:
        bitmap[(number - 1) // 8] |= 0x80 >> ((number - 1) % 8)
    body = tpdu + HEADER + bcd(mti) + bytes(bitmap)
    body += b"".join(_field(number, fields[number]) for number in sorted(fields))
    return struct.pack(">H", len(body)) + body


def _unbcd(data: bytes, digits: int) -> str:
    return data.hex().upper()[:digits]


def parse(body: bytes) -> tuple[bytes, str, dict[int, str]]:
    """A frame's body (after the length header): (TPDU, MTI, fields as text)."""
    tpdu, rest = body[:5], body[5 + len(HEADER):]
    mti, bitmap, at = rest[:2].hex(), rest[2:10], 10
    fields: dict[int, str] = {}
    for number in range(2, 65):
        if not bitmap[(number - 1) // 8] & (0x80 >> ((number - 1) % 8)):
            continue
        if number in BCD_FIXED:
            size = BCD_FIXED[number]
            fields[number], at = _unbcd(rest[at:at + (size + 1) // 2], size), at + (size + 1) // 2
        elif number in BCD_VARIABLE:
            prefix = BCD_VARIABLE[number]
            size = int(rest[at:at + prefix].hex())
            at += prefix
            fields[number], at = _unbcd(rest[at:at + (size + 1) // 2], size), at + (size + 1) // 2
        elif number in ASCII_FIXED:
            size = ASCII_FIXED[number]
            fields[number], at = rest[at:at + size].decode("ascii"), at + size
        elif number in ASCII_VARIABLE:
            prefix = ASCII_VARIABLE[number]
            size = int(rest[at:at + prefix].hex())
            at += prefix
            fields[number], at = rest[at:at + size].decode("ascii"), at + size
        else:
            raise ValueError(f"field {number} is not in this test builder's layout")
    assert at == len(rest), "bytes left after the last field"
    return tpdu, mti, fields


# --------------------------------------------------------------------------- a UnionPay terminal

CARD = "6217001234567890122"
OTHER_CARD = "6222021234567890128"
MERCHANT = "898310048990001"
TERMINAL = "POS00001"
_TRACES = itertools.count(1)  # shared by every terminal of the test run: no two requests reuse a trace


def next_trace() -> str:
    """DE11, the terminal's trace number (凭证号)."""
    return f"{next(_TRACES) % 1_000_000:06d}"


class CupTerminal:
    """One UnionPay terminal connection: requests by meaning, each answer read and checked for its TPDU."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, terminal: str) -> None:
        self.reader, self.writer, self.terminal = reader, writer, terminal
        self.batch = "000001"  #: 60.2 of every request (a sign-on answer gives the next one)

    @classmethod
    async def connect(cls, port: int, terminal: str = TERMINAL) -> CupTerminal:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, terminal)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()

    async def write(self, mti: str, fields: dict[int, str]) -> None:
        self.writer.write(build(mti, fields))
        await self.writer.drain()

    async def read(self, timeout: float = 10.0) -> tuple[str, dict[int, str]]:
        size = struct.unpack(">H", await asyncio.wait_for(self.reader.readexactly(2), timeout))[0]
        tpdu, mti, fields = parse(await asyncio.wait_for(self.reader.readexactly(size), timeout))
        assert tpdu == TPDU[:1] + TPDU[3:] + TPDU[1:3], "the reply's TPDU swaps destination and source"
        return mti, fields

    async def send(self, mti: str, fields: dict[int, str]) -> dict[int, str]:
        await self.write(mti, fields)
        answer_mti, answer = await self.read()
        assert answer_mti == f"{mti[:2]}{int(mti[2]) + 1}0"
        assert answer[11] == fields[11] and answer[41] == fields[41]
        return answer

    # ------------------------------------------------------------ requests (fields only)

    def card_request(self, code: str, condition: str, txn_type: str, amount: int, pan: str = CARD) -> dict[int, str]:
        """DE2, 3, 4, 11, 22, 25, 41, 42, 49 and 60 (60.1 type, 60.2 batch, 60.3 000)."""
        return {2: pan, 3: code, 4: f"{amount:012d}", 11: next_trace(), 22: "021", 25: condition,
                41: self.terminal, 42: MERCHANT, 49: "156", 60: txn_type + self.batch + "000"}  # fmt: skip

    def sale_request(self, amount: int, pan: str = CARD) -> dict[int, str]:
        return self.card_request("000000", "00", "22", amount, pan)

    # ------------------------------------------------------------ requests sent, answers returned

    async def sale(self, amount: int, pan: str = CARD) -> dict[int, str]:
        return await self.send("0200", self.sale_request(amount, pan))

    async def void(self, sale: dict[int, str], amount: int, pan: str = CARD) -> dict[int, str]:
        """消费撤销: DE37 the sale's RRN, DE61 its batch and trace."""
        fields = self.card_request("200000", "00", "23", amount, pan)
        return await self.send("0200", {**fields, 37: sale[37], 61: sale[60][2:8] + sale[11]})

    async def refund(self, rrn: str, amount: int, original_date: str, pan: str = CARD) -> dict[int, str]:
        """退货 (0220): DE37 the original's RRN, DE61 zeros and the original's date (MMDD)."""
        fields = self.card_request("200000", "00", "25", amount, pan)
        return await self.send("0220", {**fields, 37: rrn, 61: "000000000000" + original_date})

    async def preauth(self, amount: int) -> dict[int, str]:
        """预授权 (0100, 25 = 06, 60.1 = 10)."""
        return await self.send("0100", self.card_request("030000", "06", "10", amount))

    async def complete(self, preauth: dict[int, str], amount: int) -> dict[int, str]:
        """预授权完成请求 (0200, 60.1 = 20): DE38 the pre-auth's approval code, DE61 its date."""
        fields = self.card_request("000000", "06", "20", amount)
        return await self.send("0200", {**fields, 38: preauth[38], 61: "000000000000" + preauth[13]})

    async def void_preauth(self, preauth: dict[int, str], amount: int) -> dict[int, str]:
        """预授权撤销 (0100, 60.1 = 11): DE38 the pre-auth's approval code, DE61 its date."""
        fields = self.card_request("200000", "06", "11", amount)
        return await self.send("0100", {**fields, 38: preauth[38], 61: "000000000000" + preauth[13]})

    async def reverse(self, original: dict[int, str]) -> dict[int, str]:
        """冲正 (0400): the original's fields (11 and 60 included) and the reason, 98: no answer."""
        return await self.send("0400", {**original, 39: "98"})

    async def sign_on(self, operator: str = "01 ") -> dict[int, str]:
        """签到 (0800, 60.3 = 003): the answer's 60.2 is the batch number to use from now on."""
        fields = {11: next_trace(), 41: self.terminal, 42: MERCHANT, 60: "00" + self.batch + "003", 63: operator}
        answer = await self.send("0800", fields)
        self.batch = answer[60][2:8]
        return answer

    async def upload(self, lines: list[tuple[str, str, int]]) -> dict[int, str]:
        """批上送 (0320, 60.3 = 201): DE48 = the number of lines n2, then per (trace, card, amount): card
        organisation n2 (00), trace n6, card number n20 (left-aligned, filled with 0), amount n12."""
        listed = "".join(f"00{trace}{card:0<20}{amount:012d}" for trace, card, amount in lines)
        fields = {11: next_trace(), 41: self.terminal, 42: MERCHANT, 48: f"{len(lines):02d}{listed}",
                  60: "00" + self.batch + "201"}  # fmt: skip
        return await self.send("0320", fields)

    async def upload_end(self, count: int) -> dict[int, str]:
        """批上送结束 (0320, 60.3 = 207): DE48 = the number of lines uploaded, n4."""
        fields = {11: next_trace(), 41: self.terminal, 42: MERCHANT, 48: f"{count:04d}", 60: "00" + self.batch + "207"}
        return await self.send("0320", fields)

    async def settle(self, debits: tuple[int, int], credits: tuple[int, int]) -> dict[int, str]:
        """批结算 (0500, 60.3 = 201): DE48 domestic debit amount n12, count n3, credit amount n12, count n3,
        result n1, then zero foreign-card totals."""
        domestic = f"{debits[1]:012d}{debits[0]:03d}{credits[1]:012d}{credits[0]:03d}0"
        fields = {11: next_trace(), 41: self.terminal, 42: MERCHANT,
                  48: domestic + "0" * 31, 49: "156", 60: "00" + self.batch + "201"}  # fmt: skip
        return await self.send("0500", fields)
