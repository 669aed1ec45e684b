"""Prometheus metrics: private registries, correct samples, a real HTTP endpoint."""

from __future__ import annotations

import urllib.request

import pytest

from gateway.metrics import MAX_LABEL_SETS, Metrics, start_http_server


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_two_metrics_objects_count_independently() -> None:
    first, second = Metrics(), Metrics()
    first.request_done("0200", "purchase", "00", 0.002)
    assert sample(first, "gateway_requests_total", mti="0200", kind="purchase", response_code="00") == 1
    assert sample(second, "gateway_requests_total", mti="0200", kind="purchase", response_code="00") is None


def test_requests_are_counted_by_mti_kind_and_response_code() -> None:
    metrics = Metrics()
    metrics.request_done("0200", "purchase", "00", 0.001)
    metrics.request_done("0200", "purchase", "00", 0.001)
    metrics.request_done("0200", "refund", "64", 0.001)
    assert sample(metrics, "gateway_requests_total", mti="0200", kind="purchase", response_code="00") == 2
    assert sample(metrics, "gateway_requests_total", mti="0200", kind="refund", response_code="64") == 1


def test_latency_lands_in_cumulative_buckets_with_count_and_sum() -> None:
    metrics = Metrics()
    for seconds in (0.0002, 0.003, 0.003, 20.0):
        metrics.request_done("0800", "network", "00", seconds)
    name = "gateway_request_latency_seconds"
    assert sample(metrics, f"{name}_bucket", le="0.00025") == 1
    assert sample(metrics, f"{name}_bucket", le="0.0025") == 1
    assert sample(metrics, f"{name}_bucket", le="0.005") == 3
    assert sample(metrics, f"{name}_bucket", le="10.0") == 3
    assert sample(metrics, f"{name}_bucket", le="+Inf") == 4
    assert sample(metrics, f"{name}_count") == 4
    assert sample(metrics, f"{name}_sum") == pytest.approx(20.0062)


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    metrics = Metrics()
    metrics.ledger_committed(8)
    assert sample(metrics, "gateway_ledger_commit_batch_size_bucket", le="4.0") == 0
    assert sample(metrics, "gateway_ledger_commit_batch_size_bucket", le="8.0") == 1


def test_connections_open_goes_up_and_down_while_the_total_only_grows() -> None:
    metrics = Metrics()
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    assert sample(metrics, "gateway_connections_open") == 1
    assert sample(metrics, "gateway_connections_total") == 2


def test_rejected_frames_outbox_and_published_events_are_exposed() -> None:
    metrics = Metrics()
    metrics.frame_rejected("oversized")
    metrics.frame_rejected("oversized")
    metrics.frame_rejected("undecodable")
    metrics.set_outbox_pending(42)
    metrics.events_published(3)
    metrics.events_published()
    assert sample(metrics, "gateway_frames_rejected_total", reason="oversized") == 2
    assert sample(metrics, "gateway_frames_rejected_total", reason="undecodable") == 1
    assert sample(metrics, "gateway_outbox_pending") == 42
    assert sample(metrics, "gateway_events_published_total") == 4


def test_garbage_mtis_cannot_grow_the_number_of_series_without_bound() -> None:
    metrics = Metrics()
    for n in range(MAX_LABEL_SETS + 100):
        metrics.request_done(f"{n:04d}", "unknown", "30", 0.001)
    series = next(s for s in metrics.registry.collect() if s.name == "gateway_requests").samples
    assert len(series) == MAX_LABEL_SETS + 1
    assert sample(metrics, "gateway_requests_total", mti="other", kind="other", response_code="other") == 100


def test_the_http_endpoint_serves_the_text_format() -> None:
    metrics = Metrics()
    metrics.request_done("0100", "preauth", "00", 0.004)
    server = start_http_server(metrics, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()
    assert 'gateway_requests_total{kind="preauth",mti="0100",response_code="00"} 1.0' in body
    assert "# TYPE gateway_request_latency_seconds histogram" in body
    assert body == metrics.render().decode()


def test_the_upstream_link_is_exposed_by_outcome_reason_and_latency() -> None:
    metrics = Metrics()
    metrics.upstream_connections_up(2)
    metrics.upstream_request_done("answered", 0.004)
    metrics.upstream_request_done("timeout", None)
    metrics.upstream_request_done("down", None)
    metrics.upstream_request_done("down", None)
    metrics.upstream_late_answer()
    metrics.upstream_undecodable_answer()
    metrics.upstream_disconnected("echo_timeout")
    assert sample(metrics, "gateway_upstream_connections_up") == 2
    assert sample(metrics, "gateway_upstream_requests_total", outcome="answered") == 1
    assert sample(metrics, "gateway_upstream_requests_total", outcome="down") == 2
    assert sample(metrics, "gateway_upstream_latency_seconds_count") == 1  # answered ones only
    assert sample(metrics, "gateway_upstream_latency_seconds_bucket", le="0.005") == 1
    assert sample(metrics, "gateway_upstream_late_answers_total") == 1
    assert sample(metrics, "gateway_upstream_undecodable_total") == 1
    assert sample(metrics, "gateway_upstream_disconnects_total", reason="echo_timeout") == 1
