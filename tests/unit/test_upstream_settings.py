"""GATEWAY_UPSTREAM__*: the acquirer link's settings, their defaults and the URL's checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import Settings, UpstreamSettings, load_settings, parse_upstream_url


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def test_without_a_url_there_is_no_upstream_and_the_defaults_are_the_issues() -> None:
    upstream = Settings().upstream
    assert upstream.url is None and upstream.endpoint() is None
    assert (upstream.profile, upstream.connections, upstream.timeout_s, upstream.when_down) == (
        "iso87-binary", 1, 10.0, "decline")  # fmt: skip
    assert (upstream.echo_interval_s, upstream.saf_max_age_s, upstream.saf_retry_s) == (30.0, 86400.0, 5.0)
    assert upstream.backoff_initial_s <= upstream.backoff_max_s


def test_the_environment_names_are_a_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_UPSTREAM__URL", "tcp://acquirer.example:8600")
    monkeypatch.setenv("GATEWAY_UPSTREAM__PROFILE", "iso87-ascii")
    monkeypatch.setenv("GATEWAY_UPSTREAM__CONNECTIONS", "3")
    monkeypatch.setenv("GATEWAY_UPSTREAM__TIMEOUT_S", "2.5")
    monkeypatch.setenv("GATEWAY_UPSTREAM__WHEN_DOWN", "standin")
    upstream = load_settings().upstream
    assert upstream.endpoint() == ("tcp", "acquirer.example", 8600)
    assert (upstream.profile, upstream.connections, upstream.timeout_s, upstream.when_down) == (
        "iso87-ascii", 3, 2.5, "standin")  # fmt: skip


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:8600", ("tcp", "127.0.0.1", 8600)),
        ("tls://host.example:443", ("tls", "host.example", 443)),
        ("tcp://[::1]:8600", ("tcp", "::1", 8600)),
        ("  tcp://h:1/  ", ("tcp", "h", 1)),
    ],
)
def test_tcp_and_tls_urls_with_a_host_and_a_port_are_accepted(url: str, expected: tuple[str, str, int]) -> None:
    assert parse_upstream_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "scheme 'http'"),
        ("h:1", "scheme 'h'"),
        ("//h:1", "no scheme"),
        ("tcp://h", "no port"),
        ("tcp://h:0", "no port"),
        ("tcp://:8600", "no host"),
        ("tcp://h:70000", "out of range"),
        ("tcp://user:secret@h:1", "no user or password"),
        ("tcp://h:1/path", "nothing may follow the port"),
        ("tcp://h:1?x=1", "nothing may follow the port"),
    ],
)
def test_a_bad_url_is_refused_saying_what_is_wrong_and_never_echoing_it(url: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        UpstreamSettings(url=url)
    [error] = caught.value.errors()
    assert error["loc"] == ("url",)
    assert "expected tcp://host:port or tls://host:port" in error["msg"] and problem in error["msg"]
    assert "secret" not in error["msg"]


def test_an_empty_url_means_no_upstream() -> None:
    assert UpstreamSettings(url="").url is None


def test_tls_files_need_a_tls_url(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_ca set but the upstream url is not tls://"):
        UpstreamSettings(url="tcp://h:1", tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ValidationError, match="tls_key set without tls_cert"):
        UpstreamSettings(url="tls://h:1", tls_key=tmp_path / "key.pem")
    assert UpstreamSettings(url="tls://h:1", tls_ca=tmp_path / "ca.pem").tls_ca == tmp_path / "ca.pem"


def test_limits_are_checked() -> None:
    with pytest.raises(ValidationError):
        UpstreamSettings(connections=0)
    with pytest.raises(ValidationError):
        UpstreamSettings(when_down="approve")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="backoff_max_s must be at least backoff_initial_s"):
        UpstreamSettings(backoff_initial_s=5, backoff_max_s=1)
