"""What can stop the gateway from starting, checked one way for ``serve`` and ``check-config``.

``serve`` (:class:`gateway.app.GatewayApp`) runs these checks as it starts and stops at the first
problem with one ``gateway.start_failed`` log line and exit code 2; ``iso-gateway check-config`` runs
the same checks without starting anything (it binds nothing for longer than a test of the address,
creates no ledger, starts no broker) and reports every problem. Each problem is a
:class:`StartupError` naming the setting's environment variable and what is wrong with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from gateway.adapters.mqtt import describe_mqtt_error, parse_mqtt_url
from gateway.config import DEV_PAN_HMAC_KEY, Settings, split_host_port
from gateway.protocol.dialect import IMPLEMENTED_DIALECTS
from gateway.protocol.profile import Profile, ProfileError, load_profile

__all__ = [
    "BrokerChoice",
    "Preflight",
    "StartupError",
    "check_address_free",
    "check_mqtt_settings",
    "check_sqlite_location",
    "checked_profile",
    "choose_broker",
    "describe_os_error",
    "preflight",
    "terminal_tls",
]

#: how long ``GATEWAY_MQTT_URL=auto`` waits for a broker's CONNACK on the local port
PROBE_TIMEOUT_S = 2.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_MQTT_TLS = ("tls_ca", "tls_cert", "tls_key")


class StartupError(Exception):
    """The gateway cannot start: ``setting`` is the environment variable at fault, ``detail`` the problem."""

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"{setting}: {detail}")
        self.setting = setting
        self.detail = detail


def describe_os_error(exc: OSError) -> str:
    """``address already in use``, ``permission denied``: the system's words, without Python's wrapping."""
    if isinstance(exc, socket.gaierror):  # a name that does not resolve: its errno is no errno
        return (exc.strerror or str(exc)).lower()
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _runs_as() -> str:
    return f"the gateway runs as uid {os.getuid()}, gid {os.getgid()}"


# --- the wire profile and terminal TLS ------------------------------------------------------------


def checked_profile(settings: Settings) -> Profile:
    """The wire profile of ``GATEWAY_PROFILE``, refused if its dialect is not implemented."""
    try:
        profile = load_profile(settings.profile)
    except ProfileError as exc:
        raise StartupError("GATEWAY_PROFILE", str(exc)) from None
    if profile.dialect not in IMPLEMENTED_DIALECTS:
        raise StartupError(
            "GATEWAY_PROFILE",
            f"profile {profile.name!r} uses dialect {profile.dialect!r}; "
            f"this release implements {', '.join(IMPLEMENTED_DIALECTS)} only",
        )
    return profile


def _existing_file(setting: str, path: Path) -> str:
    if not path.is_file():
        raise StartupError(setting, f"no such file: {path}")
    return str(path)


def terminal_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for terminal connections (``GATEWAY_TLS__*``), or None without a certificate."""
    tls = settings.tls
    if tls.cert is None:
        for name, value in (("GATEWAY_TLS__KEY", tls.key), ("GATEWAY_TLS__CLIENT_CA", tls.client_ca)):
            if value is not None:
                raise StartupError(name, "is set but GATEWAY_TLS__CERT is not: terminal TLS needs a certificate")
        return None
    cert = _existing_file("GATEWAY_TLS__CERT", tls.cert)
    key = _existing_file("GATEWAY_TLS__KEY", tls.key) if tls.key is not None else None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        setting = "GATEWAY_TLS__KEY" if key is not None else "GATEWAY_TLS__CERT"
        raise StartupError(setting, f"cannot load the certificate and its key: {exc.reason or exc}") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(_existing_file("GATEWAY_TLS__CLIENT_CA", tls.client_ca))
        except ssl.SSLError as exc:
            raise StartupError("GATEWAY_TLS__CLIENT_CA", f"not a CA bundle: {exc.reason or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# --- addresses ------------------------------------------------------------------------------------


def key_file(ledger: Path) -> Path:
    """Where the generated card-hash key of a SQLite ledger lives: beside it, mode 0600."""
    return ledger.with_name(ledger.name + ".key")


def card_hash_key(settings: Settings, *, create: bool = True) -> bytes:
    """The key of the card hash: ``GATEWAY_PAN_HMAC_KEY``, else the key file beside the SQLite ledger,
    made with 256 random bits on the first start (mode 0600). The published development key is
    refused unless ``GATEWAY_DEV_MODE=1``: with it, the masked PAN and the hash in the ledger give back
    the full card number in a fraction of a second. A PostgreSQL ledger needs the key set: every
    instance sharing it must hash cards alike."""
    if settings.pan_hmac_key is not None and settings.pan_hmac_key.get_secret_value():  # empty: as unset
        key = settings.pan_hmac_key.get_secret_value()
        if key == DEV_PAN_HMAC_KEY and not settings.dev_mode:
            raise StartupError(
                "GATEWAY_PAN_HMAC_KEY",
                "is the published development key: set a key of your own, or leave it unset for a random one "
                "(GATEWAY_DEV_MODE=1 allows it on a test bed)",
            )
        return key.encode()
    ledger = settings.sqlite_path()
    if ledger is None:
        raise StartupError(
            "GATEWAY_PAN_HMAC_KEY", "must be set with a PostgreSQL ledger (every instance must use the same key)"
        )
    path = key_file(ledger)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise StartupError(
                "GATEWAY_PAN_HMAC_KEY", f"the key file {path} is readable by others ({mode:o}): chmod 600 it"
            )
        key = path.read_text().strip()
        if len(key) < 32:
            raise StartupError("GATEWAY_PAN_HMAC_KEY", f"the key file {path} holds no key")
        return key.encode()
    if not create:
        return b""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        problem = describe_os_error(exc)
        raise StartupError("GATEWAY_PAN_HMAC_KEY", f"cannot create the key file {path}: {problem}") from None
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def check_address_free(setting: str, address: str, default_port: int) -> None:
    """Whether ``serve`` could listen on ``address``: bind a socket to it as asyncio would (every
    address the host name resolves to, ``SO_REUSEADDR``) and close it at once."""
    host, port = split_host_port(address, default_port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(setting, f"cannot resolve {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise StartupError(setting, f"cannot listen on {address}: {describe_os_error(exc)}") from None


# --- the ledger -----------------------------------------------------------------------------------


def check_sqlite_location(path: Path, schema_version: int) -> None:
    """Whether the SQLite ledger at ``path`` can be opened or created: its folder must exist (the
    gateway creates its ledger file, never a folder: a mistyped path must not start an empty ledger
    somewhere else) and take new files (the ledger's ``-wal`` and ``-shm`` files live beside it), and
    an existing file must be an SQLite database of a schema this gateway knows."""
    setting = "GATEWAY_LEDGER_URL"
    folder = path.parent
    if not folder.exists():
        raise StartupError(setting, f"the folder {folder} does not exist: create it, or correct the path")
    if not folder.is_dir():
        raise StartupError(setting, f"{folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StartupError(
            setting, f"cannot create files in {folder} ({describe_os_error(exc)}; {_runs_as()})"
        ) from None
    if not path.exists():
        return
    if not path.is_file():
        raise StartupError(setting, f"{path} is not a file")
    try:
        with path.open("r+b") as handle:
            header = handle.read(100)
    except OSError as exc:
        reason = describe_os_error(exc)
        raise StartupError(setting, f"cannot open {path} for writing ({reason}; {_runs_as()})") from None
    if header and not header.startswith(_SQLITE_HEADER):
        raise StartupError(setting, f"{path} is not an SQLite database")
    version = int.from_bytes(header[60:64], "big") if len(header) >= 64 else 0
    if version > schema_version:
        raise StartupError(
            setting, f"{path} has ledger schema version {version}, newer than this gateway's ({schema_version})"
        )


# --- the MQTT broker ------------------------------------------------------------------------------


def check_mqtt_settings(settings: Settings) -> None:
    """``GATEWAY_MQTT_URL`` and the ``GATEWAY_MQTT__TLS_*`` files agree: TLS settings only with an
    ``mqtts://`` broker (the embedded broker speaks plain MQTT), a client certificate with its key,
    and every file there."""
    mqtt = settings.mqtt
    given = [name for name in _MQTT_TLS if getattr(mqtt, name) is not None] + (["tls_insecure"] * mqtt.tls_insecure)
    url = settings.mqtt_url
    tls = False
    if url not in ("auto", "embedded"):
        try:
            tls = parse_mqtt_url(url).tls
        except ValueError as exc:
            raise StartupError("GATEWAY_MQTT_URL", str(exc)) from None
    if given and not tls:
        raise StartupError(
            f"GATEWAY_MQTT__{given[0].upper()}",
            f"TLS settings need a broker URL mqtts://...; GATEWAY_MQTT_URL is {_scheme_or_mode(url)}",
        )
    if (mqtt.tls_cert is None) != (mqtt.tls_key is None):
        missing = "GATEWAY_MQTT__TLS_KEY" if mqtt.tls_key is None else "GATEWAY_MQTT__TLS_CERT"
        both = "GATEWAY_MQTT__TLS_CERT and GATEWAY_MQTT__TLS_KEY"
        raise StartupError(missing, f"a TLS client certificate needs both {both}")
    for name in _MQTT_TLS:
        value = getattr(mqtt, name)
        if value is not None:
            _existing_file(f"GATEWAY_MQTT__{name.upper()}", value)
    if url in ("auto", "embedded"):
        host, _ = split_host_port(mqtt.embedded_listen, 1883)
        if not _is_loopback(host):
            raise StartupError(
                "GATEWAY_MQTT__EMBEDDED_LISTEN",
                f"the embedded broker takes anonymous clients: on {host} anyone reaching it could publish forged "
                "correction events; keep it on 127.0.0.1, or use a broker with credentials and ACLs "
                "(GATEWAY_MQTT_URL=mqtt://user:password@host:port, docs/events.md)",
            )


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _scheme_or_mode(url: str) -> str:
    return url if url in ("auto", "embedded") else url.partition("://")[0] + "://..."


@dataclass(frozen=True, slots=True)
class BrokerChoice:
    """Where correction events go: ``mode`` ``external`` (``GATEWAY_MQTT_URL`` names a broker),
    ``local`` (``auto`` found a broker answering on the embedded broker's address) or ``embedded``
    (the gateway starts its own on ``embedded_at``); ``detail`` says why, for the log."""

    mode: Literal["external", "local", "embedded"]
    url: str | None
    embedded_at: tuple[str, int] | None
    detail: str


async def choose_broker(settings: Settings, *, probe_s: float = PROBE_TIMEOUT_S) -> BrokerChoice:
    """The broker of ``GATEWAY_MQTT_URL``; for ``auto``, a broker already answering MQTT on
    ``GATEWAY_MQTT__EMBEDDED_LISTEN`` (Mosquitto on a developer machine) if there is one, else the
    embedded broker there. Something else on that port is a :class:`StartupError`."""
    url = settings.mqtt_url
    if url not in ("auto", "embedded"):
        return BrokerChoice("external", url, None, "GATEWAY_MQTT_URL names the broker")
    host, port = split_host_port(settings.mqtt.embedded_listen, 1883)
    where = f"{host}:{port}"
    if url == "embedded":
        return BrokerChoice("embedded", None, (host, port), f"GATEWAY_MQTT_URL=embedded: own broker on {where}")
    if port == 0:  # a port the system chooses cannot already have a broker on it
        return BrokerChoice("embedded", None, (host, port), "GATEWAY_MQTT_URL=auto on port 0: own broker")
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    found, problem = await _probe(target, port, settings.instance_id, probe_s)
    if found == "nothing":
        detail = f"GATEWAY_MQTT_URL=auto: no broker answers on {where}, own broker started there"
        return BrokerChoice("embedded", None, (host, port), detail)
    if found == "other":
        raise StartupError(
            "GATEWAY_MQTT_URL",
            f"auto: {where} {problem}; name a broker (mqtt://user:password@host:port) in GATEWAY_MQTT_URL, "
            "or move the embedded broker with GATEWAY_MQTT__EMBEDDED_LISTEN",
        )
    shown = f"[{target}]" if ":" in target else target
    return BrokerChoice(
        "local", f"mqtt://{shown}:{port}", None, f"GATEWAY_MQTT_URL=auto: a broker answers MQTT on {where}, using it"
    )


async def _probe(
    host: str, port: int, instance_id: str, connect_s: float
) -> tuple[Literal["broker", "nothing", "other"], str]:
    """What listens at ``host:port``: an MQTT broker that accepts the gateway (one CONNECT through
    aiomqtt), nothing (no TCP connection either), or something else (a broker that refuses the
    gateway, or no MQTT broker at all), with what is wrong with it."""
    client = aiomqtt.Client(host, port, identifier=f"iso-gateway-{instance_id}-probe", timeout=connect_s)
    try:
        await client.__aenter__()
    except MqttConnectError as exc:
        return "other", f"has a broker that refused the gateway ({describe_mqtt_error(exc)})"
    except aiomqtt.MqttError as exc:
        if not await _accepts_connections(host, port, connect_s):  # refused, or not this host's address
            return "nothing", ""
        return "other", f"is taken by something that does not answer MQTT ({describe_mqtt_error(exc)})"
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aexit__(None, None, None)
    return "broker", ""


async def _accepts_connections(host: str, port: int, connect_s: float) -> bool:
    try:
        async with asyncio.timeout(connect_s):
            _, writer = await asyncio.open_connection(host, port)
    except OSError:  # TimeoutError included
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# --- everything, without starting anything (check-config) ----------------------------------------


@dataclass(slots=True)
class Preflight:
    """What ``check-config`` found: the problems ``serve`` would stop at, and for each part what
    ``serve`` would do with it (``findings``: part -> one line)."""

    profile: Profile | None = None
    problems: list[StartupError] = field(default_factory=list)
    findings: dict[str, str] = field(default_factory=dict)


async def preflight(settings: Settings, *, postgres_s: float = 5.0, probe_s: float = PROBE_TIMEOUT_S) -> Preflight:
    """Every check ``serve`` makes as it starts, without starting anything: addresses are bound and
    released at once, a PostgreSQL ledger is connected to and left, no SQLite file is created."""
    found = Preflight()

    def attempt(part: str, check: Callable[[], str]) -> None:
        try:
            found.findings[part] = check()
        except StartupError as exc:
            found.problems.append(exc)

    def profile() -> str:
        found.profile = checked_profile(settings)
        return f"{found.profile.name} (dialect {found.profile.dialect})"

    attempt("profile", profile)
    attempt("pan_key", lambda: "set" if card_hash_key(settings, create=False) else "generated at first start")
    attempt("tls", lambda: "off" if terminal_tls(settings) is None else "on")
    attempt("listen", lambda: _free(settings.listen, "GATEWAY_LISTEN", 8583))
    if settings.metrics_listen:
        metrics = settings.metrics_listen
        attempt("metrics", lambda: _free(metrics, "GATEWAY_METRICS_LISTEN", 9108))
    if settings.upstream.url is not None:
        attempt("upstream", lambda: _upstream_finding(settings))
    path = settings.sqlite_path()
    if path is not None:
        attempt("ledger", lambda: _sqlite_finding(path))
    else:
        try:
            found.findings["ledger"] = await _reach_postgres(settings, postgres_s)
        except StartupError as exc:
            found.problems.append(exc)
    try:
        check_mqtt_settings(settings)
        choice = await choose_broker(settings, probe_s=probe_s)
        if choice.embedded_at is not None:
            host, port = choice.embedded_at
            check_address_free("GATEWAY_MQTT__EMBEDDED_LISTEN", f"{host}:{port}", 1883)
        found.findings["mqtt"] = choice.detail
    except StartupError as exc:
        found.problems.append(exc)
    return found


def _free(address: str, setting: str, default_port: int) -> str:
    check_address_free(setting, address, default_port)
    return f"{address} is free"


def _upstream_finding(settings: Settings) -> str:
    """The host link's profile and TLS files, as ``serve`` checks them; the host is not contacted
    (``serve`` starts without it and applies ``GATEWAY_UPSTREAM__WHEN_DOWN`` until it answers)."""
    from gateway.adapters.upstream_connection import TlsFilesError, tls_context

    upstream = settings.upstream
    assert upstream.url is not None
    try:
        load_profile(upstream.profile)
    except ProfileError as exc:
        raise StartupError("GATEWAY_UPSTREAM__PROFILE", str(exc)) from None
    if upstream.url.startswith("tls://"):
        try:
            tls_context(upstream)
        except TlsFilesError as exc:
            raise StartupError(exc.setting, exc.detail) from None
    return f"{upstream.url}, profile {upstream.profile} (not contacted)"


def _sqlite_finding(path: Path) -> str:
    from gateway.adapters.ledger.schema import VERSION

    check_sqlite_location(path, VERSION)
    return f"SQLite {path}: " + ("exists" if path.exists() else "will be created")


async def _reach_postgres(settings: Settings, connect_s: float) -> str:
    import asyncpg

    where = settings.redacted()["ledger_url"]
    try:
        conn = await asyncpg.connect(settings.ledger_url, timeout=connect_s)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
        raise StartupError("GATEWAY_LEDGER_URL", f"cannot connect to PostgreSQL {where}: {reason}") from None
    await conn.close()
    return f"PostgreSQL {where}: reachable"
