"""Composition root: builds the gateway from its settings, runs it and shuts it down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from gateway.adapters.postgres_ledger import PostgresLedger
from gateway.adapters.sqlite_ledger import SWITCH_INTERVAL_S, SqliteLedger
from gateway.adapters.tcp import Limits
from gateway.config import DEV_PAN_HMAC_KEY, Settings, split_host_port, unknown_environment
from gateway.core.policy import Policy
from gateway.protocol.dialect import IMPLEMENTED_DIALECTS
from gateway.protocol.profile import Profile, load_profile
from gateway.service import GatewayService, ServiceConfig, SystemClock


class StartupError(Exception):
    """The gateway cannot start with these settings (the message says why)."""


def build_policy(settings: Settings) -> Policy:
    policy = settings.policy
    velocity = policy.velocity
    standin = settings.standin
    return Policy(
        refund_window=timedelta(days=policy.refund_window_days),
        preauth_validity=timedelta(days=policy.preauth_validity_days),
        completion_tolerance_pct=policy.completion_tolerance_pct,
        unreferenced_refund_terminals=frozenset(policy.unreferenced_refund_terminals),
        terminal_daily_refund_count=velocity.terminal_daily_count,
        terminal_daily_refund_amount=velocity.terminal_daily_amount,
        card_daily_refund_count=velocity.card_daily_count,
        card_daily_refund_amount=velocity.card_daily_amount,
        standin_max_amount=standin.max_amount,
        check_luhn=standin.check_luhn,
        check_expiry=standin.check_expiry,
        duplicate_ttl=timedelta(hours=policy.duplicate_ttl_hours),
        timezone=ZoneInfo(settings.settlement.timezone),
        cutoff=settings.settlement.cutoff,
    )


Ledger = SqliteLedger | PostgresLedger


def build_ledger(settings: Settings) -> Ledger:
    path = settings.sqlite_path()
    if path is None:
        return PostgresLedger(settings.ledger_url)
    return SqliteLedger(path)


def build_limits(settings: Settings) -> Limits:
    limits = settings.limits
    return Limits(
        max_connections=settings.max_connections,
        reserved=min(
            limits.reserved if limits.reserved is not None else settings.max_connections // 10,
            settings.max_connections - 1,
        ),
        per_address=limits.per_address,
        idle_timeout_s=settings.idle_timeout_s,
        frame_timeout_s=limits.frame_timeout_s,
        handshake_timeout_s=limits.handshake_timeout_s,
        write_timeout_s=limits.write_timeout_s,
        in_flight=limits.in_flight,
        in_flight_total=limits.in_flight_total,
        unsent_bytes=limits.unsent_bytes,
    )


class CertificateTerminals:
    """The terminals a verified client certificate may act as: the one its subject CN names, and those
    ``GATEWAY_TLS__CLIENT_TERMINALS`` maps its CN or subject alternative names (DNS, URI) to."""

    def __init__(self, mapping: dict[str, list[str]]) -> None:
        self.mapping = {name: frozenset(terminals) for name, terminals in mapping.items()}

    def __call__(self, certificate: dict[str, Any]) -> frozenset[str]:
        names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
        terminals = set(names)
        names += [value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "URI")]
        for name in names:
            terminals |= self.mapping.get(name, frozenset())
        return frozenset(terminals)


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls.cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    if tls.client_ca is not None:
        context.load_verify_locations(str(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class GatewayApp:
    """Everything the gateway runs: ledger, broker, relay, service, TCP server, background tasks."""

    def __init__(self, settings: Settings, *, logger: Any = None, clock: Any = None) -> None:
        from gateway.logs import get_logger

        self.settings = settings
        self.log = logger if logger is not None else get_logger("gateway")
        self.clock = clock or SystemClock()
        self.profile: Profile | None = None
        self.ledger: Ledger | None = None
        self.broker: Any = None
        self.relay: Any = None
        self.server: Any = None
        self.service: GatewayService | None = None
        self.metrics: Any = None
        self.metrics_server: Any = None
        self.mqtt_url: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        return int(self.server.bound_port)

    async def start(self) -> None:
        from gateway.adapters.mqtt import OutboxRelay
        from gateway.adapters.tcp import TerminalServer
        from gateway.metrics import Metrics

        settings = self.settings
        try:
            self.profile = load_profile(settings.profile)
        except Exception as exc:
            raise StartupError(str(exc)) from exc
        if self.profile.dialect not in IMPLEMENTED_DIALECTS:
            raise StartupError(
                f"profile {self.profile.name!r} uses dialect {self.profile.dialect!r}; "
                f"this release implements {', '.join(IMPLEMENTED_DIALECTS)} only"
            )
        if settings.pan_hmac_key.get_secret_value() == DEV_PAN_HMAC_KEY:
            self.log.warning("config.dev_pan_key", detail="GATEWAY_PAN_HMAC_KEY is the development key")
        self.metrics = Metrics()
        self.ledger = build_ledger(settings)
        try:
            await self.ledger.open()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StartupError(f"cannot open the ledger {settings.redacted()['ledger_url']}: {exc}") from exc
        try:
            await self._start_events()
            self.service = GatewayService(
                self.profile,
                self.ledger,
                ServiceConfig(
                    instance_id=settings.instance_id,
                    topic_prefix=settings.mqtt_topic_prefix,
                    pan_key=settings.pan_hmac_key.get_secret_value().encode(),
                    policy=build_policy(settings),
                    allowed_terminals=frozenset(settings.allowed_terminals),
                ),
                clock=self.clock,
                logger=self.log,
                recorder=self.metrics,
            )
            host, port = split_host_port(settings.listen, 8583)
            self.server = TerminalServer(
                self.service,
                self.profile.framing,
                host=host,
                port=port,
                limits=build_limits(settings),
                ssl_context=_ssl_context(settings),
                certificate_terminals=CertificateTerminals(settings.tls.client_terminals),
                logger=self.log,
                recorder=self.metrics,
            )
            try:
                await self.server.start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {settings.listen}: {exc.strerror or exc}") from exc
            m_host = "127.0.0.1"
            self.ledger.on_commit = self.metrics.ledger_committed
            self._tasks.append(asyncio.create_task(self._metrics_loop(), name="metrics"))
            if settings.metrics_listen:
                m_host, m_port = split_host_port(settings.metrics_listen, 9108)
                try:
                    self.metrics_server = self.metrics.serve(m_host, m_port)
                except OSError as exc:
                    raise StartupError(f"cannot serve metrics on {settings.metrics_listen}: {exc}") from exc
            if settings.settlement.cutoff is not None:
                self._tasks.append(asyncio.create_task(self._cutoff_loop(), name="settlement-cutoff"))
        except BaseException:
            await self._close_events()
            await self.ledger.close()
            raise
        _ = OutboxRelay  # imported above so a missing MQTT stack fails at start, not later
        self.log.info(
            "gateway.started",
            listen=f"{host}:{self.port}",
            profile=self.profile.name,
            ledger=settings.redacted()["ledger_url"],
            mqtt=_hide(self.mqtt_url or ""),
            instance=settings.instance_id,
            metrics=f"{m_host}:{self.metrics_server.port}" if self.metrics_server is not None else None,
        )
        unknown = unknown_environment()
        if unknown:
            self.log.warning("config.unknown_variables", names=unknown, detail="ignored; check their spelling")

    async def _start_events(self) -> None:
        from gateway.adapters.broker import BrokerError, EmbeddedBroker
        from gateway.adapters.mqtt import OutboxRelay

        settings = self.settings
        assert self.ledger is not None
        url = settings.mqtt_url
        if url == "embedded":
            host, port = split_host_port(settings.mqtt.embedded_listen, 1883)
            self.broker = EmbeddedBroker(host, port)
            try:
                await self.broker.start()
            except BrokerError as exc:
                raise StartupError(str(exc)) from exc
            url = self.broker.url
        self.mqtt_url = url
        mqtt = settings.mqtt
        self.relay = OutboxRelay(
            self.ledger,
            url=url,
            client_id=f"iso-gateway-{settings.instance_id}",
            clock=self.clock,
            batch_size=mqtt.batch_size,
            retention=timedelta(hours=mqtt.retention_hours),
            tls_ca=str(mqtt.tls_ca) if mqtt.tls_ca else None,
            tls_cert=str(mqtt.tls_cert) if mqtt.tls_cert else None,
            tls_key=str(mqtt.tls_key) if mqtt.tls_key else None,
            tls_insecure=mqtt.tls_insecure,
            logger=self.log,
        )
        self.ledger.on_events = self.relay.notify
        self._tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))

    async def _close_events(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()
            self.broker = None

    async def close_forgotten_batches(self) -> int:
        """Close every open batch opened before the latest settlement cut-off, with a ``pos.batch.closed``
        event each (design section 5). Requests close their own terminal's batch at once; this sweep is
        for terminals that stay silent after the cut-off, so that operators hear of them."""
        if self.service is None or self.ledger is None:
            return 0
        policy = self.service.config.policy
        now = self.clock.now()
        closed = await self.ledger.close_batches(policy, now, self.service.render)
        if closed:
            cutoff = policy.last_cutoff(now)
            self.log.info("settlement.cutoff", closed_batches=closed, cutoff=cutoff.isoformat() if cutoff else None)
        return closed

    async def _metrics_loop(self, interval_s: float = 2.0) -> None:
        """Keep the outbox gauges and the published-events counter current."""
        published = 0
        while True:
            try:
                if self.ledger is not None:
                    self.metrics.set_outbox_pending((await self.ledger.status()).pending)
                if self.relay is not None:
                    now_published = self.relay.stats.published
                    if now_published > published:
                        self.metrics.events_published(now_published - published)
                    published = now_published
            except Exception as exc:  # metrics must never take the gateway down
                self.log.warning("metrics.update_failed", error=type(exc).__name__)
            await asyncio.sleep(interval_s)

    async def _cutoff_loop(self, interval_s: float = 30.0) -> None:
        """Sweep right after each cut-off instant, and every ``interval_s`` (a missed instant, a restart)."""
        assert self.service is not None
        policy = self.service.config.policy
        while True:
            try:
                await self.close_forgotten_batches()
            except Exception as exc:  # the ledger may be busy or briefly gone: try again next round
                self.log.warning("settlement.cutoff_failed", error=type(exc).__name__)
            now = self.clock.now()
            upcoming = policy.next_cutoff(now)
            wait = interval_s if upcoming is None else min(interval_s, (upcoming - now).total_seconds() + 0.05)
            await asyncio.sleep(max(wait, 0.05))

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, let the relay drain briefly, close the ledger."""
        if self.server is not None:
            await self.server.stop()
        if self.service is not None:
            await self.service.drain_answered()
        if self.relay is not None and self.ledger is not None:
            # give the relay a moment to publish what the last requests wrote
            with contextlib.suppress(Exception):
                for _ in range(20):
                    if (await self.ledger.status()).pending == 0:
                        break
                    await asyncio.sleep(0.05)
        await self._close_events()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.ledger is not None:
            await self.ledger.close()
        self.log.info("gateway.stopped")


