"""``iso-host``: the acquirer host simulator's command line.

Exit codes: 0 stopped by SIGTERM or SIGINT (or ``check-rules`` found the file valid), 1 cannot
listen (address in use), write the journal or load the TLS files, 2 usage error (bad option,
profile or rules file).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from ..profile import ProfileError, load_profile
from .rules import Rule, RulesError, Then, When, load_rules
from .server import HostSimulator

__all__ = ["app", "main"]

app = typer.Typer(
    name="iso-host",
    help="ISO 8583 acquirer host simulator: approves by default; declines, delays and drops by rules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _say(line: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    print(f"{stamp} iso-host {line}", file=sys.stderr, flush=True)


def _fail(message: str, code: int) -> typer.Exit:
    print(f"iso-host: error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def _listen_address(text: str) -> tuple[str, int]:
    """``127.0.0.1:8600``, ``0.0.0.0:0`` (any free port) or ``[::1]:8600``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise _fail(f"--listen must be HOST:PORT (e.g. 127.0.0.1:8600), got {text!r}", 2)
    return host, int(port)


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None:
        if key is not None:
            raise _fail("--tls-key needs --tls-cert", 2)
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(f"cannot load the TLS certificate {cert}: {exc}", 1) from None
    return context


@app.command()
def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any free port).")] = "127.0.0.1:8600",
    profile: Annotated[str, typer.Option(help="Wire profile: a name in specs/ or a .toml path.")] = "iso87-binary",
    rules: Annotated[Path | None, typer.Option(help="Rules file (.toml, .yaml or .yml).")] = None,
    journal: Annotated[Path | None, typer.Option(help="Append every request received as a JSON line.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve TLS with this certificate chain (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The TLS private key (PEM), if not in --tls-cert.")] = None,
    quiet: Annotated[bool, typer.Option(help="No line per request on stderr.")] = False,
) -> None:
    """Answer ISO 8583 requests until SIGTERM or SIGINT (exit 0)."""
    host, port = _listen_address(listen)
    try:
        wire = load_profile(profile)
        rule_list = load_rules(rules) if rules is not None else []
        simulator = HostSimulator(wire, rule_list, host=host, port=port, journal=journal,
                                  ssl=_tls_context(tls_cert, tls_key), log=None if quiet else _say)
    except (ProfileError, RulesError) as exc:
        raise _fail(str(exc), 2) from None
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            journal.open("a").close()
        except OSError as exc:
            raise _fail(f"cannot write the journal {journal}: {exc.strerror or exc}", 1) from None
    try:
        asyncio.run(_run(simulator, rules, journal))
    except OSError as exc:
        raise _fail(f"cannot listen on {listen}: {exc.strerror or exc}", 1) from None


async def _run(simulator: HostSimulator, rules: Path | None, journal: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await simulator.start()
    _say(
        f"listening on {simulator.host}:{simulator.port} (profile {simulator.profile.name}, "
        f"{len(simulator.rules)} rule(s){f' from {rules}' if rules else ''}"
        f"{f', journal {journal}' if journal else ''})"
    )
    await stop.wait()
    await simulator.stop()
    _say(f"stopped after {len(simulator.received)} request(s)")


@app.command("check-rules")
def check_rules(path: Annotated[Path, typer.Argument(help="Rules file (.toml, .yaml or .yml).")]) -> None:
    """Validate a rules file and print its rules in the order they are tried (exit 2 if invalid)."""
    try:
        rule_list = load_rules(path)
    except RulesError as exc:
        raise _fail(str(exc), 2) from None
    for number, rule in enumerate(rule_list, start=1):
        print(f"rule {number}{f' {rule.name!r}' if rule.name else ''}: {describe_rule(rule)}")
    print(f"{len(rule_list)} rule(s); requests no rule matches are answered by default (approved)")


def describe_rule(rule: Rule) -> str:
    """``when amount_over=100000 -> code=51``: only the keys the file set."""

    def settings(obj: When | Then, empty: When | Then) -> str:
        return " ".join(
            f"{spec.name}={_shown(getattr(obj, spec.name))}"
            for spec in fields(obj)
            if getattr(obj, spec.name) != getattr(empty, spec.name)
        )

    return f"when {settings(rule.when, When()) or 'always'} -> {settings(rule.then, Then()) or 'answer by default'}"


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def main() -> None:
    """Console-script entry point (``iso-host``)."""
    app()
