"""The ``iso-gateway`` command line (typer + rich).

Commands: ``serve``, ``check-config``, ``outbox status``, ``batches``, ``transactions --unanswered``,
``exceptions`` (and ``exceptions resolve``). ``--config FILE.toml`` works
before the command (for all of them) or after it (for that one). Bad settings, a broken profile or
a missing file end with a clear message on stderr and exit code 2, never a traceback.

Heavy parts (the composition root, the ledger, the wire profiles) are imported inside the
commands, so ``iso-gateway --help`` and ``check-config`` stay quick and importing this module
starts nothing.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import orjson
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.cli_rows import batch_dict, exception_dict, saf_dict, txn_dict
from gateway.config import DEV_PAN_HMAC_KEY, Settings, load_settings, requested_log_format, unknown_environment
from gateway.tables import Column, render_table

if TYPE_CHECKING:
    from gateway.core.model import BatchSummary, ExceptionCase, SafItem, Txn
    from gateway.ports import OutboxStatus

__all__ = ["app", "main"]

#: Exit code for unusable settings, profile or files (as click uses for usage errors).
EXIT_CONFIG = 2

app = typer.Typer(
    name="iso-gateway",
    help="ISO 8583 gateway with refund controls.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks show locals: settings, card data
)
outbox_app = typer.Typer(help="The correction-event outbox.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")
exceptions_app = typer.Typer(
    help="Cases an operator must resolve: reversal advices applied over refunds or a completion."
)
app.add_typer(exceptions_app, name="exceptions")
saf_app = typer.Typer(help="The acquirer host's store-and-forward queue (reversals and advices).", no_args_is_help=True)
app.add_typer(saf_app, name="saf")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file with settings (the environment overrides it).",
        dir_okay=False,
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")]


@dataclass
class _Root:
    config: Path | None = None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"iso-gateway {version('iso-gateway')}")
        except PackageNotFoundError:
            typer.echo("iso-gateway (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: ConfigOption = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """ISO 8583 gateway with refund controls. Settings come from GATEWAY_* variables and --config."""
    ctx.obj = _Root(config)


# --- helpers --------------------------------------------------------------------------------------


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _out() -> Console:
    return Console(highlight=False)


def _fail(message: str) -> NoReturn:
    _err().print(f"[bold red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(EXIT_CONFIG)


def env_name(loc: tuple[str | int, ...]) -> str:
    """The environment variable of a settings location: ``("policy", "x")`` -> ``GATEWAY_POLICY__X``."""
    return "GATEWAY_" + "__".join(str(part).upper() for part in loc)


def _hide_secrets(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:********@{host}" if ":" in creds else text
    return text


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(setting, problem) per error: the environment variable (or, for an unknown key of the
    file, the key), what is wrong and the value given (secrets and URL passwords hidden)."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        dotted = ".".join(str(part) for part in loc) or "(settings)"
        if error["type"] == "extra_forbidden":
            problems.append((dotted, "unknown setting (see docs/configuration.md)"))
            continue
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        shown = ""
        if loc and loc[0] != "pan_hmac_key" and isinstance(given, str | int | float | bool):
            value = repr(_hide_secrets(str(given)))
            shown = "" if f"got {value}" in message else f" (got {value})"
        problems.append((env_name(loc), f"{message}{shown}"))
    return problems


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the setting, its environment variable, what is wrong and the value
    given (secrets and URL passwords hidden)."""
    lines = []
    for error, (setting, problem) in zip(exc.errors(include_url=False), validation_problems(exc), strict=True):
        dotted = ".".join(str(part) for part in error["loc"]) or "(settings)"
        lines.append(f"  {dotted}: {problem}" if setting == dotted else f"  {dotted} ({setting}): {problem}")
    return "invalid settings:\n" + "\n".join(lines)


class _SettingsProblems(Exception):
    """The settings cannot be read: (setting, problem) pairs, and the text other commands print."""

    def __init__(self, problems: list[tuple[str, str]], text: str) -> None:
        super().__init__(text)
        self.problems = problems
        self.text = text


