"""Configuration: the only reader of the environment (pydantic-settings).

Environment variables use the prefix ``GATEWAY_`` and ``__`` for nested keys, e.g.
``GATEWAY_LISTEN=0.0.0.0:8583`` or ``GATEWAY_POLICY__REFUND_WINDOW_DAYS=60``. A TOML file given with
``--config`` supplies defaults; the environment overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: The published development HMAC key: refused unless ``GATEWAY_DEV_MODE=1`` (a key anyone can read
#: gives back the full card number from the masked one and the hash in the ledger).
DEV_PAN_HMAC_KEY = "dev-only-pan-hmac-key-change-me"


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``, or ``host``) -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else default_port
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    return host or "0.0.0.0", int(port)


def _check_listen(value: str) -> str:
    host, port = split_host_port(value, 0)
    if not host or not 0 <= port <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


class StandInSettings(BaseModel):
    """Stand-in approval rules (used when no upstream host is configured)."""

    max_amount: int | None = Field(
        default=1_000_000,
        ge=0,
        description="Decline (61) above this, minor units: the gateway approving alone takes no large risk",
    )
    check_luhn: bool = Field(default=True, description="Decline (14) PANs that fail the Luhn check")
    check_expiry: bool = Field(default=True, description="Decline (54) cards whose DE14 expiry is past")


class VelocitySettings(BaseModel):
    """Daily refund limits (a day in the settlement time zone); ``None`` switches a limit off."""

    terminal_daily_count: int | None = Field(default=None, ge=0)
    terminal_daily_amount: int | None = Field(default=None, ge=0)
    card_daily_count: int | None = Field(default=None, ge=0)
    card_daily_amount: int | None = Field(default=None, ge=0)


class PolicySettings(BaseModel):
    """Refund-control knobs (design section 5)."""

    refund_window_days: int = Field(default=30, ge=0)
    preauth_validity_days: int = Field(default=30, ge=0)
    completion_tolerance_pct: int = Field(default=15, ge=0, le=1000)
    #: terminals allowed to make unreferenced refunds: "TERMID", "MERCHANT/TERMID" or "*"
    unreferenced_refund_terminals: list[str] = Field(default_factory=list)
    velocity: VelocitySettings = Field(default_factory=VelocitySettings)
    #: duplicate-detection keys are kept at least this long
    duplicate_ttl_hours: int = Field(default=48, ge=24)


class SettlementSettings(BaseModel):
    """Daily cut-off that closes batches terminals forgot to settle; its time zone is every "day"'s."""

    cutoff: time | None = Field(default=None, description="Local time of day, e.g. 23:30; off when unset")
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


class MqttSettings(BaseModel):
    """Broker connection details beyond ``GATEWAY_MQTT_URL``."""

    embedded_listen: str = Field(
        default="127.0.0.1:1883", description="Address of the embedded broker (and where auto looks for a broker)"
    )
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    batch_size: int = Field(default=100, ge=1, le=10_000)
    retention_hours: int = Field(default=168, ge=0, description="Sent events are pruned after this")

    _v_listen = field_validator("embedded_listen")(classmethod(lambda cls, v: _check_listen(v)))


