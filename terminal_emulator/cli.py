"""``iso-terminal``: the terminal emulator's command line.

Exit codes: 0 an answer came (whatever its response code; for ``scenario``: every expectation
held), 1 time-out or connection failure (``scenario``: an expectation failed), 2 usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .dialects import Dialect, dialect_for
from .errors import TerminalError, TransportError, UsageError
from .journal import JournalError, load_journal
from .load import LoadConfig, LoadStats, parse_mix, run_load
from .money import AmountError, parse_major
from .output import RESPONSE_TEXT, emit
from .profile import ProfileError, WireProfile, load_profile
from .scenario import Scenario, ScenarioError, ScenarioResult, Step, StepResult, load_scenario, run_scenario
from .terminal import Exchange, Terminal

__all__ = ["app", "main"]

T = TypeVar("T")

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

app = typer.Typer(
    name="iso-terminal",
    help="ISO 8583 POS terminal emulator: transactions, scenarios and load.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass(slots=True)
class Settings:
    host: str
    port: int
    profile_name: str
    tid: str | None
    mid: str | None
    journal: Path | None
    timeout: float
    json: bool
    currency_option: str | None
    tpdu: bytes | None = None
    _profile: WireProfile | None = None

    @property
    def currency(self) -> str:
        """``--currency``, else the dialect's (840 iso87, 156 cup)."""
        if self.currency_option:
            return self.currency_option
        try:
            return self.dialect().default_currency
        except UsageError:
            return "840"  # the profile's own error is reported when the command runs

    def dialect(self) -> Dialect:
        return dialect_for(self.profile())

    @property
    def terminal_id(self) -> str:
        return self.tid or "TERM0001"

    @property
    def merchant_id(self) -> str:
        return self.mid or "MERCHANT0000001"

    def profile(self) -> WireProfile:
        if self._profile is None:
            try:
                self._profile = load_profile(self.profile_name)
            except ProfileError as exc:
                raise UsageError(str(exc)) from None
        return self._profile

    def emit(self, exchange: Exchange, prefix: str = "") -> None:
        emit(exchange, self.dialect(), as_json=self.json, prefix=prefix)

    def journal_path(self) -> Path:
        if self.journal is not None:
            return self.journal
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "iso-terminal" / f"{self.merchant_id}-{self.terminal_id}.json"


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_object(Settings)
    if settings is None:  # pragma: no cover - the callback always sets it
        raise RuntimeError("iso-terminal: global options missing")
    return settings


@app.callback()
def _global(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Host to connect to.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8583,
    profile: Annotated[str, typer.Option(help="Wire profile: a name in specs/ or a .toml path.")] = "iso87-binary",
    tid: Annotated[str | None, typer.Option(help="Terminal id, DE41 (default TERM0001).")] = None,
    mid: Annotated[str | None, typer.Option(help="Merchant id, DE42 (default MERCHANT0000001).")] = None,
    journal: Annotated[
        Path | None,
        typer.Option(help="Journal file (default $XDG_STATE_HOME/iso-terminal/<mid>-<tid>.json)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.", min=0.001)] = 10.0,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per exchange.")] = False,
    currency: Annotated[
        str | None, typer.Option(help="ISO 4217 numeric currency, DE49 (default: 840 iso87, 156 cup).")
    ] = None,
    tpdu: Annotated[
        str | None, typer.Option(help="TPDU to send, 10 hex digits (e.g. 6000030000), for profiles with one.")
    ] = None,
) -> None:
    """ISO 8583 POS terminal emulator."""
    if currency is not None and not (currency.isdigit() and len(currency) == 3):
        raise typer.BadParameter("a 3-digit ISO 4217 numeric code, e.g. 840", param_hint="--currency")
    tpdu_bytes = None
    if tpdu is not None:
        try:
            tpdu_bytes = bytes.fromhex(tpdu)
        except ValueError:
            tpdu_bytes = b""
        if len(tpdu_bytes) != 5:
            raise typer.BadParameter("10 hex digits, e.g. 6000030000", param_hint="--tpdu")
    for value, name, size in ((tid, "--tid", 8), (mid, "--mid", 15)):
        if value is not None and not 1 <= len(value) <= size:
            raise typer.BadParameter(f"1 to {size} characters", param_hint=name)
    ctx.obj = Settings(host, port, profile, tid, mid, journal, timeout, json_output, currency, tpdu_bytes)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# --- running one terminal command ---------------------------------------------------------------