def _read(ctx: typer.Context, config: Path | None) -> Settings:
    if config is None:
        root = ctx.find_root().obj
        config = root.config if isinstance(root, _Root) else None
    try:
        return load_settings(config)
    except FileNotFoundError as exc:
        raise _SettingsProblems([("--config", str(exc))], str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        problem = f"{config}: not valid TOML: {exc}"
        raise _SettingsProblems([("--config", problem)], problem) from None
    except ValidationError as exc:
        raise _SettingsProblems(validation_problems(exc), describe_validation_error(exc)) from None
    except SettingsError as exc:  # a value pydantic-settings could not even parse (a list that is no JSON)
        found = re.search(r'field "([a-z_]+)"', str(exc))
        setting = f"GATEWAY_{found.group(1).upper()}" if found else "GATEWAY_*"
        problem = "cannot be read: a list or a table is given as JSON, e.g. [\"TERM0001\"]"
        raise _SettingsProblems([(setting, problem)], f"{setting}: {problem}") from None


def _load(ctx: typer.Context, config: Path | None) -> Settings:
    try:
        return _read(ctx, config)
    except _SettingsProblems as exc:
        _fail(exc.text)


def flatten(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``{"a": {"b": 1}}`` -> ``(("a", "b"), 1)``, depth first, in field order."""
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode())


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def _age(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    span = f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    return f"{then.isoformat(timespec='seconds')} ({span} ago)"


# --- commands -------------------------------------------------------------------------------------


@app.command()
def serve(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run the gateway in the foreground until SIGTERM or SIGINT (then: stop accepting, finish
    in-flight requests, close the ledger, exit 0). A start-up failure, settings included, is one
    ``gateway.start_failed`` log line naming the setting, and exit code 2."""
    from gateway.app import serve as run

    try:
        settings = _read(ctx, config)
    except _SettingsProblems as exc:
        raise typer.Exit(_start_failed(exc.problems)) from None
    raise typer.Exit(run(settings))


def _start_failed(problems: list[tuple[str, str]]) -> int:
    """Log the settings' problems as ``serve`` logs any start-up failure: one line."""
    from gateway.logs import configure_logging, flush_logs, get_logger

    configure_logging("info", requested_log_format())
    setting, detail = problems[0]
    more = {"problems": [f"{s}: {d}" for s, d in problems]} if len(problems) > 1 else {}
    get_logger("gateway").error("gateway.start_failed", setting=setting, detail=detail, **more)
    flush_logs()
    return EXIT_CONFIG


@app.command("check-config")
def check_config(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Print the effective settings (secrets hidden), and check without starting anything what
    ``serve`` checks as it starts: the wire profile, certificate files, the ledger's place, the
    addresses it listens on and the MQTT broker it would use. Exit code 2 on any problem."""
    settings = _load(ctx, config)
    from gateway.startup import preflight

    found = asyncio.run(preflight(settings))
    if found.problems:
        for problem in found.problems:
            _err().print(f"[bold red]error:[/] {escape(problem.setting)}: {escape(problem.detail)}", markup=True)
        raise typer.Exit(EXIT_CONFIG)
    profile = found.profile
    assert profile is not None
    data = settings.redacted()
    profile_info = {
        "name": profile.name,
        "source": str(profile.source),
        "framing": profile.framing.header,
        "tpdu": profile.framing.tpdu,
        "dialect": profile.dialect,
        "fields": len(profile.fields),
    }
    for name in unknown_environment():
        _err().print(f"[yellow]warning:[/] {escape(name)} names no setting and is ignored", markup=True)
    if settings.pan_hmac_key is not None and settings.pan_hmac_key.get_secret_value() == DEV_PAN_HMAC_KEY:
        _err().print(
            "[yellow]warning:[/] GATEWAY_PAN_HMAC_KEY is the development key; set your own in production",
            markup=True,
        )
    if as_json:
        _json({"settings": data, "profile": profile_info, "checks": found.findings})
        return
    rows = [(env_name(loc), _show(value)) for loc, value in flatten(data)]
    width = max(len(name) for name, _ in rows)
    out = _out()
    out.print("[bold]effective settings[/] (secrets hidden; environment variable, value)", markup=True)
    for name, value in rows:
        out.print(f"{name:<{width}}  {value}", markup=False)
    out.print(
        f"profile [bold]{escape(profile.name)}[/]: ok ({profile.framing.header} framing"
        f"{', TPDU' if profile.framing.tpdu else ''}, dialect {profile.dialect}, "
        f"{len(profile.fields)} fields) from {escape(str(profile.source))}",
        markup=True,
    )
    for part in ("listen", "metrics", "tls", "upstream", "ledger", "mqtt"):
        if part in found.findings:
            out.print(f"{part}: ok ({found.findings[part]})", markup=False, soft_wrap=True)


def _require_ledger_file(settings: Settings) -> None:
    path = settings.sqlite_path()
    if path is not None and not path.exists():
        _fail(f"no ledger at {path}: the gateway has not run with these settings (GATEWAY_LEDGER_URL)")


async def _read_outbox(settings: Settings) -> OutboxStatus:
    from gateway.app import open_ledger

    async with open_ledger(settings) as ledger:
        return await ledger.status()


@outbox_app.command("status")
def outbox_status(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Pending correction events, the oldest one's age and the last publish error."""
    settings = _load(ctx, config)
    _require_ledger_file(settings)
    from gateway.app import StartupError

    try:
        status = asyncio.run(_read_outbox(settings))
    except StartupError as exc:
        _fail(str(exc))
    if as_json:
        _json(
            {
                "pending": status.pending,
                "oldest_pending_at": status.oldest_pending_at,
                "last_error": status.last_error,
                "last_error_at": status.last_error_at,
                "last_sent_at": status.last_sent_at,
            }
        )
        return
    now = datetime.now(UTC)
    table = Table(show_header=False, title="Outbox", title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("pending", str(status.pending))
    table.add_row("oldest pending", _age(status.oldest_pending_at, now))
    table.add_row("last sent", _age(status.last_sent_at, now))
    table.add_row("last error", status.last_error or "-")
    table.add_row("last error at", _age(status.last_error_at, now))
    _out().print(table)


async def _read_batches(
    settings: Settings, merchant: str | None, terminal: str | None, open_only: bool
) -> list[BatchSummary]:
    from gateway.app import open_ledger

    async with open_ledger(settings) as ledger:
        return await ledger.list_batches(merchant, terminal, open_only)




@app.command()
def batches(
    ctx: typer.Context,
    merchant: Annotated[str | None, typer.Option(help="Only this merchant (DE42).")] = None,
    terminal: Annotated[str | None, typer.Option(help="Only this terminal (DE41).")] = None,
    open_only: Annotated[bool, typer.Option("--open", help="Only open batches.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Batches with their ledger totals (amounts in minor units) and state."""
    settings = _load(ctx, config)
    _require_ledger_file(settings)
    from gateway.app import StartupError

    try:
        found = asyncio.run(_read_batches(settings, merchant, terminal, open_only))
    except StartupError as exc:
        _fail(str(exc))
    rows = [batch_dict(b) for b in found]
    if as_json:
        _json(rows)
        return
    if not rows:
        _out().print("no batches")
        return
    names = ("merchant", "terminal", "batch", "state", "opened", "closed", "debits", "credits", "cur")
    columns = [Column(name, right=name in ("debits", "credits")) for name in names]
    cells = [
        [
            row["merchant_id"],
            row["terminal_id"],
            row["batch_no"],
            f"{row['state']} ({row['result']})" if row["result"] else row["state"],
            _when(row["opened_at"]),
            _when(row["closed_at"]),
            f"{row['debit_count']} / {row['debit_amount']}",
            f"{row['credit_count']} / {row['credit_amount']}",
            row["currency"] or "-",
        ]
        for row in rows
    ]
    _print_table("Batches (amounts in minor units)", columns, cells, heading=2)




@app.command()
def transactions(
    ctx: typer.Context,
    unanswered: Annotated[
        bool, typer.Option("--unanswered", help="Only records whose answer is not known to have been written.")
    ] = False,
    older_than: Annotated[
        float,
        typer.Option(help="Only records at least this many seconds old (while the gateway runs, a record less "
                          "than a second old may still be on its way to its terminal)."),
    ] = 0.0,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Recorded requests not known to have been answered: the gateway committed them, but the
    connection was gone, or the process stopped, before their answer was written. Terminals reverse
    such requests (0400/0420), which the ledger matches as any other."""
    if not unanswered:
        _fail("only `transactions --unanswered` is implemented; see `iso-gateway batches` for totals")
    settings = _load(ctx, config)
    before = datetime.now(UTC) - timedelta(seconds=older_than)
    found: list[Txn] = _with_ledger(settings, lambda ledger: ledger.unanswered(before))
    rows = [txn_dict(txn) for txn in found]
    if as_json:
        _json(rows)
        return
    if not rows:
        _out().print("no unanswered records")
        return
    columns = [Column(name) for name in ("recorded", "merchant", "terminal", "kind", "stan", "rrn", "amount", "status")]
    cells = [
        [_when(row["created_at"]), row["merchant_id"], row["terminal_id"], row["kind"], row["stan"],
         row["rrn"] or "-", f"{row['amount']} {row['currency']}", row["status"]]
        for row in rows
    ]  # fmt: skip
    _print_table("Recorded, not known to be answered", columns, cells, heading=3)


def _print_table(title: str, columns: list[Column], cells: list[list[str]], *, heading: int) -> None:
    out = _out()
    width = out.width if out.is_terminal else None  # a pipe or a file: one line per row, however long
    for line in render_table(title, columns, cells, width=width, heading=heading):
        out.print(line, markup=False, highlight=False, soft_wrap=True)




def _with_ledger(settings: Settings, work: Any) -> Any:
    """Run ``work(ledger)`` (a coroutine function) on the ledger alone; a start failure ends with exit 2."""
    _require_ledger_file(settings)
    from gateway.app import StartupError, open_ledger

    async def run() -> Any:
        async with open_ledger(settings) as ledger:
            return await work(ledger)

    try:
        return asyncio.run(run())
    except StartupError as exc:
        _fail(str(exc))


@exceptions_app.callback(invoke_without_command=True)
def exceptions(
    ctx: typer.Context,
    include_resolved: Annotated[bool, typer.Option("--all", help="Resolved cases too.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Open cases (or every case with --all), oldest first. Resolve one with `exceptions resolve ID`."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _load(ctx, config)
    cases: list[ExceptionCase] = _with_ledger(
        settings, lambda ledger: ledger.list_exceptions(include_resolved=include_resolved)
    )
    rows = [exception_dict(case) for case in cases]
    if as_json:
        _json(rows)
        return
    if not rows:
        _out().print("no open cases" if not include_resolved else "no cases")
        return
    columns = [Column(name) for name in ("id", "opened", "merchant", "terminal", "original", "what happened", "status")]
    cells = [
        [str(row["id"]), _when(row["created_at"]), row["merchant_id"], row["terminal_id"], row["original_rrn"] or "-",
         row["summary"],
         row["status"] if row["status"] == "open" else f"resolved by {row['resolved_by']}: {row['resolution']}"]
        for row in rows
    ]  # fmt: skip
    _print_table("Exceptions (reversal advices applied over refunds or a completion)", columns, cells, heading=2)


@exceptions_app.command("resolve")
def resolve_exception(
    ctx: typer.Context,
    case_id: Annotated[int, typer.Argument(metavar="ID", help="The case's id (see `iso-gateway exceptions`).")],
    by: Annotated[str, typer.Option("--by", help="Who resolved it (kept in the ledger).")],
    note: Annotated[str, typer.Option("--note", help="How it was resolved (kept in the ledger).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mark an open case resolved, with who and why."""
    if not by.strip() or not note.strip():
        _fail("--by and --note must not be empty: they are the record of who resolved the case and how")
    settings = _load(ctx, config)
    at = datetime.now(UTC)
    case: ExceptionCase | None = _with_ledger(
        settings, lambda ledger: ledger.resolve_exception(case_id, by=by.strip(), note=note.strip(), at=at)
    )
    if case is None:
        _fail(f"no open case {case_id} (see `iso-gateway exceptions --all`)")
    if as_json:
        _json(exception_dict(case))
        return
    _out().print(f"case {case.id} resolved by {escape(by.strip())}")




@saf_app.command("status")
def saf_status(
    ctx: typer.Context,
    include_finished: Annotated[
        bool, typer.Option("--all", help="Acknowledged and failed entries too (the last --limit).")
    ] = False,
    limit: Annotated[int, typer.Option(help="At most this many entries, oldest first.")] = 1000,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """What waits to be sent to the acquirer host, in the order it is sent: reversals of requests it may
    have approved (0420, repeated as 0421 until answered) and advices of stand-in approvals (0220)."""
    settings = _load(ctx, config)
    items: list[SafItem] = _with_ledger(
        settings, lambda ledger: ledger.saf_items(queued_only=not include_finished, limit=limit)
    )
    rows = [saf_dict(item) for item in items]
    if as_json:
        _json(rows)
        return
    if not rows:
        _out().print("nothing queued for the host" if not include_finished else "no entries")
        return
    columns = [Column(name) for name in ("id", "queued", "action", "terminal", "stan", "rrn", "amount", "attempts",
                                         "state")]  # fmt: skip
    cells = [
        [str(row["id"]), _when(row["queued_at"]), row["action"], row["record"]["terminal_id"], row["record"]["stan"],
         row["record"]["rrn"] or "-", f"{row['amount'] or row['record']['amount']} {row['record']['currency']}",
         str(row["attempts"]),
         row["state"] if row["host_response_code"] is None else f"{row['state']} ({row['host_response_code']})"]
        for row in rows
    ]  # fmt: skip
    _print_table("Store-and-forward queue (sent oldest first)", columns, cells, heading=2)


def main() -> None:
    """Console-script entry point (``iso-gateway``)."""
    app()