class TlsSettings(BaseModel):
    """Optional TLS (and mutual TLS) for terminal connections."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = Field(default=None, description="Require client certificates signed by this CA")
    #: certificate name (subject CN, or a DNS or URI subject alternative name) -> the terminals it may
    #: act as ("TERMID", "MERCHANT/TERMID" or "*"); a certificate may always act as the terminal its CN names
    client_terminals: dict[str, list[str]] = Field(default_factory=dict)


class LimitsSettings(BaseModel):
    """What hostile or broken clients can cost (docs/operations.md, "Limits")."""

    reserved: int | None = Field(
        default=None, ge=0, description="Connection slots kept for proven terminals (default: 10% of max_connections)"
    )
    per_address: int = Field(default=250, ge=1, description="Connections from one source address")
    frame_timeout_s: float = Field(default=10.0, gt=0, description="A frame must be complete this long after it began")
    handshake_timeout_s: float = Field(default=10.0, gt=0, description="TLS handshake deadline")
    write_timeout_s: float = Field(default=30.0, gt=0, description="Close a client that takes no answers this long")
    in_flight: int = Field(default=128, ge=1, description="Requests in flight per connection before it is not read")
    in_flight_total: int = Field(default=4096, ge=1, description="Requests in flight in all before none is read")
    unsent_bytes: int = Field(default=65536, ge=1024, description="Unsent answers per connection before it is not read")


def parse_upstream_url(value: str) -> tuple[str, str, int]:
    """``tcp://host:port`` or ``tls://host:port`` (``[v6]`` hosts too) -> (scheme, host, port);
    ``ValueError`` saying what is wrong otherwise (without the value: it may hold a password)."""
    expected = "expected tcp://host:port or tls://host:port"
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{expected}: {exc}") from None
    if parts.scheme not in ("tcp", "tls"):
        raise ValueError(f"{expected}: scheme {parts.scheme!r}" if parts.scheme else f"{expected}: no scheme")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{expected}: no user or password in the URL")
    if not parts.hostname:
        raise ValueError(f"{expected}: no host")
    if not port:
        raise ValueError(f"{expected}: no port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{expected}: nothing may follow the port")
    return parts.scheme, parts.hostname, port


class UpstreamSettings(BaseModel):
    """The acquirer host link (docs/upstream.md). Without ``url`` the gateway stands in alone."""

    url: str | None = Field(default=None, description="tcp://host:port or tls://host:port; unset: no upstream")
    profile: str = Field(default="iso87-binary", description="Wire profile of the host link (specs/NAME.toml)")
    connections: int = Field(default=1, ge=1, le=64, description="Connections kept open and signed on")
    timeout_s: float = Field(default=10.0, gt=0, description="How long a request waits for the host's answer")
    when_down: Literal["decline", "standin"] = Field(
        default="decline", description="No connection signed on: decline (91) or approve by the stand-in rules"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="TCP (and TLS) connect deadline")
    network_timeout_s: float = Field(default=10.0, gt=0, description="How long a sign-on or echo waits for its 0810")
    echo_interval_s: float = Field(default=30.0, gt=0, description="Echo test after this long without a frame")
    backoff_initial_s: float = Field(default=0.5, gt=0, description="First reconnect delay (doubled per failure)")
    backoff_max_s: float = Field(default=30.0, gt=0, description="Longest reconnect delay")
    tls_ca: Path | None = Field(default=None, description="CA bundle to verify the host (tls:// only)")
    tls_cert: Path | None = Field(default=None, description="Client certificate for mutual TLS (tls:// only)")
    tls_key: Path | None = Field(default=None, description="Its private key, unless the certificate file holds it")
    saf_max_age_s: float = Field(default=86400.0, gt=0, description="A queued reversal older than this is given up")
    saf_retry_s: float = Field(default=5.0, gt=0, description="Pause before a queued reversal is repeated")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_upstream_url(value)
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> UpstreamSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        tls_files = [name for name in ("tls_ca", "tls_cert", "tls_key") if getattr(self, name) is not None]
        if tls_files and (self.url is None or not self.url.startswith("tls://")):
            raise ValueError(f"{', '.join(tls_files)} set but the upstream url is not tls://")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key set without tls_cert")
        return self

    def endpoint(self) -> tuple[str, str, int] | None:
        """(scheme, host, port) of ``url``, or None without an upstream."""
        return parse_upstream_url(self.url) if self.url is not None else None


class Settings(BaseSettings):
    """Every setting of the gateway. See docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    listen: str = Field(default="127.0.0.1:8583", description="host:port for terminals")
    profile: str = Field(default="iso87-binary", description="Wire profile name (specs/NAME.toml) or path")
    ledger_url: str = Field(default="sqlite:///./gateway.db", description="sqlite:///path or postgresql://...")
    mqtt_url: str = Field(
        default="auto", description="auto, embedded, mqtt://user:pass@host:port or mqtts://user:pass@host:port"
    )
    mqtt_topic_prefix: str = "pos/corrections"
    instance_id: str = Field(default="gateway-1", description="Names this instance in events and MQTT client ids")
    pan_hmac_key: SecretStr | None = Field(
        default=None,
        description="Key of the card hash (and approval codes); unset: a random key kept beside the SQLite ledger",
    )
    dev_mode: bool = Field(default=False, description="Allow the published development key (test beds only)")
    idle_timeout_s: float = Field(default=300.0, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    allowed_terminals: list[str] = Field(
        default_factory=list, description="Allow-list of TERMID or MERCHANT/TERMID; empty allows all"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    metrics_listen: str | None = Field(default=None, description="host:port for Prometheus metrics")
    standin: StandInSettings = Field(default_factory=StandInSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    settlement: SettlementSettings = Field(default_factory=SettlementSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)

    _v_listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("ledger_url")
    @classmethod
    def _ledger_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("ledger_url must start with sqlite:/// or postgresql://")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_scheme(cls, value: str) -> str:
        if value not in ("auto", "embedded") and not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError("mqtt_url must be 'auto', 'embedded', mqtt://... or mqtts://...")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    def sqlite_path(self) -> Path | None:
        """The SQLite file of ``ledger_url`` (SQLAlchemy style: ``sqlite:///relative``,
        ``sqlite:////absolute``), or None for PostgreSQL."""
        if not self.ledger_url.startswith("sqlite:///"):
            return None
        return Path(self.ledger_url.removeprefix("sqlite:///") or "gateway.db")

    def unreferenced_refunds_allowed(self, merchant_id: str, terminal_id: str) -> bool:
        allowed = self.policy.unreferenced_refund_terminals
        return "*" in allowed or terminal_id in allowed or f"{merchant_id}/{terminal_id}" in allowed

    def terminal_allowed(self, merchant_id: str, terminal_id: str) -> bool:
        allowed = self.allowed_terminals
        return not allowed or terminal_id in allowed or f"{merchant_id}/{terminal_id}" in allowed

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets and URL passwords hidden."""
        data = self.model_dump(mode="json")
        data["pan_hmac_key"] = "********" if self.pan_hmac_key is not None else None
        for key in ("ledger_url", "mqtt_url"):
            data[key] = _hide_password(data[key])
        return data


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:********@{host}" if ":" in creds else url


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """``GATEWAY_*`` variables that name no setting (likely misspelt); they are ignored."""
    env = os.environ if environ is None else environ
    unknown = []
    for name in sorted(env):
        if not name.startswith("GATEWAY_"):
            continue
        parts = name.removeprefix("GATEWAY_").lower().split("__")
        model: Any = Settings
        for part in parts:
            fields = getattr(model, "model_fields", None)
            if fields is None or part not in fields:
                unknown.append(name)
                break
            model = fields[part].annotation
    return unknown


def requested_log_format(environ: Mapping[str, str] | None = None) -> Literal["auto", "json", "console"]:
    """``GATEWAY_LOG_FORMAT`` when it is valid, else ``auto``: how to write a start-up failure when
    the settings themselves could not be read."""
    value = (os.environ if environ is None else environ).get("GATEWAY_LOG_FORMAT", "auto").strip().lower()
    if value == "json":
        return "json"
    return "console" if value == "console" else "auto"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from (in priority order) overrides, the environment and a TOML file."""
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"configuration file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    return _FileSettings(**overrides)