@contextlib.contextmanager
def _journal_lock(path: Path) -> Iterator[None]:
    """One command at a time per journal (two shells sharing a terminal must not reuse a STAN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_terminal(settings: Settings, action: Callable[[Terminal], Awaitable[Exchange]]) -> None:
    try:
        profile = settings.profile()
        path = settings.journal_path()
        with _journal_lock(path):
            journal = load_journal(path)

            async def go() -> Exchange:
                async with Terminal(
                    settings.host, settings.port, profile=profile, tid=settings.terminal_id,
                    mid=settings.merchant_id, currency=settings.currency, journal=journal,
                    timeout=settings.timeout, tpdu=settings.tpdu, on_exchange=settings.emit,
                ) as terminal:
                    return await action(terminal)

            asyncio.run(go())
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    except TransportError as exc:
        raise _fail(str(exc), 1) from None
    except (JournalError, TerminalError, OSError) as exc:
        raise _fail(str(exc), 1) from None


def _amount(text: str | None, currency: str, option: str = "--amount") -> int | None:
    if text is None:
        return None
    try:
        return parse_major(text, currency)
    except AmountError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _require(value: T | None, option: str) -> T:
    if value is None:
        raise typer.BadParameter("required", param_hint=option)
    return value


def _pan(value: str | None) -> str | None:
    if value is not None and not (value.isdigit() and 12 <= len(value) <= 19):
        raise typer.BadParameter("12 to 19 digits", param_hint="--pan")
    return value


AmountOpt = Annotated[str | None, typer.Option("--amount", help="Amount in major units, e.g. 12.34.")]
PanOpt = Annotated[str | None, typer.Option("--pan", help="Card number (default: the dialect's test card).")]
RrnOpt = Annotated[str | None, typer.Option("--rrn", help="RRN (DE37) of the original transaction.")]
LastOpt = Annotated[bool, typer.Option("--last", help="Refer to the journal's latest approved sale or completion.")]


def _check_reference(rrn: str | None, last: bool) -> None:
    if rrn is not None and last:
        raise typer.BadParameter("give --rrn or --last, not both", param_hint="--last")


def _reference(terminal: Terminal, rrn: str | None, last: bool) -> str | None:
    """``--rrn``, or with ``--last`` the journal's latest sale's (a script never copies an RRN)."""
    if not last:
        return rrn
    record = terminal.journal.last_sale()
    if record is None or record.rrn is None:
        raise UsageError("--last: the journal holds no approved purchase or completion; make a sale first")
    return record.rrn


@app.command()
def sale(
    ctx: typer.Context,
    amount: AmountOpt = None,
    pan: PanOpt = None,
    expiry: Annotated[str | None, typer.Option(help="Card expiry YYMM (DE14).")] = None,
) -> None:
    """Purchase (0200, processing code 000000)."""
    s = _settings(ctx)
    value = _require(_amount(amount, s.currency), "--amount")
    card = _pan(pan)
    _run_terminal(s, lambda t: t.sale(value, pan=card, expiry=expiry))


@app.command()
def preauth(
    ctx: typer.Context,
    amount: AmountOpt = None,
    pan: PanOpt = None,
    expiry: Annotated[str | None, typer.Option(help="Card expiry YYMM (DE14).")] = None,
) -> None:
    """Pre-authorization (0100)."""
    s = _settings(ctx)
    value = _require(_amount(amount, s.currency), "--amount")
    card = _pan(pan)
    _run_terminal(s, lambda t: t.preauth(value, pan=card, expiry=expiry))


@app.command()
def complete(
    ctx: typer.Context,
    rrn: RrnOpt = None,
    amount: AmountOpt = None,
    approval_code: Annotated[str | None, typer.Option(help="Pre-auth approval code (DE38).")] = None,
    pan: PanOpt = None,
) -> None:
    """Pre-auth completion (0220 with DE90 and DE38); default: the latest open pre-auth."""
    s = _settings(ctx)
    value = _amount(amount, s.currency)
    card = _pan(pan)
    _run_terminal(s, lambda t: t.complete(rrn, amount=value, approval_code=approval_code, pan=card))


@app.command()
def void(
    ctx: typer.Context, rrn: RrnOpt = None, last: LastOpt = False, amount: AmountOpt = None, pan: PanOpt = None
) -> None:
    """Void (0200, 020000, DE37 = original RRN, or with --last the latest sale's); amount from the
    journal unless given."""
    s = _settings(ctx)
    _check_reference(rrn, last)
    if not last:
        _require(rrn, "--rrn")
    value = _amount(amount, s.currency)
    card = _pan(pan)

    async def go(t: Terminal) -> Exchange:
        original = _reference(t, rrn, last)
        assert original is not None
        return await t.void(original, amount=value, pan=card)

    _run_terminal(s, go)


@app.command()
def refund(
    ctx: typer.Context,
    rrn: RrnOpt = None,
    last: LastOpt = False,
    amount: AmountOpt = None,
    pan: PanOpt = None,
    by_original_data: Annotated[
        bool, typer.Option("--by-original-data", help="Reference the original by DE90 instead of DE37.")
    ] = False,
) -> None:
    """Refund (0200, 200000) by RRN or of the latest sale (--last), or unreferenced without either."""
    s = _settings(ctx)
    _check_reference(rrn, last)
    value = _amount(amount, s.currency)
    card = _pan(pan)
    if rrn is None and not last and value is None:
        raise typer.BadParameter("an unreferenced refund needs an amount", param_hint="--amount")

    async def go(t: Terminal) -> Exchange:
        original = _reference(t, rrn, last)
        return await t.refund(original, amount=value, pan=card, by_original_data=by_original_data)

    _run_terminal(s, go)


@app.command()
def reverse(
    ctx: typer.Context,
    rrn: RrnOpt = None,
    stan: Annotated[str | None, typer.Option(help="STAN (DE11) of the original, from the journal.")] = None,
    advice: Annotated[bool, typer.Option("--advice", help="Send a 0420 reversal advice.")] = False,
    partial_amount: Annotated[
        str | None, typer.Option("--partial-amount", help="Partial reversal: the amount that remains (DE95).")
    ] = None,
    pan: PanOpt = None,
) -> None:
    """Reversal (0400, or 0420 with --advice) of a journal transaction; default: the latest."""
    s = _settings(ctx)
    partial = _amount(partial_amount, s.currency, "--partial-amount")
    card = _pan(pan)
    _run_terminal(s, lambda t: t.reverse(rrn, stan=stan, advice=advice, partial_amount=partial, pan=card))


@app.command()
def settle(
    ctx: typer.Context,
    credits_count: Annotated[int | None, typer.Option(help="Override DE74.", min=0)] = None,
    credits_amount: Annotated[str | None, typer.Option(help="Override DE86 (major units).")] = None,
    debits_count: Annotated[int | None, typer.Option(help="Override DE76.", min=0)] = None,
    debits_amount: Annotated[str | None, typer.Option(help="Override DE88 (major units).")] = None,
) -> None:
    """Batch settlement (0500, 920000) with the journal's totals unless overridden."""
    s = _settings(ctx)
    ca = _amount(credits_amount, s.currency, "--credits-amount")
    da = _amount(debits_amount, s.currency, "--debits-amount")
    _run_terminal(
        s,
        lambda t: t.settle(credits_count=credits_count, credits_amount=ca, debits_count=debits_count,
                           debits_amount=da),
    )


@app.command()
def echo(
    ctx: typer.Context,
    code: Annotated[str, typer.Option(help="iso87 DE70 / cup 60.3: 301 echo, 001 sign-on, 002 sign-off.")] = "301",
) -> None:
    """Network management echo (iso87 0800 DE70 301; cup 0820 60.3 301)."""
    s = _settings(ctx)
    _run_terminal(s, lambda t: t.echo(code))


@app.command()
def signon(
    ctx: typer.Context,
    operator: Annotated[str, typer.Option(help="Operator code, 1 to 3 characters (cup field 63).")] = "01",
) -> None:
    """Sign-on (iso87 0800 DE70 001; cup 0800 60.3 003): a cup host's answer sets the journal's batch."""
    s = _settings(ctx)
    if not 1 <= len(operator) <= 3:
        raise typer.BadParameter("1 to 3 characters", param_hint="--operator")
    _run_terminal(s, lambda t: t.signon(operator))


# --- scenarios ----------------------------------------------------------------------------------
def _resolve_scenario(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    shipped = SCENARIO_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.exists():
        return shipped
    raise typer.BadParameter(f"no such file, and no shipped scenario {name!r}", param_hint="FILE")


@app.command()
def scenario(
    ctx: typer.Context,
    files: Annotated[
        list[str] | None, typer.Argument(metavar="FILE...", help="Scenario YAML files or shipped names.")
    ] = None,
    list_shipped: Annotated[bool, typer.Option("--list", help="List the shipped scenarios.")] = False,
) -> None:
    """Play scenario files; exit 0 when every expectation held, 1 otherwise."""
    s = _settings(ctx)
    if list_shipped:
        for path in sorted(SCENARIO_DIR.glob("*.yaml")):
            typer.echo(f"{path.stem:<32} {load_scenario(path).name}")
        return
    if not files:
        raise typer.BadParameter("give at least one scenario", param_hint="FILE")
    try:
        scenarios = [load_scenario(_resolve_scenario(f)) for f in files]
        profile = s.profile()
    except (ScenarioError, UsageError) as exc:
        raise _fail(str(exc), 2) from None
    failed = 0
    for number, sc in enumerate(scenarios, start=1):
        result = asyncio.run(_play(s, sc, profile))
        if not result.passed:
            failed += 1
        if result.stopped is not None and number < len(scenarios):
            # the next scenarios would meet the same connection: stop with one line, not a page of them
            if not s.json:
                typer.echo(f"stopped: {len(scenarios) - number} more scenario(s) not played")
            raise typer.Exit(1)
    if not s.json and len(scenarios) > 1:
        typer.echo(f"{len(scenarios) - failed}/{len(scenarios)} scenarios passed")
    if failed:
        raise typer.Exit(1)


async def _play(s: Settings, sc: Scenario, profile: WireProfile) -> ScenarioResult:
    played = 0

    def on_exchange(step: Step, exchange: Exchange) -> None:
        s.emit(exchange, prefix="" if s.json else "    ")

    def on_step(result: StepResult) -> None:
        nonlocal played
        played += 1
        if s.json:
            typer.echo(json.dumps({"step": result.step.label, "passed": result.passed,
                                   "failures": result.failures, "stopped": result.stopped}, separators=(",", ":")))
            return
        if result.stopped:
            left = len(sc.steps) - played
            later = f"; {left} later step(s) not played" if left else ""
            typer.echo(f"  [STOPPED] {result.step.label}: {'; '.join(result.failures)}{later}")
            return
        mark = "ok" if result.passed else "FAILED"
        typer.echo(f"  [{mark}] {result.step.label}")
        for failure in result.failures:
            typer.echo(f"         {failure}")

    if not s.json:
        typer.echo(f"scenario: {sc.name}")
    result = await run_scenario(
        sc, host=s.host, port=s.port, profile=profile, response_timeout=s.timeout, tid=s.tid, mid=s.mid,
        tpdu=s.tpdu, on_exchange=on_exchange, on_step=on_step,
    )
    if s.json:
        typer.echo(json.dumps({"scenario": sc.name, "tid": result.tid, "passed": result.passed,
                               "stopped": result.stopped}, separators=(",", ":")))
    else:
        verdict = "PASSED" if result.passed else "FAILED"
        typer.echo(f"{verdict}: {sc.name} (terminal {result.tid})\n")
    return result


# --- load ---------------------------------------------------------------------------------------
@app.command()
def load(
    ctx: typer.Context,
    connections: Annotated[int, typer.Option("--connections", "-c", help="Terminals (one connection each).",
                                             min=1)] = 4,
    duration: Annotated[float | None, typer.Option(help="Seconds to run (default 10 unless --count).",
                                                   min=0.1)] = None,
    count: Annotated[int | None, typer.Option(help="Total requests to send.", min=1)] = None,
    pipeline: Annotated[int, typer.Option(help="Requests in flight per connection.", min=1)] = 1,
    rate: Annotated[float | None, typer.Option(help="Target total rate (msg/s); default closed loop.")] = None,
    mix: Annotated[str, typer.Option(help="Transaction mix, e.g. purchase=70,refund=10,void=10,reversal=10.")]
    = "purchase=100",
    amount: Annotated[str, typer.Option(help="Amount of each purchase (major units).")] = "10.00",
    tid_prefix: Annotated[str, typer.Option(help="Terminal ids are this prefix + a number.")] = "L",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")] = False,
    seed: Annotated[int | None, typer.Option(help="Random seed for the transaction order.")] = None,
    no_uvloop: Annotated[bool, typer.Option("--no-uvloop", help="Use the standard asyncio loop.")] = False,
) -> None:
    """Drive many terminals at once and report throughput and latency percentiles."""
    s = _settings(ctx)
    try:
        weights = parse_mix(mix)
        profile = s.profile()
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    value = _require(_amount(amount, s.currency), "--amount")
    config = LoadConfig(
        host=s.host, port=s.port, connections=connections,
        duration=duration if duration is not None else (None if count is not None else 10.0),
        count=count, pipeline=pipeline, rate=rate, mix=weights, amount=value, currency=s.currency,
        mid=s.merchant_id, tid_prefix=tid_prefix, response_timeout=s.timeout, seed=seed, tpdu=s.tpdu,
    )
    show = not quiet and (sys.stderr.isatty() or s.json is False)
    progress = _progress_printer() if show else None
    try:
        stats = _run_loop(run_load(config, profile, progress), use_uvloop=not no_uvloop)
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    except ConnectionError as exc:
        raise _fail(str(exc), 1) from None
    summary = stats.summary(config)
    if progress is not None and sys.stderr.isatty():
        typer.echo("", err=True)
    if s.json:
        typer.echo(json.dumps(summary))
    else:
        _print_table(summary)
    if stats.received == 0:
        raise typer.Exit(1)


def _run_loop(coro: Awaitable[T], use_uvloop: bool) -> T:
    async def wrapper() -> T:
        return await coro

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: T = uvloop.run(wrapper())
            return result
    return asyncio.run(wrapper())


def _progress_printer() -> Callable[[LoadStats, float], None]:
    state = {"received": 0, "latencies": 0}
    tty = sys.stderr.isatty()

    def show(stats: LoadStats, elapsed: float) -> None:
        window = sorted(stats.latencies_ms[state["latencies"]:])
        rate = stats.received - state["received"]
        state["received"], state["latencies"] = stats.received, len(stats.latencies_ms)
        p99 = window[min(len(window) - 1, int(len(window) * 0.99))] if window else 0.0
        line = (f"[{elapsed:5.1f}s] sent {stats.sent:>9,}  recv {stats.received:>9,}  {rate:>7,} msg/s  "
                f"p99 {p99:6.2f} ms  timeouts {stats.timeouts}  errors {stats.errors}")
        sys.stderr.write(("\r" + line) if tty else (line + "\n"))
        sys.stderr.flush()

    return show


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="iso-terminal load", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("tps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "sent", "received", "timeouts", "errors",
                "late", "duration_s", "connections", "pipeline"):
        value = summary[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    for code, n in summary["response_codes"].items():
        table.add_row(f"response {code} {RESPONSE_TEXT.get(code, '')}".rstrip(), f"{n:,}")
    for kind, n in summary["sent_by_kind"].items():
        table.add_row(f"sent {kind}", f"{n:,}")
    Console().print(table)


def main() -> None:
    """Console-script entry point (``iso-terminal``)."""
    app()
