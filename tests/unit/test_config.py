"""Settings: GATEWAY_* variables with __ nesting, an optional TOML file under them, clear errors."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gateway.config import DEV_PAN_HMAC_KEY, Settings, load_settings, split_host_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the GATEWAY_* variables they set themselves."""
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def setting_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf setting of ``model`` as a path of field names, nested models included."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_paths(annotation, (*prefix, name))
        else:
            yield (*prefix, name)


def test_the_defaults_are_those_of_the_design() -> None:
    settings = Settings()
    assert settings.listen == "127.0.0.1:8583"
    assert settings.profile == "iso87-binary"
    assert settings.ledger_url == "sqlite:///./gateway.db"
    assert settings.mqtt_url == "auto"  # issue 22: a broker already on the port, else the embedded one
    assert settings.mqtt_topic_prefix == "pos/corrections"
    assert settings.policy.refund_window_days == 30
    assert settings.policy.preauth_validity_days == 30
    assert settings.policy.completion_tolerance_pct == 15
    assert settings.standin.max_amount == 1_000_000


def test_variables_with_the_gateway_prefix_set_top_level_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LISTEN", "0.0.0.0:9000")
    monkeypatch.setenv("GATEWAY_PROFILE", "iso87-ascii")
    monkeypatch.setenv("GATEWAY_MQTT_URL", "mqtt://broker:1883")
    monkeypatch.setenv("GATEWAY_INSTANCE_ID", "gw-a")
    monkeypatch.setenv("LISTEN", "1.2.3.4:1")  # no prefix: ignored
    settings = load_settings()
    assert settings.listen == "0.0.0.0:9000"
    assert settings.profile == "iso87-ascii"
    assert settings.mqtt_url == "mqtt://broker:1883"
    assert settings.instance_id == "gw-a"
    assert split_host_port(settings.listen, 1) == ("0.0.0.0", 9000)


def test_double_underscores_reach_nested_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_POLICY__REFUND_WINDOW_DAYS", "60")
    monkeypatch.setenv("GATEWAY_POLICY__VELOCITY__CARD_DAILY_COUNT", "3")
    monkeypatch.setenv("GATEWAY_POLICY__UNREFERENCED_REFUND_TERMINALS", '["TERM0001", "M1/T2"]')
    monkeypatch.setenv("GATEWAY_SETTLEMENT__CUTOFF", "23:30")
    monkeypatch.setenv("GATEWAY_STANDIN__CHECK_LUHN", "false")
    settings = load_settings()
    assert settings.policy.refund_window_days == 60
    assert settings.policy.velocity.card_daily_count == 3
    assert settings.policy.unreferenced_refund_terminals == ["TERM0001", "M1/T2"]
    assert settings.settlement.cutoff == time(23, 30)
    assert settings.standin.check_luhn is False
    assert settings.unreferenced_refunds_allowed("M1", "T2")
    assert not settings.unreferenced_refunds_allowed("M2", "T2")


def test_a_toml_file_supplies_settings_and_the_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "gateway.toml",
        'listen = "0.0.0.0:8000"\n'
        'instance_id = "from-file"\n'
        "[policy]\nrefund_window_days = 45\ncompletion_tolerance_pct = 20\n"
        '[settlement]\ncutoff = "22:00"\ntimezone = "Asia/Shanghai"\n',
    )
    monkeypatch.setenv("GATEWAY_INSTANCE_ID", "from-env")
    monkeypatch.setenv("GATEWAY_POLICY__REFUND_WINDOW_DAYS", "10")
    settings = load_settings(config)
    assert settings.listen == "0.0.0.0:8000"
    assert settings.instance_id == "from-env"
    assert settings.policy.refund_window_days == 10
    assert settings.policy.completion_tolerance_pct == 20  # the file's, untouched by the environment
    assert settings.settlement.timezone == "Asia/Shanghai"


