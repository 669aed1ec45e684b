"""Prometheus metrics, held by a :class:`Metrics` object with its own registry.

Nothing is registered globally: the composition root makes one ``Metrics`` and hands it to the
server, the service, the ledger and the relay; tests make as many as they like.

Updating is cheap: the values are plain Python numbers in dicts and lists, written without locks by
the event-loop thread (the gateway's only writer), and turned into Prometheus samples by a
prometheus-client collector only when scraped. A request costs a dict lookup, an integer increment
and a bisect into the latency buckets (well under a microsecond, against about 2 µs for
prometheus-client's locked ``Counter`` plus ``Histogram``). Scrapes run in the metrics server's
thread and read a consistent copy of each histogram.

Exposed names (``namespace`` prefix, ``gateway`` by default):

- ``gateway_requests_total{mti,kind,response_code}``: counter, requests answered
- ``gateway_request_latency_seconds``: histogram, request frame received -> response written
- ``gateway_connections_open``: gauge, terminal connections open now
- ``gateway_connections_total``: counter, terminal connections accepted
- ``gateway_frames_rejected_total{reason}``: counter, frames refused (oversized, undecodable, ...)
- ``gateway_outbox_pending``: gauge, correction events written but not yet published
- ``gateway_events_published_total``: counter, correction events acknowledged by the broker
- ``gateway_ledger_commit_batch_size``: histogram, requests made durable by one commit
- ``gateway_upstream_connections_up``: gauge, upstream connections signed on now
- ``gateway_upstream_requests_total{outcome}``: counter, requests sent to the upstream host by
  outcome: ``answered``, ``timeout`` (written, no answer in time, or the connection dropped),
  ``down`` (no connection signed on: not sent)
- ``gateway_upstream_latency_seconds``: histogram, request written -> answer received (answered only)
- ``gateway_upstream_late_answers_total``: counter, answers that came after their request gave up
- ``gateway_upstream_undecodable_total``: counter, frames from the host that could not be decoded
- ``gateway_upstream_disconnects_total{reason}``: counter, connection attempts and connections lost,
  by reason (``connect_failed``, ``signon_refused``, ``echo_timeout``, ``closed_by_host``, ...)
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "MAX_LABEL_SETS",
    "Metrics",
    "MetricsServer",
    "start_http_server",
]

#: Request latency buckets in seconds: 250 µs .. 10 s.
LATENCY_BUCKETS: Final = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Requests per ledger commit.
BATCH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
#: Beyond this many distinct label sets per metric, new ones are counted under "other": a terminal
#: sending garbage MTIs must not explode the number of series.
MAX_LABEL_SETS: Final = 512
OTHER: Final = "other"


class _Histogram:
    """Cumulative-at-scrape histogram; ``counts[i]`` holds observations <= ``bounds[i]`` and
    > ``bounds[i-1]``, the last slot the ones above every bound (``+Inf``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts = self.counts[:]  # one atomic copy: buckets and count agree
        total = self.sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        family = HistogramMetricFamily(name, documentation)
        family.add_metric([], buckets, total)
        return family


class Metrics(Collector):
    """The gateway's metrics in a private :class:`~prometheus_client.CollectorRegistry`.

    Update methods are meant for the event-loop thread; reading (``render``, scrapes) is safe from
    any thread.
    """

    def __init__(self, namespace: str = "gateway") -> None:
        self.namespace = namespace
        self.requests: dict[tuple[str, str, str], int] = {}
        self.request_latency = _Histogram(LATENCY_BUCKETS)
        self.connections_open = 0
        self.connections_total = 0
        self.frames_rejected: dict[str, int] = {}
        self.outbox_pending = 0
        self.events_published_total = 0
        self.ledger_commit_batch_size = _Histogram(BATCH_BUCKETS)
        self.upstream_up = 0
        self.upstream_requests: dict[str, int] = {}
        self.upstream_latency = _Histogram(LATENCY_BUCKETS)
        self.upstream_late_answers = 0
        self.upstream_undecodable = 0
        self.upstream_disconnects: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    # --- updates (hot path) -----------------------------------------------------------------------

    def request_done(self, mti: str, kind: str, response_code: str, latency_s: float) -> None:
        """One request answered: count it by (mti, kind, response_code) and observe its latency."""
        key = (mti, kind, response_code)
        requests = self.requests
        if key in requests:
            requests[key] += 1
        elif len(requests) < MAX_LABEL_SETS:
            requests[key] = 1
        else:
            other = (OTHER, OTHER, OTHER)
            requests[other] = requests.get(other, 0) + 1
        self.request_latency.observe(latency_s)

    def connection_opened(self) -> None:
        self.connections_total += 1
        self.connections_open += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def frame_rejected(self, reason: str) -> None:
        """A frame refused; ``reason`` is a short stable word (``oversized``, ``undecodable``, ...)."""
        rejected = self.frames_rejected
        if reason not in rejected and len(rejected) >= MAX_LABEL_SETS:
            reason = OTHER
        rejected[reason] = rejected.get(reason, 0) + 1

    def set_outbox_pending(self, count: int) -> None:
        self.outbox_pending = count

    def events_published(self, count: int = 1) -> None:
        self.events_published_total += count

    def ledger_committed(self, batch_size: int) -> None:
        """One durable ledger commit that carried ``batch_size`` requests."""
        self.ledger_commit_batch_size.observe(batch_size)

    def upstream_connections_up(self, count: int) -> None:
        """Upstream connections signed on now."""
        self.upstream_up = count

    def upstream_request_done(self, outcome: str, latency_s: float | None) -> None:
        """One request to the upstream host: ``answered`` (with its latency), ``timeout`` or ``down``."""
        _count(self.upstream_requests, outcome)
        if latency_s is not None:
            self.upstream_latency.observe(latency_s)

    def upstream_late_answer(self) -> None:
        self.upstream_late_answers += 1

    def upstream_undecodable_answer(self) -> None:
        self.upstream_undecodable += 1

    def upstream_disconnected(self, reason: str) -> None:
        """A connection attempt failed or a connection was lost; ``reason`` is a stable word."""
        _count(self.upstream_disconnects, reason)

    # --- exposition -------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        requests = CounterMetricFamily(f"{ns}_requests", "Requests answered", labels=["mti", "kind", "response_code"])
        for labels, value in list(self.requests.items()):
            requests.add_metric(list(labels), value)
        yield requests
        yield self.request_latency.family(
            f"{ns}_request_latency_seconds", "Time from a request frame received to its response written"
        )
        yield GaugeMetricFamily(f"{ns}_connections_open", "Terminal connections open now", value=self.connections_open)
        yield CounterMetricFamily(f"{ns}_connections", "Terminal connections accepted", value=self.connections_total)
        rejected = CounterMetricFamily(
            f"{ns}_frames_rejected",
            "Frames refused (oversized, bad length header, undecodable, invalid fields)",
            labels=["reason"],
        )
        for reason, value in list(self.frames_rejected.items()):
            rejected.add_metric([reason], value)
        yield rejected
        yield GaugeMetricFamily(
            f"{ns}_outbox_pending", "Correction events written but not yet published", value=self.outbox_pending
        )
        yield CounterMetricFamily(
            f"{ns}_events_published",
            "Correction events acknowledged by the broker",
            value=self.events_published_total,
        )
        yield self.ledger_commit_batch_size.family(
            f"{ns}_ledger_commit_batch_size", "Requests made durable by one ledger commit"
        )
        yield from self._upstream_families()

    def _upstream_families(self) -> Iterator[Metric]:
        ns = self.namespace
        yield GaugeMetricFamily(
            f"{ns}_upstream_connections_up", "Upstream host connections signed on now", value=self.upstream_up
        )
        requests = CounterMetricFamily(
            f"{ns}_upstream_requests", "Requests sent to the upstream host, by outcome", labels=["outcome"]
        )
        for outcome, value in list(self.upstream_requests.items()):
            requests.add_metric([outcome], value)
        yield requests
        yield self.upstream_latency.family(
            f"{ns}_upstream_latency_seconds", "Time from a request written to the upstream host to its answer"
        )
        yield CounterMetricFamily(
            f"{ns}_upstream_late_answers",
            "Upstream answers that came after their request had given up (dropped)",
            value=self.upstream_late_answers,
        )
        yield CounterMetricFamily(
            f"{ns}_upstream_undecodable",
            "Frames from the upstream host that could not be decoded (dropped)",
            value=self.upstream_undecodable,
        )
        disconnects = CounterMetricFamily(
            f"{ns}_upstream_disconnects",
            "Upstream connection attempts failed and connections lost, by reason",
            labels=["reason"],
        )
        for reason, value in list(self.upstream_disconnects.items()):
            disconnects.add_metric([reason], value)
        yield disconnects

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve these metrics over HTTP on ``host:port``; see :func:`start_http_server`."""
        return start_http_server(self, host, port)


def _count(counts: dict[str, int], label: str) -> None:
    """One more under ``label``, or under "other" once there are too many distinct labels."""
    if label not in counts and len(counts) >= MAX_LABEL_SETS:
        label = OTHER
    counts[label] = counts.get(label, 0) + 1


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running metrics HTTP endpoint (prometheus-client's own server, in a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and wait (at most ``timeout_s``) for the thread to end."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout_s)


def start_http_server(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve ``metrics`` on ``host:port`` (port 0 picks a free one) at any path, e.g. ``/metrics``,
    with prometheus-client's own server in a daemon thread. A taken port raises ``OSError``.
    """
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(server, thread)
