"""The emulator as a UnionPay POS terminal, over TCP, against a fake cup host that lives in this file.

The fake host reads requests with the emulator's codec (those frames are checked byte for byte against
the independent vectors in tests/unit/test_terminal_cup_vectors.py) but writes its answers by hand,
byte by byte (BCD, LLLVAR BCD lengths, swapped TPDU), so an encoding bug of the emulator cannot
answer itself. It needs no gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from terminal_emulator import Journal, Terminal, load_profile
from terminal_emulator.codec import IsoMessage, decode_message
from terminal_emulator.errors import ResponseTimeout
from terminal_emulator.framing import FrameDecoder

PROFILE = load_profile("cup-pos")
TPDU = bytes.fromhex("6000030000")
HOST_DATE = "1207"
PAN = "6217001234567890122"
ISO_TERMINAL = str(Path(sys.executable).parent / "iso-terminal")
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "cup-pos.jsonl"  # a copy of the shared vectors


# --- answers written by hand --------------------------------------------------------------------
def _bcd(digits: str) -> bytes:
    return bytes.fromhex(digits + "0" * (len(digits) % 2))


def _lllvar_bcd(digits: str) -> bytes:
    return bytes.fromhex(f"{len(digits):04d}") + _bcd(digits)


def _ascii(text: str) -> bytes:
    return text.encode("ascii")


ENCODERS: dict[int, Callable[[str], bytes]] = {
    3: _bcd, 4: _bcd, 11: _bcd, 12: _bcd, 13: _bcd, 25: _bcd, 37: _ascii, 38: _ascii, 39: _ascii, 41: _ascii,
    42: _ascii, 48: _lllvar_bcd, 49: _ascii, 60: _lllvar_bcd,
}


def answer_frame(mti: str, fields: dict[int, str], request_tpdu: bytes) -> bytes:
    """``2-byte length | TPDU with destination and source swapped | 603100000000 | MTI | bitmap | fields``."""
    bitmap = 0
    for number in fields:
        bitmap |= 1 << (64 - number)
    body = bytes.fromhex("603100000000") + _bcd(mti) + bitmap.to_bytes(8, "big")
    body += b"".join(ENCODERS[n](fields[n]) for n in sorted(fields))
    tpdu = request_tpdu[:1] + request_tpdu[3:5] + request_tpdu[1:3]
    return (len(tpdu) + len(body)).to_bytes(2, "big") + tpdu + body


def test_the_hand_written_answers_are_the_independent_encoders_bytes() -> None:
    if not VECTORS.exists():
        pytest.skip("cup-pos.jsonl not delivered")
    for line in VECTORS.read_text().splitlines():
        vector = json.loads(line)
        if vector["mti"] in ("0810", "0510"):
            fields = {int(k): v for k, v in vector["fields"].items()}
            built = answer_frame(vector["mti"], fields, bytes.fromhex("6000000003"))  # swapped back to 60 0003 0000
            assert built.hex() == vector["frame_hex"], vector["description"]


@dataclass
class FakeCupHost:
    """Answers every request 00 (RRNs from the date and trace), a sign-on with ``batch``, a settlement
    with the result digit ``verdict``; requests whose trace is in ``silent`` get no answer."""

    batch: int = 5
    verdict: str = "2"
    silent: set[str] = field(default_factory=set)
    received: list[IsoMessage] = field(default_factory=list)
    tpdus: list[bytes] = field(default_factory=list)
    port: int = 0

    def answer(self, request: IsoMessage) -> dict[int, str]:
        fields = {n: v for n, v in request.fields.items() if n in (3, 4, 11, 25, 41, 42, 49, 60)}
        fields |= {12: "103020", 13: HOST_DATE, 39: "00"}
        if request.mti == "0800":
            fields[60] = f"00{self.batch:06d}003"
        elif request.mti == "0500":
            sent = request.fields[48]
            fields[48] = sent[:30] + self.verdict + sent[31:]
        elif request.mti[1] in "12":
            fields[37] = f"{HOST_DATE}{request.fields[11]:0>8}"
            fields[38] = "A" + request.fields[11][1:]
        return fields

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(PROFILE.framing)
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                for body in decoder.feed(chunk):
                    request = decode_message(PROFILE, body)
                    self.received.append(request)
                    assert decoder.last_tpdu is not None
                    self.tpdus.append(decoder.last_tpdu)
                    if request.stan in self.silent and request.mti[1] != "4":
                        continue
                    mti = f"{request.mti[:2]}{int(request.mti[2]) + 1}0"
                    writer.write(answer_frame(mti, self.answer(request), decoder.last_tpdu))
                await writer.drain()
        writer.close()

    @property
    def mtis(self) -> list[str]:
        return [m.mti for m in self.received]


@contextlib.asynccontextmanager
async def fake_cup_host(**options: object) -> AsyncIterator[FakeCupHost]:
    host = FakeCupHost(**options)  # type: ignore[arg-type]
    server = await asyncio.start_server(host.serve, "127.0.0.1", 0)
    host.port = server.sockets[0].getsockname()[1]
    async with server:
        yield host


def cup_terminal(port: int, journal: Journal | Path | None = None) -> Terminal:
    return Terminal("127.0.0.1", port, profile=PROFILE, tid="POS00001", mid="898310048990001",
                    journal=journal, timeout=2, tpdu=TPDU)


# --- the terminal API ----------------------------------------------------------------------------
async def test_a_day_signs_on_into_the_hosts_batch_and_names_originals_by_batch_trace_and_date() -> None:
    async with fake_cup_host(batch=5) as host, cup_terminal(host.port) as terminal:
        signon = await terminal.signon("01")
        assert (signon.request.mti, signon.request.fields[60], signon.request.fields[63]) == ("0800", "00000001003",
                                                                                               "01 ")
        assert terminal.journal.batch == 5
        sale = await terminal.sale(10000)
        assert sale.request.fields[60] == "22000005000601"
        assert (sale.request.fields[3], sale.request.fields[25], sale.request.fields[49]) == ("000000", "00", "156")
        refund = await terminal.refund(sale.rrn, amount=3000)
        assert (refund.request.mti, refund.request.fields[3], refund.request.fields[60]) == ("0220", "200000",
                                                                                             "25000005000")
        assert refund.request.fields[37] == sale.rrn
        assert refund.request.fields[61] == "000000000000" + HOST_DATE
        second = await terminal.sale(2000)
        void = await terminal.void(second.rrn or "")
        assert (void.request.fields[60], void.request.fields[61]) == ("23000005000", "000005" + second.request.stan)
        assert void.request.fields[4] == "000000002000"
    assert all(t == TPDU for t in host.tpdus)
    assert [r.response_code for r in (signon, sale, refund, second, void)] == ["00"] * 5


async def test_a_settlement_not_balanced_uploads_the_batch_then_ends_it_and_opens_the_next_batch() -> None:
    async with fake_cup_host(batch=7, verdict="2") as host, cup_terminal(host.port) as terminal:
        await terminal.signon()
        sale = await terminal.sale(10000)
        refund = await terminal.refund(sale.rrn, amount=3000)
        voided = await terminal.sale(500)
        await terminal.void(voided.rrn or "")
        settle = await terminal.settle()
        assert terminal.reconciliation(settle) == "not_balanced"
        assert settle.request.fields[48] == "000000010000001000000003000001" + "0" + "0" * 31
        assert settle.request.fields[60] == "00000007201"
        uploads = host.received[-3:]
        assert [m.mti for m in uploads] == ["0320", "0320", "0320"]
        assert [m.fields[60] for m in uploads] == ["00000007201", "00000007201", "00000007207"]
        # 48: one transaction, organisation 00 (UnionPay card), its trace, PAN n20, amount
        assert uploads[0].fields[48] == f"0100{sale.request.stan}{PAN}0" + "000000010000"
        assert uploads[1].fields[48] == f"0100{refund.request.stan}{PAN}0" + "000000003000"
        assert uploads[2].fields[48] == "0002"
        assert voided.request.stan not in "".join(m.fields[48] for m in uploads)
        assert terminal.journal.batch == 8
        nxt = await terminal.sale(100)
        assert nxt.request.fields[60].startswith("22000008")


async def test_a_balanced_settlement_uploads_nothing() -> None:
    async with fake_cup_host(verdict="1") as host, cup_terminal(host.port) as terminal:
        await terminal.sale(100)
        settle = await terminal.settle()
        assert terminal.reconciliation(settle) == "balanced"
        assert host.mtis == ["0200", "0500"]
        assert terminal.journal.batch == 2


async def test_an_unanswered_sale_is_reversed_with_its_own_trace_and_60_and_reason_98() -> None:
    async with fake_cup_host() as host, cup_terminal(host.port) as terminal:
        host.silent.add("000001")
        with pytest.raises(ResponseTimeout):
            await terminal.sale(1500)
        assert terminal.journal.pending_reversal is not None
        nxt = await terminal.sale(2500)
        assert nxt.approved
    reversal, lost = host.received[1], host.received[0]
    assert reversal.mti == "0400"
    assert {n: reversal.fields[n] for n in (3, 4, 11, 25, 60)} == {n: lost.fields[n] for n in (3, 4, 11, 25, 60)}
    assert (reversal.fields[39], reversal.fields[2]) == ("98", PAN)
    assert nxt.request.stan == "000002"  # the reversal took no trace number of its own
    assert terminal.journal.pending_reversal is None
    assert terminal.journal.transactions[0].status == "reversed"


async def test_the_trace_wraps_after_999999_and_the_batch_after_999999() -> None:
    journal = Journal(stan=999_998, batch=999_999)
    async with fake_cup_host(verdict="1") as host, cup_terminal(host.port, journal) as terminal:
        first = await terminal.sale(100)
        second = await terminal.sale(100)
        await terminal.settle()
    assert (first.request.stan, second.request.stan) == ("999999", "000001")
    assert host.received[-1].fields[60] == "00999999201"
    assert journal.batch == 1


async def test_a_manual_reversal_repeats_the_original_with_reason_06_and_cannot_be_partial() -> None:
    from terminal_emulator.errors import UsageError

    async with fake_cup_host() as host, cup_terminal(host.port) as terminal:
        sale = await terminal.sale(700)
        with pytest.raises(UsageError, match="partial"):
            await terminal.reverse(sale.rrn, partial_amount=100)
        reversal = await terminal.reverse(sale.rrn)
    assert (reversal.request.mti, reversal.request.stan, reversal.request.fields[39]) == ("0400", "000001", "06")
    assert host.mtis == ["0200", "0400"]


# --- the command line -----------------------------------------------------------------------------
async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        ISO_TERMINAL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_iso_terminal_with_profile_cup_pos_signs_on_sells_voids_refunds_and_settles(tmp_path: Path) -> None:
    async with fake_cup_host(batch=3, verdict="2") as host:
        base = ["--port", str(host.port), "--profile", "cup-pos", "--tpdu", "6000030000",
                "--journal", str(tmp_path / "pos.json")]
        outputs = []
        for command in (["signon"], ["sale", "--amount", "88.00"], ["sale", "--amount", "12.00"], ["void", "--last"],
                        ["refund", "--last", "--amount", "8.00"], ["--json", "settle"]):
            code, out, err = await run_cli(*base, *command)
            assert code == 0, (command, err)
            outputs.append(out)
    assert "batch 000003" in outputs[0]
    assert [m.mti for m in host.received[:6]] == ["0800", "0200", "0200", "0200", "0220", "0500"]
    void, refund = host.received[3], host.received[4]
    assert void.fields[61] == "000003" + host.received[2].stan
    assert refund.fields[37] == f"{HOST_DATE}{host.received[1].stan:0>8}"
    settle, *uploads = (json.loads(line) for line in outputs[5].splitlines())
    assert (settle["mti"], settle["fields"]["48"][30]) == ("0510", "2")
    assert [u["request"]["fields"]["60"][-3:] for u in uploads] == ["201", "201", "207"]
    assert uploads[0]["request"]["fields"]["48"][10:30] == "621700**********1220"  # the PAN n20, masked
    assert host.mtis[6:] == ["0320", "0320", "0320"]
    journal = json.loads((tmp_path / "pos.json").read_text())
    assert (journal["batch"], journal["stan"]) == (4, 9)
    assert PAN not in "".join(outputs) and PAN not in (tmp_path / "pos.json").read_text()
    assert "621700*********0122" in outputs[1]
