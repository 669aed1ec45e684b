"""The tests' own UnionPay frame builder (tests/cup_frames.py) gives the shared vectors' bytes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cup_frames
import pytest

VECTORS = [json.loads(line) for line in
           (Path(__file__).resolve().parents[1] / "vectors" / "cup-pos.jsonl").read_text().splitlines()]  # fmt: skip


def test_the_shared_file_holds_the_eleven_frames_of_its_readme() -> None:
    assert len(VECTORS) == 11


@pytest.mark.parametrize("raw", VECTORS, ids=[raw["description"] for raw in VECTORS])
def test_the_builder_gives_each_vector_frame_byte_for_byte(raw: dict[str, Any]) -> None:
    fields = {int(number): value for number, value in raw["fields"].items()}

    assert cup_frames.build(raw["mti"], fields).hex() == raw["frame_hex"]


@pytest.mark.parametrize("raw", VECTORS, ids=[raw["description"] for raw in VECTORS])
def test_the_reader_gives_each_vector_frame_its_fields(raw: dict[str, Any]) -> None:
    tpdu, mti, fields = cup_frames.parse(bytes.fromhex(raw["frame_hex"])[2:])

    assert (tpdu, mti) == (cup_frames.TPDU, raw["mti"])
    assert fields == {int(number): value for number, value in raw["fields"].items()}
