"""``make demo``: the gateway on embedded defaults, a terminal session through it, and its events.

Starts the gateway with a SQLite ledger in the demo's folder (``demo-output/`` by default, ``--dir``
to choose) and the embedded MQTT broker on a free port, subscribes to the correction events, plays a
cashier's day with the terminal emulator (sales, a refund, an over-refund, a refund to the wrong
card, a void, a second void, a lost response and the terminal's automatic reversal, a pre-auth
completion, settlement) and prints every exchange and event. The folder keeps what the run left:
``gateway.log`` (the gateway's JSON log lines), ``events.jsonl`` (the events received) and the
ledger, each replaced by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Sized
from pathlib import Path

import aiomqtt
from rich.console import Console
from rich.table import Table

from gateway.app import GatewayApp
from gateway.config import Settings, load_settings
from gateway.logs import configure_logging, flush_logs, reset_logging
from terminal_emulator import Exchange, ResponseTimeout, Terminal

OTHER_CARD = "4111111111111111"
DEFAULT_FOLDER = Path("demo-output")
#: what a run writes into its folder (removed first, so that a run never meets the last one's ledger)
RUN_FILES = ("gateway.log", "events.jsonl", "ledger.db", "ledger.db-wal", "ledger.db-shm")
#: log lines shown at the end
SHOWN_LINES = 3


async def _collect(url: str, into: list[tuple[str, dict[str, object]]], ready: asyncio.Event) -> None:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    # not "iso-gateway-demo", the relay's own client id: a broker disconnects one of two clients
    # with one id, and amqtt then sent the subscription's messages to the relay (no events shown)
    async with aiomqtt.Client(host, int(port), identifier="iso-gateway-demo-watcher") as client:
        await client.subscribe("pos/corrections/#", qos=1)
        ready.set()
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                into.append((str(message.topic), json.loads(payload)))


def prepare_folder(folder: Path) -> None:
    """The demo's folder, emptied of what the last run wrote there (and of nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)


async def run_demo(console: Console, folder: Path = DEFAULT_FOLDER) -> int:
    prepare_folder(folder)
    ledger = folder / "ledger.db"
    log_path = folder / "gateway.log"
    settings = load_settings(
        listen="127.0.0.1:0",
        ledger_url=f"sqlite:///{ledger.resolve()}",
        mqtt_url="embedded",
        mqtt={"embedded_listen": "127.0.0.1:0"},
        instance_id="demo",
        pan_hmac_key="demo-key-not-for-production",
    )
    with log_path.open("w", encoding="utf-8") as log_file:
        configure_logging("info", "json", stream=log_file)
        try:
            events = await _play(console, settings, ledger)
        finally:
            flush_logs()
            reset_logging()
    with (folder / "events.jsonl").open("w", encoding="utf-8") as out:
        for topic, event in events:
            out.write(json.dumps({"topic": topic, "event": event}) + "\n")
    _show_events(console, events)
    _show_logs(console, folder, log_path, ledger)
    return 0


