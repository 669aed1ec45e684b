"""``iso-host`` as an integrator runs it: a real process on a real port, stopped by a signal."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import pytest
from harness import CARD, IsoClient

ISO_HOST = str(Path(sys.executable).parent / "iso-host")


async def start_host(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """``iso-host serve --listen 127.0.0.1:0 ...`` and the port it says it listens on."""
    process = await asyncio.create_subprocess_exec(
        ISO_HOST, "serve", "--listen", "127.0.0.1:0", *args, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while line := (await process.stderr.readline()).decode():
            if found := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                return process, int(found.group(1))
    raise AssertionError(f"iso-host stopped before listening (exit code {await process.wait()})")


async def stop_host(process: asyncio.subprocess.Process, signum: int = signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(signum)
    assert process.stderr is not None
    rest = await asyncio.wait_for(process.stderr.read(), 30)
    code = await asyncio.wait_for(process.wait(), 30)
    return code, rest.decode()


async def run(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        ISO_HOST, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_answers_logs_one_masked_line_per_request_and_exits_0_on_a_signal(
    tmp_path: Path, signum: int
) -> None:
    rules = tmp_path / "host.yaml"
    rules.write_text('rule:\n  - name: limit\n    when: {amount_over: 100000}\n    then: {code: "51"}\n')
    journal = tmp_path / "received.jsonl"
    process, port = await start_host("--rules", str(rules), "--journal", str(journal))
    try:
        client = await IsoClient.connect(port)
        approved = await client.sale(1000)
        declined = await client.sale(200000)
        await client.close()
    finally:
        code, log = await stop_host(process, signum)
    assert (approved[39], declined[39]) == ("00", "51")
    assert code == 0
    request_lines = [line for line in log.splitlines() if " 0200 " in line]
    assert len(request_lines) == 2
    assert "476173******0119" in request_lines[0] and "-> 0210 00" in request_lines[0]
    assert "-> 0210 51" in request_lines[1] and "rule 1 'limit'" in request_lines[1]
    assert CARD not in log
    assert "stopped after 2 request(s)" in log
    assert [json.loads(line)["response_code"] for line in journal.read_text().splitlines()] == ["00", "51"]


async def test_a_rules_file_with_a_mistake_stops_serve_with_exit_2_and_names_it(tmp_path: Path) -> None:
    rules = tmp_path / "host.toml"
    rules.write_text('[[rule]]\nwhen = { amount_over = 100000 }\nthen = { code = "51" }\n'
                     '[[rule]]\nwhen = { mti = "0420" }\nthen = { drop = "yes" }\n')
    code, _, err = await run("serve", "--listen", "127.0.0.1:0", "--rules", str(rules))
    assert code == 2
    assert f"iso-host: error: {rules}: rule 2: then.drop: must be true or false, got 'yes'" in err
    assert "Traceback" not in err


async def test_check_rules_lists_valid_rules_and_refuses_a_bad_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[rule]]\nname = "flaky"\nwhen = { mti = ["0420", "0421"] }\nthen = { drop = true, times = 2 }\n'
                    "[[rule]]\nwhen = { pan_fails_luhn = true }\nthen = { code = \"14\", delay_ms = 50 }\n")
    code, out, _ = await run("check-rules", str(good))
    assert code == 0
    assert "rule 1 'flaky': when mti=0420,0421 -> drop=true times=2" in out
    assert "rule 2: when pan_fails_luhn=true -> code=14 delay_ms=50" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]]\nwhen = { amount_over = 100 }\n")
    code, _, err = await run("check-rules", str(bad))
    assert (code, err.strip()) == (2, f"iso-host: error: {bad}: rule 1: missing `then` (what to do: code, delay_ms, "
                                      "drop, close, times)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "8600"), "--listen must be HOST:PORT"),
        (("--profile", "nope"), "wire profile 'nope' not found"),
        (("--profile", "cup-pos"), "uses dialect 'cup'; the host simulator speaks iso87 only"),
        (("--tls-key", "k.pem"), "--tls-key needs --tls-cert"),
    ],
)
async def test_bad_options_exit_2_with_a_reason(args: tuple[str, ...], message: str) -> None:
    code, _, err = await run("serve", *args)
    assert code == 2
    assert message in err


async def test_a_journal_that_cannot_be_written_exits_1(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    code, _, err = await run("serve", "--listen", "127.0.0.1:0", "--journal", str(tmp_path / "a-file" / "j.jsonl"))
    assert code == 1
    assert f"cannot write the journal {tmp_path / 'a-file' / 'j.jsonl'}" in err


async def test_an_address_in_use_exits_1() -> None:
    process, port = await start_host()
    try:
        code, _, err = await run("serve", "--listen", f"127.0.0.1:{port}")
    finally:
        await stop_host(process)
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err
