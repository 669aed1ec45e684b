"""The iso-gateway command line: check-config, outbox status, batches, and clean failures."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from harness import IsoClient, gateway_settings, running_gateway
from typer.testing import CliRunner, Result

from gateway.cli import app, describe_validation_error, env_name
from gateway.config import DEV_PAN_HMAC_KEY
from gateway.logs import reset_logging
from gateway.protocol.profile import SPECS_DIR

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Only the GATEWAY_* variables a test sets; run from an empty folder."""
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    reset_logging()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_lists_every_setting_by_its_environment_variable() -> None:
    result = invoke("check-config")
    assert result.exit_code == 0, result.output
    for variable in ("GATEWAY_LISTEN", "GATEWAY_POLICY__VELOCITY__CARD_DAILY_AMOUNT", "GATEWAY_TLS__CLIENT_CA"):
        assert variable in result.stdout
    assert "127.0.0.1:8583" in result.stdout
    assert "profile iso87-binary: ok" in result.stdout


def test_check_config_hides_the_hmac_key_and_url_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PAN_HMAC_KEY", "s3cret-hmac-key-value")
    monkeypatch.setenv("GATEWAY_MQTT_URL", "mqtt://relay:hunter2@broker:1883")
    for args in (("check-config",), ("check-config", "--json")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "s3cret-hmac-key-value" not in result.output
        assert "hunter2" not in result.output
        assert "mqtt://relay:********@broker:1883" in result.output


def test_check_config_json_holds_the_settings_and_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PROFILE", "iso87-ascii")
    monkeypatch.setenv("GATEWAY_POLICY__REFUND_WINDOW_DAYS", "7")
    result = invoke("check-config", "--json")
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.stdout)
    assert data["settings"]["policy"]["refund_window_days"] == 7
    assert data["settings"]["pan_hmac_key"] is None  # unset: a random key beside the ledger
    assert data["profile"]["name"] == "iso87-ascii"
    assert data["profile"]["framing"] == "4a"


def test_check_config_refuses_the_development_hmac_key_and_warns_of_it_in_dev_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_PAN_HMAC_KEY", DEV_PAN_HMAC_KEY)
    refused = invoke("check-config")
    assert refused.exit_code == 2 and "GATEWAY_PAN_HMAC_KEY" in refused.output
    monkeypatch.setenv("GATEWAY_DEV_MODE", "1")
    result = invoke("check-config", "--json")
    assert "development key" in result.stderr
    assert "development key" not in result.stdout  # the JSON stays clean
    monkeypatch.setenv("GATEWAY_PAN_HMAC_KEY", "a-real-key")
    assert "development key" not in invoke("check-config").stderr


def test_config_works_before_the_command_and_after_it_and_the_later_one_wins(tmp_path: Path) -> None:
    first = write(tmp_path / "first.toml", 'instance_id = "from-first"\n')
    second = write(tmp_path / "second.toml", 'instance_id = "from-second"\n')

    def instance(*args: str) -> str:
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return str(orjson.loads(result.stdout)["settings"]["instance_id"])

    assert instance("--config", str(first), "check-config", "--json") == "from-first"
    assert instance("check-config", "--config", str(second), "--json") == "from-second"
    assert instance("-c", str(first), "check-config", "-c", str(second), "--json") == "from-second"


def test_the_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "gw.toml", 'listen = "0.0.0.0:9000"\n[policy]\nrefund_window_days = 40\n')
    monkeypatch.setenv("GATEWAY_POLICY__REFUND_WINDOW_DAYS", "5")
    settings = orjson.loads(invoke("--config", str(config), "check-config", "--json").stdout)["settings"]
    assert settings["listen"] == "0.0.0.0:9000"
    assert settings["policy"]["refund_window_days"] == 5


def test_invalid_settings_exit_2_naming_the_variable_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_POLICY__REFUND_WINDOW_DAYS", "-3")
    monkeypatch.setenv("GATEWAY_LEDGER_URL", "mysql://gw:hunter2@db/ledger")
    result = invoke("check-config")
    assert result.exit_code == 2
    assert "invalid settings" in result.stderr
    assert "policy.refund_window_days (GATEWAY_POLICY__REFUND_WINDOW_DAYS)" in result.stderr
    assert "greater than or equal to 0 (got '-3')" in result.stderr
    assert "ledger_url (GATEWAY_LEDGER_URL): ledger_url must start with" in result.stderr
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


def test_a_bad_value_in_the_config_file_and_an_unknown_key_are_reported(tmp_path: Path) -> None:
    config = write(tmp_path / "gw.toml", 'lissen = "0.0.0.0:1"\n[settlement]\ntimezone = "Mars/Base"\n')
    result = invoke("check-config", "--config", str(config))
    assert result.exit_code == 2
    assert "lissen: unknown setting" in result.stderr
    assert "settlement.timezone (GATEWAY_SETTLEMENT__TIMEZONE): unknown time zone 'Mars/Base'" in result.stderr


