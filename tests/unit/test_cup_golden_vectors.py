"""UnionPay POS golden frames derived by hand (tests/vectors/cup/, issue 25 item 3).

The frames were written out byte by byte from the published UnionPay POS field layout, each with its
derivation table (``NN-name.md``), not produced by our codec or pyiso8583. Three independent checks:

- each derivation table adds up: its offsets follow each other and its bytes are the frame;
- a small reader written here, from the layout and not from ``specs/cup-pos.toml``, walks each frame
  to exactly its fields, and every byte of every frame matters to it;
- our codec (profile ``cup-pos``) decodes each frame to exactly its fields, and encoding those fields
  gives back the same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.protocol.codec import Codec
from gateway.protocol.framing import FrameBuffer, encode_frame
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile

CUP_DIR = Path(__file__).resolve().parents[1] / "vectors" / "cup"
HEADER = bytes.fromhex("603100000000")


@dataclass(frozen=True)
class Golden:
    file: str
    description: str
    kind: str
    mti: str
    tpdu: bytes
    fields: dict[int, str]
    frame: bytes

    @property
    def message(self) -> Message:
        return Message(self.mti, dict(self.fields))


def load_golden() -> list[Golden]:
    vectors = []
    for line in (CUP_DIR / "frames.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            vectors.append(
                Golden(
                    file=raw["file"],
                    description=raw["description"],
                    kind=raw["kind"],
                    mti=raw["mti"],
                    tpdu=bytes.fromhex(raw["tpdu"]),
                    fields={int(number): value for number, value in raw["fields"].items()},
                    frame=bytes.fromhex(raw["frame_hex"]),
                )
            )
    return vectors


GOLDEN = load_golden()
IDS = [vector.kind for vector in GOLDEN]


# --- a reader written from the layout, independent of the codec and of specs/cup-pos.toml -------------
# number -> (kind, length prefix in bytes, fixed size, pad side). kind: "n" BCD digits, "z" BCD track
# data (separator nibble D), "a" ASCII, "b" binary. The size counts digits for n/z, bytes otherwise;
# a BCD length prefix counts the same unit. Odd digit counts carry one 0 nibble on the pad side.
LAYOUT: dict[int, tuple[str, int, int, str]] = {
    2: ("n", 1, 0, "R"), 3: ("n", 0, 6, ""), 4: ("n", 0, 12, ""), 11: ("n", 0, 6, ""),
    12: ("n", 0, 6, ""), 13: ("n", 0, 4, ""), 14: ("n", 0, 4, ""), 15: ("n", 0, 4, ""),
    22: ("n", 0, 3, "R"), 23: ("n", 0, 3, "L"), 25: ("n", 0, 2, ""), 26: ("n", 0, 2, ""),
    32: ("n", 1, 0, "R"), 35: ("z", 1, 0, "R"), 37: ("a", 0, 12, ""), 38: ("a", 0, 6, ""),
    39: ("a", 0, 2, ""), 41: ("a", 0, 8, ""), 42: ("a", 0, 15, ""), 44: ("a", 1, 0, ""),
    48: ("n", 2, 0, "R"), 49: ("a", 0, 3, ""), 52: ("b", 0, 8, ""), 53: ("n", 0, 16, ""),
    55: ("b", 2, 0, ""), 60: ("n", 2, 0, "R"), 61: ("n", 2, 0, "R"), 62: ("b", 2, 0, ""),
    63: ("a", 2, 0, ""), 64: ("b", 0, 8, ""),
}  # fmt: skip


class Unreadable(Exception):
    """The hand reader refuses the frame."""


def _bcd_digits(raw: bytes, allowed: str = "0123456789") -> str:
    text = raw.hex().upper()
    if any(nibble not in allowed for nibble in text):
        raise Unreadable("not BCD")
    return text


def read_by_hand(frame: bytes) -> tuple[bytes, str, dict[int, str]]:
    """(TPDU, MTI, fields) of one whole frame, length header included."""
    if int.from_bytes(frame[:2], "big") != len(frame) - 2:
        raise Unreadable("length header does not count the rest of the frame")
    tpdu, header = frame[2:7], frame[7:13]
    if tpdu[:1] != b"\x60" or header != HEADER:
        raise Unreadable("TPDU id or application header")
    mti = _bcd_digits(frame[13:15])
    bitmap = int.from_bytes(frame[15:23], "big")
    pos, fields = 23, {}
    for number in range(1, 65):
        if not bitmap >> (64 - number) & 1:
            continue
        if number not in LAYOUT:
            raise Unreadable(f"bit {number} is not in the layout")
        kind, prefix, size, pad = LAYOUT[number]
        count = int(_bcd_digits(frame[pos : pos + prefix])) if prefix else size
        pos += prefix
        width = (count + 1) // 2 if kind in "nz" else count
        raw = frame[pos : pos + width]
        pos += width
        if len(raw) != width or width == 0:
            raise Unreadable(f"field {number} runs past the frame")
        if kind in "nz":
            value = _bcd_digits(raw, "0123456789D" if kind == "z" else "0123456789")
            if count % 2:
                value, nibble = (value[1:], value[0]) if pad == "L" else (value[:-1], value[-1])
                if nibble != "0":
                    raise Unreadable(f"field {number}: pad nibble is not 0")
        elif kind == "a":
            value = raw.decode("ascii", errors="replace")
            if not value.isprintable() or "\ufffd" in value:
                raise Unreadable(f"field {number} is not printable ASCII")
        else:
            value = raw.hex().upper()
        fields[number] = value
    if pos != len(frame):
        raise Unreadable("bytes after the last field")
    return tpdu, mti, fields


# --- the derivation tables -------------------------------------------------------------------------
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([0-9A-Fa-f ]+?)\s*\|")
_TOTAL = re.compile(r"^Total: (\d+) bytes = 2 \+ (\d+)\.$", re.MULTILINE)


def derivation_rows(file: str) -> list[tuple[int, bytes]]:
    rows = []
    for line in (CUP_DIR / file).read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match:
            rows.append((int(match.group(1)), bytes.fromhex(match.group(2))))
    return rows


# --- tests ------------------------------------------------------------------------------------------


def test_the_golden_set_covers_the_messages_of_issue_25() -> None:
    required = {"sign_on", "sign_on_answer", "sale", "void", "refund", "reversal", "settlement", "settlement_answer"}
    extra = {"sale_answer", "pre_auth", "completion", "batch_upload", "batch_end"}

    assert set(IDS) == required | extra
    assert len(IDS) == len(set(IDS)) == 13
    assert sorted(path.name for path in CUP_DIR.glob("[0-9][0-9]-*.md")) == [vector.file for vector in GOLDEN]


@pytest.mark.parametrize("vector", GOLDEN, ids=IDS)
def test_each_derivation_table_adds_up_to_exactly_its_frame(vector: Golden) -> None:
    rows = derivation_rows(vector.file)
    text = (CUP_DIR / vector.file).read_text(encoding="utf-8")

    offsets = [offset for offset, _ in rows]
    expected = [sum(len(part) for _, part in rows[:index]) for index in range(len(rows))]
    assert offsets == expected, "an offset in the table does not follow from the rows above it"
    assert b"".join(part for _, part in rows) == vector.frame
    total = _TOTAL.search(text)
    assert total is not None
    assert (int(total.group(1)), int(total.group(2))) == (len(vector.frame), len(vector.frame) - 2)
    assert rows[3][1] == bytes.fromhex(vector.mti)  # the fourth row is the MTI


@pytest.mark.parametrize("vector", GOLDEN, ids=IDS)
def test_the_hand_reader_walks_each_frame_to_exactly_its_fields(vector: Golden) -> None:
    assert read_by_hand(vector.frame) == (vector.tpdu, vector.mti, vector.fields)


@pytest.mark.parametrize("vector", GOLDEN, ids=IDS)
def test_every_byte_of_a_frame_matters_to_the_hand_reader(vector: Golden) -> None:
    """Changing any one byte changes what the reader sees, or makes it refuse the frame."""
    original = read_by_hand(vector.frame)
    for index in range(len(vector.frame)):
        for changed in (vector.frame[index] ^ 0x01, vector.frame[index] ^ 0x10):
            corrupted = vector.frame[:index] + bytes([changed]) + vector.frame[index + 1 :]
            try:
                seen = read_by_hand(corrupted)
            except (Unreadable, ValueError, IndexError):
                continue
            assert seen != original, f"byte {index} changed but the reader saw the same message"


@pytest.mark.parametrize("vector", GOLDEN, ids=IDS)
def test_our_codec_decodes_each_golden_frame_to_exactly_its_fields(vector: Golden) -> None:
    profile = load_profile("cup-pos")

    frames = FrameBuffer(profile.framing).feed(vector.frame)

    assert len(frames) == 1
    assert frames[0].tpdu == vector.tpdu
    assert Codec(profile).decode(frames[0].payload) == vector.message


@pytest.mark.parametrize("vector", GOLDEN, ids=IDS)
def test_encoding_each_golden_vector_with_our_codec_gives_back_its_bytes(vector: Golden) -> None:
    profile = load_profile("cup-pos")

    payload = Codec(profile).encode(vector.message)

    assert encode_frame(profile.framing, payload, vector.tpdu) == vector.frame


def test_all_golden_frames_as_one_stream_in_one_byte_chunks_give_every_message_in_order() -> None:
    profile = load_profile("cup-pos")
    stream = b"".join(vector.frame for vector in GOLDEN)
    buffer = FrameBuffer(profile.framing)

    frames = []
    for index in range(len(stream)):
        frames.extend(buffer.feed(stream[index : index + 1]))

    codec = Codec(profile)
    assert [codec.decode(frame.payload) for frame in frames] == [vector.message for vector in GOLDEN]
    assert [frame.tpdu for frame in frames] == [vector.tpdu for vector in GOLDEN]
    assert buffer.buffered == 0


# The transaction is MTI + field 3 + 60.1 (issue 25); management messages are told apart by 60.3.
KINDS: dict[str, tuple[str, str | None, str, tuple[str, ...]]] = {
    "sign_on": ("0800", None, "00", ("001", "003", "004")),
    "sign_on_answer": ("0810", None, "00", ("001", "003", "004")),
    "sale": ("0200", "000000", "22", ("000",)),
    "sale_answer": ("0210", "000000", "22", ("000",)),
    "void": ("0200", "200000", "23", ("000",)),
    "refund": ("0220", "200000", "25", ("000",)),
    "reversal": ("0400", "000000", "22", ("000",)),
    "pre_auth": ("0100", "030000", "10", ("000",)),
    "completion": ("0200", "000000", "20", ("000",)),
    "settlement": ("0500", None, "00", ("201",)),
    "settlement_answer": ("0510", None, "00", ("201",)),
    "batch_upload": ("0320", None, "00", ("201",)),
    "batch_end": ("0320", None, "00", ("202", "207")),
}


@pytest.mark.parametrize("vector", GOLDEN, ids=IDS)
def test_each_golden_frame_is_the_unionpay_message_its_kind_says(vector: Golden) -> None:
    mti, processing_code, type_code, network_codes = KINDS[vector.kind]
    fields = vector.fields

    assert vector.mti == mti
    assert fields.get(3) == processing_code
    assert fields[60][:2] == type_code
    assert fields[60][2:8] == ("000122" if vector.kind == "sign_on" else "000123")
    assert fields[60][8:11] in network_codes
    if processing_code is not None:
        assert fields[25] == ("06" if vector.kind in ("pre_auth", "completion") else "00")
        assert fields[49] == "156"
    assert len(fields[41]) == 8 and len(fields[42]) == 15
    assert (vector.tpdu == bytes.fromhex("6000000003")) == (int(mti[2]) % 2 == 1)  # answers swap the TPDU


def test_the_corrections_point_at_their_originals_as_unionpay_terminals_do() -> None:
    by_kind = {vector.kind: vector.fields for vector in GOLDEN}
    sale, answer = by_kind["sale"], by_kind["sale_answer"]

    assert by_kind["void"][37] == answer[37] and by_kind["void"][38] == answer[38]
    assert by_kind["void"][61] == sale[60][2:8] + sale[11]  # 61 = original batch + original trace
    assert by_kind["void"][4] == sale[4] and by_kind["void"][2] == sale[2]
    assert by_kind["refund"][61] == "000000" + "000000" + "1205"  # zeros + original MMDD
    assert by_kind["completion"][61] == "000000" + "000000" + "1206"  # zeros + the pre-auth's MMDD
    assert by_kind["reversal"][39] == "98"
    assert by_kind["sign_on"][63] == "01 " and by_kind["settlement"][63] == "01 "
    assert by_kind["sign_on_answer"][60][2:8] == "000123"  # the batch the terminal uses from then on


def _totals(field_48: str) -> list[tuple[int, int, int, int, str]]:
    """Field 48 of 0500 / 0510: (debit amount, count, credit amount, count, result) domestic, foreign."""
    assert len(field_48) == 62
    halves = (field_48[:31], field_48[31:])
    return [(int(h[:12]), int(h[12:15]), int(h[15:27]), int(h[27:30]), h[30]) for h in halves]


def test_settlement_totals_and_the_answers_result_digits() -> None:
    by_kind = {vector.kind: vector.fields for vector in GOLDEN}
    request, answer = _totals(by_kind["settlement"][48]), _totals(by_kind["settlement_answer"][48])

    assert request == [(524350, 4, 8800, 1, "0"), (0, 0, 0, 0, "0")]
    assert answer == [(524350, 4, 8800, 1, "2"), (0, 0, 0, 0, "1")]  # 2 not balanced, 1 balanced
    assert by_kind["settlement_answer"][39] == "00"
    upload = by_kind["batch_upload"][48]
    assert (upload[:2], upload[2:4], upload[4:10]) == ("01", "00", by_kind["completion"][11])
    assert upload[10:30] == by_kind["completion"][2].ljust(20, "0")
    assert upload[30:] == by_kind["completion"][4]
    assert by_kind["batch_end"][48] == "0001"