def test_a_missing_config_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"configuration file not found: .*absent\.toml"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("variable", "value", "location", "says"),
    [
        ("GATEWAY_LISTEN", "localhost:99999", ("listen",), "expected host:port"),
        ("GATEWAY_LEDGER_URL", "mysql://db/x", ("ledger_url",), "must start with sqlite:/// or postgresql://"),
        ("GATEWAY_MQTT_URL", "amqp://broker", ("mqtt_url",), "'auto', 'embedded', mqtt://... or mqtts://..."),
        ("GATEWAY_POLICY__REFUND_WINDOW_DAYS", "-1", ("policy", "refund_window_days"), "greater than or equal"),
        ("GATEWAY_POLICY__DUPLICATE_TTL_HOURS", "2", ("policy", "duplicate_ttl_hours"), "greater than or equal"),
        ("GATEWAY_SETTLEMENT__TIMEZONE", "Mars/Olympus", ("settlement", "timezone"), "unknown time zone"),
        ("GATEWAY_LOG_LEVEL", "loud", ("log_level",), "'debug', 'info', 'warning' or 'error'"),
        ("GATEWAY_MAX_CONNECTIONS", "many", ("max_connections",), "valid integer"),
    ],
)
def test_invalid_values_are_refused_with_the_setting_and_the_reason(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, location: tuple[str, ...], says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        load_settings()
    (error,) = caught.value.errors()
    assert error["loc"] == location
    assert says in error["msg"]


def test_an_unknown_key_in_the_file_is_refused_not_ignored(tmp_path: Path) -> None:
    config = write(tmp_path / "typo.toml", 'lisen = "0.0.0.0:8583"\n')
    with pytest.raises(ValidationError) as caught:
        load_settings(config)
    (error,) = caught.value.errors()
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == ("lisen",)


def test_redacted_hides_the_hmac_key_and_url_passwords_but_keeps_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_PAN_HMAC_KEY", "k3y-that-must-not-show")
    monkeypatch.setenv("GATEWAY_LEDGER_URL", "postgresql://gw:pg-secret@db:5432/gateway")
    monkeypatch.setenv("GATEWAY_MQTT_URL", "mqtts://relay:mq-secret@broker:8883")
    settings = load_settings()
    shown = settings.redacted()
    text = repr(shown)
    for secret in ("k3y-that-must-not-show", "pg-secret", "mq-secret"):
        assert secret not in text
    assert shown["pan_hmac_key"] == "********"
    assert shown["ledger_url"] == "postgresql://gw:********@db:5432/gateway"
    assert shown["mqtt_url"] == "mqtts://relay:********@broker:8883"
    assert shown["policy"]["refund_window_days"] == 30
    assert settings.pan_hmac_key.get_secret_value() == "k3y-that-must-not-show"
    assert "k3y-that-must-not-show" not in repr(settings)


def test_a_url_with_a_user_but_no_password_is_shown_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LEDGER_URL", "postgresql://postgres@postgres:5432/gateway")
    assert load_settings().redacted()["ledger_url"] == "postgresql://postgres@postgres:5432/gateway"


def test_no_hmac_key_is_the_default_and_the_development_key_stays_recognisable() -> None:
    assert Settings().pan_hmac_key is None and not Settings().dev_mode
    assert DEV_PAN_HMAC_KEY == "dev-only-pan-hmac-key-change-me"


def test_every_setting_nested_ones_included_is_documented_with_its_variable_and_default() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\|\s*`(GATEWAY_[A-Z0-9_]+)`\s*\|\s*([^|]*)\|", doc, re.MULTILINE)
    }
    defaults = Settings().redacted()
    missing = []
    wrong_default = []
    for path in setting_paths(Settings):
        variable = "GATEWAY_" + "__".join(part.upper() for part in path)
        if variable not in rows:
            missing.append(variable)
            continue
        value: Any = defaults
        for part in path:
            value = value[part]
        if not _default_matches(rows[variable], value):
            wrong_default.append(f"{variable}: documented {rows[variable].strip()!r}, actual {value!r}")
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    assert not wrong_default, "documented defaults differ from the code:\n" + "\n".join(wrong_default)
    documented_extra = set(rows) - {
        "GATEWAY_" + "__".join(part.upper() for part in path) for path in setting_paths(Settings)
    }
    assert not documented_extra, f"documented settings that do not exist: {sorted(documented_extra)}"


def _default_matches(cell: str, value: Any) -> bool:
    cell = cell.strip()
    if value is None or value == []:
        return cell in ("(unset)", "(empty)", "—")
    if isinstance(value, bool):
        return cell == f"`{str(value).lower()}`"
    return cell == f"`{value}`"


def test_misspelt_gateway_variables_are_reported_and_real_ones_are_not() -> None:
    from gateway.config import unknown_environment

    env = {
        "GATEWAY_LISTN": "0.0.0.0:1",
        "GATEWAY_LISTEN": "0.0.0.0:1",
        "GATEWAY_POLICY__VELOCITY__CARD_DAILY_COUNT": "3",
        "GATEWAY_POLICY__REFUND_WINDOWDAYS": "3",
        "OTHER": "x",
    }
    assert unknown_environment(env) == ["GATEWAY_LISTN", "GATEWAY_POLICY__REFUND_WINDOWDAYS"]
