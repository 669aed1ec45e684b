"""``iso-terminal`` as a user runs it: a real process against a host on a real port."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from terminal_emulator import load_profile
from terminal_emulator.testing import StubHost

PROFILE = load_profile("iso87-binary")
ISO_TERMINAL = str(Path(sys.executable).parent / "iso-terminal")
PAN = "4761739001010119"


async def run_cli(*args: str, limit: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        ISO_TERMINAL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), limit)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_sale_exits_0_and_json_output_shows_the_answer_with_the_pan_masked(tmp_path: Path) -> None:
    async with StubHost(PROFILE) as host:
        code, out, _ = await run_cli("--port", str(host.port), "--journal", str(tmp_path / "j.json"), "--json",
                                     "sale", "--amount", "12.34")
    assert code == 0
    exchange = json.loads(out.strip().splitlines()[-1])
    assert exchange["mti"] == "0210"
    assert exchange["fields"]["39"] == "00"
    assert exchange["fields"]["37"] == "000000000001"
    assert exchange["request"]["fields"]["2"] == "476173******0119"
    assert exchange["request"]["fields"]["4"] == "000000001234"
    assert PAN not in out
    assert host.messages[0].fields[2] == PAN


async def test_a_declined_answer_still_exits_0(tmp_path: Path) -> None:
    from terminal_emulator.testing import approve

    async with StubHost(PROFILE, lambda m: approve(m, rrn="000000000001", code="51")) as host:
        code, out, _ = await run_cli("--port", str(host.port), "--journal", str(tmp_path / "j.json"), "sale",
                                     "--amount", "1")
    assert code == 0
    assert "<- 0210 51" in out


async def test_no_answer_exits_1_and_the_next_command_sends_the_reversal_first(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.json")
    answering = {"on": False}
    ref: list[StubHost] = []

    def handler(message):  # type: ignore[no-untyped-def]
        return ref[0].approve_all(message) if answering["on"] else None

    async with StubHost(PROFILE, handler) as host:
        ref.append(host)
        code, _, err = await run_cli("--port", str(host.port), "--journal", journal, "--timeout", "0.3",
                                     "sale", "--amount", "20.00")
        assert code == 1
        assert "no answer" in err
        assert PAN not in err
        answering["on"] = True
        code, out, _ = await run_cli("--port", str(host.port), "--journal", journal, "sale", "--amount", "5.00")
    assert code == 0
    assert host.mtis == ["0200", "0400", "0200"]
    assert "-> 0400 reversal" in out


async def test_an_unreachable_host_exits_1(tmp_path: Path) -> None:
    async with StubHost(PROFILE) as host:
        port = host.port
    code, _, err = await run_cli("--port", str(port), "--journal", str(tmp_path / "j.json"), "echo")
    assert code == 1
    assert "cannot connect" in err


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.json")
    results = await asyncio.gather(
        run_cli("--journal", journal, "sale", "--amount", "1.234"),
        run_cli("--journal", journal, "sale"),
        run_cli("--journal", journal, "void"),
        run_cli("--journal", journal, "--profile", "nope", "echo"),
        run_cli("--journal", journal, "--currency", "US", "echo"),
        run_cli("frobnicate"),
    )
    assert [code for code, _, _ in results] == [2] * 6


async def test_void_by_rrn_takes_the_amount_from_the_journal_of_an_earlier_command(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.json")
    async with StubHost(PROFILE) as host:
        base = ("--port", str(host.port), "--journal", journal, "--tid", "TERM0007")
        assert (await run_cli(*base, "sale", "--amount", "8.00"))[0] == 0
        assert (await run_cli(*base, "void", "--rrn", "000000000001"))[0] == 0
        code, out, _ = await run_cli(*base, "--json", "settle")
    assert code == 0
    void = host.messages[1]
    assert (void.fields[3], void.fields[4], void.fields[37], void.fields[41]) == (
        "020000", "000000000800", "000000000001", "TERM0007")
    settlement = json.loads(out.strip().splitlines()[-1])["request"]["fields"]
    assert settlement["76"] == "0000000000"
    assert host.messages[0].fields[11] == "000001"
    assert host.messages[2].fields[11] == "000003"


async def test_scenario_exits_0_when_every_expectation_holds_and_1_otherwise(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        'name: good\nsteps:\n  - id: sale\n    sale: {amount: "1.00"}\n    expect: {"39": "00"}\n'
        '  - refund: {rrn: "${sale.37}", amount: "1.00"}\n    expect: {"request.37": "${sale.37}"}\n'
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: bad\nsteps:\n  - sale: {amount: "1.00"}\n    expect: {"39": "51"}\n')
    async with StubHost(PROFILE) as host:
        ok = await run_cli("--port", str(host.port), "scenario", str(good))
        failed = await run_cli("--port", str(host.port), "scenario", str(bad))
        malformed = await run_cli("--port", str(host.port), "scenario", str(tmp_path / "missing.yaml"))
    assert ok[0] == 0, ok
    assert "-> 0200 purchase" in ok[1]
    assert "PASSED: good" in ok[1]
    assert failed[0] == 1
    assert "39: expected '51', got '00'" in failed[1]
    assert malformed[0] == 2


async def test_the_shipped_scenarios_can_be_listed_by_name() -> None:
    code, out, _ = await run_cli("scenario", "--list")
    assert code == 0
    assert "refund_wrong_amount" in out
    assert "settlement_mismatch" in out


async def test_refund_and_void_with_last_refer_to_the_latest_approved_sale_of_the_journal(tmp_path: Path) -> None:
    """The README tour refunds ``--last`` instead of a literal RRN, so it works on every run."""
    journal = str(tmp_path / "j.json")
    async with StubHost(PROFILE) as host:
        base = ("--port", str(host.port), "--journal", journal)
        for amount in ("12.34", "5.00"):
            assert (await run_cli(*base, "sale", "--amount", amount))[0] == 0
        code, out, _ = await run_cli(*base, "refund", "--last", "--amount", "1.00")
        assert code == 0, out
        code, out, _ = await run_cli(*base, "void", "--last")
        assert code == 0, out
    latest_sale, refund, void = host.messages[1:]
    assert (refund.fields[3], void.fields[3]) == ("200000", "020000")
    assert refund.fields[37] == void.fields[37] == "000000000002"  # the stub host's RRN for the second sale
    assert void.fields[4] == latest_sale.fields[4]  # the void's amount comes from the journal's record too


async def test_last_without_a_sale_in_the_journal_or_with_rrn_is_a_usage_error(tmp_path: Path) -> None:
    async with StubHost(PROFILE) as host:
        base = ("--port", str(host.port), "--journal", str(tmp_path / "j.json"))
        code, _, err = await run_cli(*base, "refund", "--last", "--amount", "1.00")
        assert code == 2
        assert "no approved purchase or completion" in err
        code, _, err = await run_cli(*base, "void", "--last", "--rrn", "000000000001")
        assert code == 2
        assert "--rrn or --last" in err
    assert host.messages == []


async def test_a_scenario_stops_at_the_first_connection_failure_with_one_clear_line(tmp_path: Path) -> None:
    async with StubHost(PROFILE) as host:
        port = host.port  # closed again: nothing listens there
    code, out, _ = await run_cli("--port", str(port), "scenario", "double_refund", "demo")
    assert code == 1
    lines = out.splitlines()
    assert lines[:2] == [
        "scenario: Double refund",
        f"  [STOPPED] sale: cannot connect to 127.0.0.1:{port}: connection refused; 3 later step(s) not played",
    ]
    assert "stopped: 1 more scenario(s) not played" in lines
    assert "has no value" not in out
    assert "scenario: A day at the till" not in out  # the next scenario is not played against the same dead host
