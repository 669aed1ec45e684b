"""Every start-up failure of ``iso-gateway serve`` is one ``gateway.start_failed`` line naming the
setting and the problem, with exit code 2 and nothing else on stdout or stderr (no traceback, no
third-party lines before it); ``iso-gateway check-config`` finds the same problem without starting
anything (issue 22). Run as an operator runs them: processes, real ports, real files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from brokers import free_port

BIN = Path(sys.executable).parent
SHIPPED_PROFILE = Path(__file__).resolve().parents[2] / "specs" / "iso87-binary.toml"


def run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "iso-gateway"), command], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else listens on (it accepts connections and never answers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@dataclass(frozen=True)
class Case:
    setting: str
    words: str  #: what the detail must say
    env: Callable[[Path, int], dict[str, str]]  #: (the test's folder, a port something holds) -> variables


CASES = {
    "the terminal port is taken": Case(
        "GATEWAY_LISTEN", "address already in use", lambda _, held: {"GATEWAY_LISTEN": f"127.0.0.1:{held}"}
    ),
    "the metrics port is taken": Case(
        "GATEWAY_METRICS_LISTEN",
        "address already in use",
        lambda _, held: {"GATEWAY_METRICS_LISTEN": f"127.0.0.1:{held}"},
    ),
    "the embedded broker's port is taken": Case(
        "GATEWAY_MQTT__EMBEDDED_LISTEN",
        "address already in use",
        lambda _, held: {"GATEWAY_MQTT_URL": "embedded", "GATEWAY_MQTT__EMBEDDED_LISTEN": f"127.0.0.1:{held}"},
    ),
    "auto finds something that is no MQTT broker on the port": Case(
        "GATEWAY_MQTT_URL",
        "does not answer MQTT",
        lambda _, held: {"GATEWAY_MQTT_URL": "auto", "GATEWAY_MQTT__EMBEDDED_LISTEN": f"127.0.0.1:{held}"},
    ),
    "the SQLite ledger cannot be opened": Case(
        "GATEWAY_LEDGER_URL", "cannot create files in /proc", lambda *_: {"GATEWAY_LEDGER_URL": "sqlite:////proc/x.db"}
    ),
    "the ledger's folder does not exist": Case(
        "GATEWAY_LEDGER_URL",
        "does not exist",
        lambda tmp, _: {"GATEWAY_LEDGER_URL": f"sqlite:///{tmp / 'typo' / 'ledger.db'}"},
    ),
    "the ledger file is no SQLite database": Case(
        "GATEWAY_LEDGER_URL",
        "is not an SQLite database",
        lambda tmp, _: {"GATEWAY_LEDGER_URL": f"sqlite:///{tmp / 'notes.txt'}"},
    ),
    "PostgreSQL does not answer": Case(
        "GATEWAY_LEDGER_URL",
        "connection refused",
        lambda *_: {"GATEWAY_LEDGER_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/gateway"},
    ),
    "a setting has an invalid value": Case(
        "GATEWAY_POLICY__REFUND_WINDOW_DAYS",
        "greater than or equal to 0",
        lambda *_: {"GATEWAY_POLICY__REFUND_WINDOW_DAYS": "-1"},
    ),
    "the wire profile does not exist": Case(
        "GATEWAY_PROFILE", "no-such-profile", lambda *_: {"GATEWAY_PROFILE": "no-such-profile"}
    ),
    "the terminal TLS certificate is missing": Case(
        "GATEWAY_TLS__CERT", "no such file", lambda tmp, _: {"GATEWAY_TLS__CERT": str(tmp / "server.pem")}
    ),
    "the terminal TLS certificate is no certificate": Case(
        "GATEWAY_TLS__CERT", "cannot load the certificate", lambda *_: {"GATEWAY_TLS__CERT": str(SHIPPED_PROFILE)}
    ),
    "the upstream host's profile does not exist": Case(
        "GATEWAY_UPSTREAM__PROFILE",
        "no-such-profile",
        lambda *_: {"GATEWAY_UPSTREAM__URL": "tcp://127.0.0.1:9", "GATEWAY_UPSTREAM__PROFILE": "no-such-profile"},
    ),
    "the upstream host's TLS CA file is missing": Case(
        "GATEWAY_UPSTREAM__TLS_CA",
        "no such file",
        lambda tmp, _: {"GATEWAY_UPSTREAM__URL": "tls://127.0.0.1:9", "GATEWAY_UPSTREAM__TLS_CA": str(tmp / "ca.pem")},
    ),
    "MQTT TLS settings come with a plain MQTT broker": Case(
        "GATEWAY_MQTT__TLS_CA",
        "need a broker URL mqtts://",
        lambda tmp, _: {"GATEWAY_MQTT_URL": "mqtt://127.0.0.1:1883", "GATEWAY_MQTT__TLS_CA": str(SHIPPED_PROFILE)},
    ),
}


def base_env(tmp_path: Path) -> dict[str, str]:
    """Settings that start: free ports, a ledger in the test's folder, an embedded broker on port 0."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    return {
        **env,
        "GATEWAY_LISTEN": "127.0.0.1:0",
        "GATEWAY_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "GATEWAY_MQTT_URL": "embedded",
        "GATEWAY_MQTT__EMBEDDED_LISTEN": "127.0.0.1:0",
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_PAN_HMAC_KEY": "startup-test-key",
    }


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_start_up_failure_is_one_start_failed_line_naming_the_setting_and_exit_2(
    case: Case, tmp_path: Path, held_port: int
) -> None:
    (tmp_path / "notes.txt").write_text("not a ledger\n")
    env = {**base_env(tmp_path), **case.env(tmp_path, held_port)}
    result = run("serve", env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stdout}"
    line = json.loads(lines[0])
    assert (line["event"], line["level"], line["setting"]) == ("gateway.start_failed", "error", case.setting)
    assert case.words in line["detail"]
    assert not (tmp_path / "ledger.db").exists()  # nothing was started, not even the ledger
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_check_config_finds_the_same_problem_without_starting_anything(
    case: Case, tmp_path: Path, held_port: int
) -> None:
    (tmp_path / "notes.txt").write_text("not a ledger\n")
    env = {**base_env(tmp_path), **case.env(tmp_path, held_port)}
    result = run("check-config", env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert case.setting in result.stderr
    assert case.words in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ledger.db").exists()


def test_check_config_of_settings_that_start_reports_each_part_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    env = {
        **base_env(tmp_path),
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_METRICS_LISTEN": f"127.0.0.1:{metrics}",
    }
    result = run("check-config", env, tmp_path)
    assert result.returncode == 0, result.stderr
    for line in (
        f"listen: ok (127.0.0.1:{port} is free)",
        f"metrics: ok (127.0.0.1:{metrics} is free)",
        f"ledger: ok (SQLite {tmp_path / 'ledger.db'}: will be created)",
        "mqtt: ok (GATEWAY_MQTT_URL=embedded",
    ):
        assert line in result.stdout
    assert list(tmp_path.iterdir()) == []  # no ledger, no -wal, no temporary file left
    for free in (port, metrics):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", free))  # released again


def test_check_config_reports_the_upstream_host_without_contacting_it(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "GATEWAY_UPSTREAM__URL": f"tcp://127.0.0.1:{free_port()}"}
    result = run("check-config", env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "upstream: ok (tcp://127.0.0.1:" in result.stdout
    assert "profile iso87-binary (not contacted)" in result.stdout