def test_a_config_file_that_is_not_toml_or_does_not_exist_exits_2(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.toml", "listen = [unclosed\n")
    result = invoke("check-config", "--config", str(broken))
    assert result.exit_code == 2
    assert "not valid TOML" in result.stderr
    assert "line 1" in result.stderr

    result = invoke("--config", str(tmp_path / "absent.toml"), "check-config")
    assert result.exit_code == 2
    assert "configuration file not found" in result.stderr


def test_a_broken_profile_is_reported_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = (REPO / "specs" / "iso87-binary.toml").read_text(encoding="utf-8")
    assert 'header = "2b"' in shipped
    profile = write(tmp_path / "mine.toml", shipped.replace('header = "2b"', 'header = "3b"'))
    monkeypatch.setenv("GATEWAY_PROFILE", str(profile))
    result = invoke("check-config")
    assert result.exit_code == 2
    assert f"error: GATEWAY_PROFILE: {profile}: framing.header" in result.stderr
    assert "3b" in result.stderr
    assert "Traceback" not in result.output

    monkeypatch.setenv("GATEWAY_PROFILE", "no-such-profile")
    result = invoke("check-config")
    assert result.exit_code == 2
    assert "no-such-profile" in result.stderr


def test_a_profile_whose_dialect_is_not_implemented_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = tmp_path / "amex-pos.toml"
    profile.write_text((SPECS_DIR / "cup-pos.toml").read_text().replace('name = "cup"', 'name = "amex"'))
    monkeypatch.setenv("GATEWAY_PROFILE", str(profile))
    result = invoke("check-config")
    assert result.exit_code == 2
    assert "uses dialect 'amex'; this release implements iso87, cup only" in result.stderr


def test_the_cup_pos_profile_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PROFILE", "cup-pos")
    assert invoke("check-config").exit_code == 0


def test_certificate_files_that_do_not_exist_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TLS__CERT", str(tmp_path / "server.pem"))
    result = invoke("check-config")
    assert result.exit_code == 2
    assert f"error: GATEWAY_TLS__CERT: no such file: {tmp_path / 'server.pem'}" in result.stderr


def test_brackets_in_an_error_are_printed_not_taken_for_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LISTEN", "[bold]:99999")
    result = invoke("check-config")
    assert result.exit_code == 2
    assert "got '[bold]:99999'" in result.stderr


def test_serve_refuses_invalid_settings_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LISTEN", "nowhere:99999")
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "json")
    result = invoke("serve")
    assert result.exit_code == 2
    (line,) = [orjson.loads(text) for text in result.stdout.splitlines()]
    assert (line["event"], line["setting"]) == ("gateway.start_failed", "GATEWAY_LISTEN")
    assert line["detail"] == "expected host:port, got 'nowhere:99999'"


def test_outbox_status_and_batches_need_an_existing_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LEDGER_URL", f"sqlite:///{tmp_path / 'absent.db'}")
    for args in (("outbox", "status"), ("batches",)):
        result = invoke(*args)
        assert result.exit_code == 2
        assert "no ledger at" in result.stderr
    assert not (tmp_path / "absent.db").exists()  # looking did not create one


def test_batches_and_outbox_status_read_what_the_gateway_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gateway_settings(tmp_path)

    async def traffic() -> None:
        async with running_gateway(settings) as gateway:
            client = await IsoClient.connect(gateway.port)
            sale = await client.sale(1234)
            await client.sale(500, terminal="TERM0002")
            refund = await client.refund(sale[37], 200)
            await client.close()
            assert (sale[39], refund[39]) == ("00", "00")

    asyncio.run(traffic())
    reset_logging()
    monkeypatch.setenv("GATEWAY_LEDGER_URL", settings.ledger_url)

    result = invoke("batches", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["terminal_id"]: row for row in orjson.loads(result.stdout)}
    assert set(rows) == {"TERM0001", "TERM0002"}
    first = rows["TERM0001"]
    assert first["state"] == "open"
    assert (first["debit_count"], first["debit_amount"]) == (1, 1234)
    assert (first["credit_count"], first["credit_amount"]) == (1, 200)
    assert first["currency"] == "840"

    only = orjson.loads(invoke("batches", "--terminal", "TERM0002", "--open", "--json").stdout)
    assert [row["terminal_id"] for row in only] == ["TERM0002"]
    assert orjson.loads(invoke("batches", "--merchant", "SOMEONE-ELSE", "--json").stdout) == []

    table = invoke("batches")
    assert table.exit_code == 0
    assert "TERM0001" in table.stdout
    assert "1 / 1234" in table.stdout
    assert "1 / 200" in table.stdout

    status = invoke("outbox", "status", "--json")
    assert status.exit_code == 0, status.output
    data = orjson.loads(status.stdout)
    assert set(data) == {"pending", "oldest_pending_at", "last_error", "last_error_at", "last_sent_at"}
    assert data["pending"] >= 0
    text = invoke("outbox", "status")
    assert text.exit_code == 0
    assert "pending" in text.stdout


def test_version_prints_the_package_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("iso-gateway ")


def test_environment_names_follow_the_prefix_and_double_underscore_rule() -> None:
    assert env_name(("listen",)) == "GATEWAY_LISTEN"
    assert env_name(("policy", "velocity", "card_daily_count")) == "GATEWAY_POLICY__VELOCITY__CARD_DAILY_COUNT"


def test_a_validation_error_never_shows_the_hmac_key_value() -> None:
    from pydantic import ValidationError

    from gateway.config import Settings

    with pytest.raises(ValidationError) as caught:
        Settings(pan_hmac_key=12345, listen="bad:port")
    text = describe_validation_error(caught.value)
    assert "12345" not in text
    assert "pan_hmac_key (GATEWAY_PAN_HMAC_KEY)" in text


def test_batches_and_outbox_status_of_a_file_that_is_no_ledger_fail_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = write(tmp_path / "notes.db", "not a ledger\n")
    monkeypatch.setenv("GATEWAY_LEDGER_URL", f"sqlite:///{notes}")
    for args in (("batches",), ("outbox", "status")):
        result = invoke(*args)
        assert result.exit_code == 2
        assert result.stderr.startswith("error: GATEWAY_LEDGER_URL: cannot open the ledger")
        assert "Traceback" not in result.output