async def _play(console: Console, settings: Settings, ledger: Path) -> list[tuple[str, dict[str, object]]]:
    app = GatewayApp(settings)
    await app.start()
    console.print(f"[bold]gateway[/] listening on 127.0.0.1:{app.port}, ledger {ledger}, broker {app.mqtt_url}")
    events: list[tuple[str, dict[str, object]]] = []
    ready = asyncio.Event()
    assert app.mqtt_url is not None
    listener = asyncio.create_task(_collect(app.mqtt_url, events, ready))
    await asyncio.wait_for(ready.wait(), 10)

    table = Table(title="terminal TERM0001 at MERCHANT0000001")
    for column in ("step", "request", "answer", "DE39", "RRN", "approval"):
        table.add_column(column, overflow="fold")  # a narrow terminal wraps a value, never cuts it

    def show(step: str, exchange: Exchange) -> None:
        response = exchange.response
        table.add_row(
            step,
            exchange.request.mti,
            response.mti if response else "-",
            exchange.response_code or "-",
            exchange.rrn or "",
            exchange.approval_code or "",
        )

    async with Terminal("127.0.0.1", app.port, timeout=1.0) as pos:
        show("echo", await pos.echo())
        sale = await pos.sale(10_000)
        show("sale 100.00", sale)
        assert sale.rrn is not None
        show("refund 60.00 of it", await pos.refund(sale.rrn, amount=6_000))
        show("refund 50.00 more (over-refund)", await pos.refund(sale.rrn, amount=5_000))
        show("refund 10.00 to another card", await pos.refund(sale.rrn, amount=1_000, pan=OTHER_CARD))
        coffee = await pos.sale(450)
        show("sale 4.50", coffee)
        assert coffee.rrn is not None
        show("void it", await pos.void(coffee.rrn))
        show("void it again", await pos.void(coffee.rrn))
        pos.lose_next_response()
        with contextlib.suppress(ResponseTimeout):
            await pos.sale(2_500)
        table.add_row("sale 25.00, answer lost", "0200", "-", "timeout", "", "")
        preauth = await pos.preauth(8_000)  # the terminal sends its reversal of the lost sale first
        show("pre-auth 80.00 (after auto reversal)", preauth)
        assert preauth.rrn is not None
        show("complete it at 90.00", await pos.complete(preauth.rrn, amount=9_000))
        show("settle", await pos.settle())
    console.print(table)

    await _all_events_received(app, events)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await listener
    await app.stop()
    return events


async def _all_events_received(app: GatewayApp, events: Sized, limit_s: float = 15) -> None:
    """Wait until the outbox is empty and every event the broker acknowledged reached the subscriber
    (at most ``limit_s``: on a very busy machine the table then shows what came)."""
    assert app.ledger is not None and app.relay is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            while True:  # the relay and the subscriber signal nothing: look every 50 ms
                if not (await app.ledger.status()).pending and len(events) >= app.relay.stats.published:
                    return
                await asyncio.sleep(0.05)


def _show_events(console: Console, events: list[tuple[str, dict[str, object]]]) -> None:
    events_table = Table(title=f"correction events received ({len(events)})")
    for column in ("type", "topic (after pos/corrections/)", "DE39", "reason", "refunded / refundable"):
        events_table.add_column(column, overflow="fold")
    for topic, event in events:
        data = event["data"]
        assert isinstance(data, dict)
        balance = data.get("balance") or {}
        events_table.add_row(
            str(event["type"]),
            topic.removeprefix("pos/corrections/"),
            str(data.get("response_code")),
            str(data.get("reason") or ""),
            f"{balance.get('refunded')} / {balance.get('refundable')}" if balance else "",
        )
    console.print(events_table)


def _show_logs(console: Console, folder: Path, log_path: Path, ledger: Path) -> None:
    """Where the run's files are, and a few of the gateway's log lines: its refusals, which is what
    an operator looks for first."""
    lines = log_path.read_text(encoding="utf-8").splitlines()
    refusals = [line for line in lines if '"event":"message.processed"' in line and '"reason":null' not in line]
    console.print(
        f"[bold]gateway log[/]: {log_path} ({len(lines)} JSON lines); events: {folder / 'events.jsonl'}; "
        f"ledger: {ledger}",
        soft_wrap=True,
    )
    shown = f"the first {SHOWN_LINES} of its" if len(refusals) > SHOWN_LINES else "its"
    console.print(f"{shown} {len(refusals)} refusals:", soft_wrap=True)
    for line in refusals[:SHOWN_LINES]:
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"all of them: jq -c 'select(.reason != null)' {log_path}; its batches: "
        f"GATEWAY_LEDGER_URL=sqlite:///{ledger} .venv/bin/iso-gateway batches",
        markup=False,
        soft_wrap=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__.splitlines()[0])
    where = "folder for the run's log, events and ledger (default %(default)s)"
    parser.add_argument("--dir", type=Path, default=DEFAULT_FOLDER, help=where)
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    raise SystemExit(asyncio.run(run_demo(console, args.dir)))


if __name__ == "__main__":
    main()
