"""Composition root: builds the gateway from its settings, runs it and shuts it down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from gateway.adapters.ledger import SWITCH_INTERVAL_S, PostgresLedger, SqliteLedger
from gateway.adapters.ledger.schema import VERSION as LEDGER_VERSION
from gateway.adapters.tcp import Limits
from gateway.config import DEV_PAN_HMAC_KEY, Settings, split_host_port, unknown_environment
from gateway.core.engine import Context
from gateway.core.model import Kind
from gateway.core.policy import Policy
from gateway.core.upstream import NoAnswer
from gateway.protocol.profile import Profile
from gateway.service import GatewayService, ServiceConfig, SystemClock
from gateway.startup import (
    BrokerChoice,
    StartupError,
    card_hash_key,
    check_mqtt_settings,
    check_sqlite_location,
    checked_profile,
    choose_broker,
    describe_os_error,
    terminal_tls,
)

__all__ = ["GatewayApp", "StartupError", "build_ledger", "build_policy", "open_ledger", "run_gateway", "serve"]


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
        forward=FORWARDED_KINDS if settings.upstream.url is not None else frozenset(),
        standin_when_down=settings.upstream.when_down == "standin",
    )


#: what the acquirer host decides when there is one (design §5, "Upstream host")
FORWARDED_KINDS = frozenset({Kind.PURCHASE, Kind.PREAUTH, Kind.VOID, Kind.REFUND, Kind.COMPLETION})
#: a record pending this long past the host timeout was abandoned by its gateway (killed, or another
#: instance that stopped): it is concluded as unanswered and reversed at the host
ABANDONED_AFTER_S = 30.0


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
        self.upstream: Any = None
        self.saf: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        return int(self.server.bound_port)

    async def start(self) -> None:
        """Check the settings and start, in an order where whatever can fail fails before anything
        shows outside: the checks of :mod:`gateway.startup`, the MQTT broker (found or started), the
        terminal and metrics listeners (bound, not yet accepting), the ledger; then the relay, and
        terminals last. A failure raises :class:`StartupError` naming the setting, and stops again
        what was started (no relay connection left half-open for a broker to complain about)."""
        from gateway.adapters.tcp_server import TerminalServer
        from gateway.metrics import Metrics

        settings = self.settings
        self.profile = checked_profile(settings)
        ssl_context = terminal_tls(settings)
        check_mqtt_settings(settings)
        sqlite_path = settings.sqlite_path()
        if sqlite_path is not None:
            check_sqlite_location(sqlite_path, LEDGER_VERSION)
        self.metrics = Metrics()
        self.ledger = build_ledger(settings)
        self.service = GatewayService(
            self.profile,
            self.ledger,
            ServiceConfig(
                instance_id=settings.instance_id,
                topic_prefix=settings.mqtt_topic_prefix,
                pan_key=card_hash_key(settings),
                policy=build_policy(settings),
                allowed_terminals=frozenset(settings.allowed_terminals),
            ),
            clock=self.clock,
            logger=self.log,
            recorder=self.metrics,
        )
        if settings.upstream.url is not None:
            from gateway.adapters.upstream import UpstreamLink

            self.upstream = UpstreamLink.from_settings(
                settings.upstream, logger=self.log, recorder=self.metrics, clock=self.clock
            )
            self.service.upstream = self.upstream
        host, port = split_host_port(settings.listen, 8583)
        self.server = TerminalServer(
            self.service,
            self.profile.framing,
            host=host,
            port=port,
            limits=build_limits(settings),
            ssl_context=ssl_context,
            certificate_terminals=CertificateTerminals(settings.tls.client_terminals),
            logger=self.log,
            recorder=self.metrics,
        )
        try:
            choice = await choose_broker(settings)
            await self._start_broker(choice)
            try:
                await self.server.start(serve=False)
            except OSError as exc:
                reason = describe_os_error(exc)
                raise StartupError("GATEWAY_LISTEN", f"cannot listen on {settings.listen}: {reason}") from None
            if settings.metrics_listen:
                m_host, m_port = split_host_port(settings.metrics_listen, 9108)
                try:
                    self.metrics_server = self.metrics.serve(m_host, m_port)
                except OSError as exc:
                    reason = describe_os_error(exc)
                    where = settings.metrics_listen
                    raise StartupError("GATEWAY_METRICS_LISTEN", f"cannot listen on {where}: {reason}") from None
            await self._open_ledger()
            self._start_relay()
            if self.upstream is not None:
                await self._start_upstream()
            self.ledger.on_commit = self.metrics.ledger_committed
            self._tasks.append(asyncio.create_task(self._metrics_loop(), name="metrics"))
            if settings.settlement.cutoff is not None:
                self._tasks.append(asyncio.create_task(self._cutoff_loop(), name="settlement-cutoff"))
            await self.server.serve()
        except BaseException:
            await self._undo_start()
            raise
        self.log.info("mqtt.broker", mode=choice.mode, url=_hide(self.mqtt_url or ""), detail=choice.detail)
        if settings.pan_hmac_key is not None and settings.pan_hmac_key.get_secret_value() == DEV_PAN_HMAC_KEY:
            self.log.warning("config.dev_pan_key", detail="GATEWAY_PAN_HMAC_KEY is the development key (dev mode)")
        self.log.info(
            "gateway.started",
            listen=f"{host}:{self.port}",
            profile=self.profile.name,
            ledger=settings.redacted()["ledger_url"],
            mqtt=_hide(self.mqtt_url or ""),
            instance=settings.instance_id,
            metrics=f"{m_host}:{self.metrics_server.port}" if self.metrics_server is not None else None,
            upstream=_hide(settings.upstream.url) if settings.upstream.url else None,
        )
        unknown = unknown_environment()
        if unknown:
            self.log.warning("config.unknown_variables", names=unknown, detail="ignored; check their spelling")

    async def _start_broker(self, choice: BrokerChoice) -> None:
        """Start the embedded broker if ``choice`` says so; remember the URL the relay publishes to."""
        from gateway.adapters.broker import BrokerError, EmbeddedBroker

        if choice.embedded_at is None:
            self.mqtt_url = choice.url
            return
        self.broker = EmbeddedBroker(*choice.embedded_at)
        try:
            await self.broker.start()
        except BrokerError as exc:
            self.broker = None
            raise StartupError("GATEWAY_MQTT__EMBEDDED_LISTEN", str(exc)) from None
        self.mqtt_url = self.broker.url

    async def _open_ledger(self) -> None:
        assert self.ledger is not None
        try:
            await self.ledger.open()
        except Exception as exc:
            raise ledger_error(self.settings, exc) from exc

    def _start_relay(self) -> None:
        from gateway.adapters.mqtt import OutboxRelay

        settings = self.settings
        assert self.ledger is not None and self.mqtt_url is not None
        mqtt = settings.mqtt
        self.relay = OutboxRelay(
            self.ledger,
            url=self.mqtt_url,
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

    async def _start_upstream(self) -> None:
        """The host link, what an earlier run left pending concluded, the store-and-forward sender."""
        from gateway.adapters.saf import SafSender

        assert self.ledger is not None and self.service is not None
        upstream = self.settings.upstream
        await self.conclude_abandoned(older_than_s=5.0)  # left by a stop (younger ones: the loop, later)
        self.saf = SafSender(
            self.ledger, self.upstream, render=self.service.render, retry_s=upstream.saf_retry_s,
            max_age_s=upstream.saf_max_age_s, clock=self.clock.now, logger=self.log,
        )  # fmt: skip
        self.service.on_queued = self.saf.notify
        self.service.advice_cards = self.saf.card_fields
        await self.upstream.start()
        self.saf.start()
        self._tasks.append(asyncio.create_task(self._abandoned_loop(), name="upstream-abandoned"))
        if not await self.upstream.wait_up(min(upstream.connect_timeout_s, 5.0)):
            self.log.warning("upstream.not_up_yet", detail=f"when_down = {upstream.when_down} applies meanwhile")

    async def conclude_abandoned(self, *, older_than_s: float) -> int:
        """Conclude records left pending longer than the host timeout plus ``older_than_s`` as unanswered:
        91 for their terminal (which gave up long ago) and a reversal queued for the host."""
        assert self.ledger is not None and self.service is not None
        service = self.service
        now = self.clock.now()
        cutoff = now - timedelta(seconds=self.settings.upstream.timeout_s + older_than_s)
        count = 0
        for record in await self.ledger.pending_records():
            if record.created_at > cutoff:
                continue  # its gateway may still be waiting for the host (this one, or another instance)
            ctx = Context(now, service.config.policy, service.config.pan_key, service.profile.response_code)
            await self.ledger.conclude(record.id, None, NoAnswer(sent=True), ctx, service.render)
            self.log.warning("upstream.abandoned", rrn=record.rrn, terminal=record.terminal_id, stan=record.stan,
                             kind=str(record.kind))  # fmt: skip
            count += 1
        if count and self.saf is not None:
            self.saf.notify()
        return count

    async def _abandoned_loop(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.conclude_abandoned(older_than_s=ABANDONED_AFTER_S)
            except Exception as exc:  # the ledger failed: next time
                self.log.warning("upstream.abandoned_failed", error=type(exc).__name__)

    async def _undo_start(self) -> None:
        """Stop what a failed :meth:`start` started, quietly (the failure is what gets reported)."""
        with contextlib.suppress(Exception):
            if self.server is not None:
                await self.server.stop(grace_s=0)
        with contextlib.suppress(Exception):
            if self.saf is not None:
                await self.saf.stop()
            if self.upstream is not None:
                await self.upstream.stop()
        await self._close_events()
        self._close_metrics_server()
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                await self.ledger.close()

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

    def _close_metrics_server(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

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
        if self.service is not None and self.ledger is not None:
            with contextlib.suppress(Exception):  # the ledger may have failed to open
                await self.service.drain_forwarded()  # each within the host timeout
                await self.service.drain_answered()
        if self.saf is not None:
            await self.saf.stop()
        if self.upstream is not None:
            await self.upstream.stop()
        if self.relay is not None and self.ledger is not None:
            # give the relay a moment to publish what the last requests wrote
            with contextlib.suppress(Exception):
                for _ in range(20):
                    if (await self.ledger.status()).pending == 0:
                        break
                    await asyncio.sleep(0.05)
        await self._close_events()
        self._close_metrics_server()
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
            log.error("gateway.start_failed", setting=exc.setting, detail=exc.detail)
            return 2
        return 0

    try:
        if settings.tls.cert is not None:
            # terminal TLS upgrades each connection with loop.start_tls, so that handshakes count as
            # connections and have a deadline; uvloop's start_tls never completes a server-side handshake
            # (uvloop issue 707), so TLS runs on asyncio's own loop
            return asyncio.run(main())
        try:
            import uvloop
        except ImportError:
            return asyncio.run(main())
        return int(uvloop.run(main()))
    finally:
        flush_logs()


def ledger_error(settings: Settings, exc: Exception) -> StartupError:
    """What opening the ledger raised, as the start-up problem of ``GATEWAY_LEDGER_URL``."""
    where = settings.redacted()["ledger_url"]
    if isinstance(exc, OSError):
        reason = describe_os_error(exc)
    elif isinstance(exc, sqlite3.Error | asyncpg.PostgresError | asyncpg.InterfaceError | RuntimeError | ValueError):
        reason = str(exc) or type(exc).__name__
    else:
        raise exc  # a bug, not a setting: let it show with its traceback
    return StartupError("GATEWAY_LEDGER_URL", f"cannot open the ledger {where}: {reason}")


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[Ledger]:
    """The ledger alone, for command-line tools (outbox status, batches); a ledger that cannot be
    opened raises :class:`StartupError`."""
    ledger = build_ledger(settings)
    try:
        await ledger.open()
    except Exception as exc:
        raise ledger_error(settings, exc) from exc
    try:
        yield ledger
    finally:
        await ledger.close()