def _hide(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        return f"{scheme}://{creds.split(':', 1)[0]}:********@{host}"
    return url


async def run_gateway(settings: Settings, stop: asyncio.Event) -> None:
    app = GatewayApp(settings)
    await app.start()
    tune_runtime()
    try:
        await stop.wait()
    finally:
        await app.stop()


def tune_runtime() -> None:
    """Once started: what was allocated so far (modules, settings, the profile) lives as long as the
    process, so move it out of the collector's sight (``gc.freeze``), and collect the youngest
    generation less often. Requests allocate many short-lived objects and almost no cycles; with the
    default threshold (700) a collection ran every few requests, and each full collection walked
    every long-lived object. And a short switch interval, so that the SQLite ledger's commit thread
    starts each fsync while the loop builds the answers (see ``SWITCH_INTERVAL_S``); with PostgreSQL
    no other thread wants the GIL, and the interval changes nothing."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def serve(settings: Settings) -> int:
    """Run in the foreground until SIGTERM or SIGINT; returns the process exit code."""
    from gateway.logs import configure_logging, flush_logs, get_logger

    configure_logging(settings.log_level, settings.log_format, coalesce=True)
    log = get_logger("gateway")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_gateway(settings, stop)
        except StartupError as exc:
            log.error("gateway.start_failed", detail=str(exc))
            return 2
        return 0

    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(main())
        return int(uvloop.run(main()))
    finally:
        flush_logs()


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[Ledger]:
    """The ledger alone, for command-line tools (outbox status, batches)."""
    ledger = build_ledger(settings)
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()
