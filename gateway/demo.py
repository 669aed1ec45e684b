"""``make demo``: the gateway on embedded defaults, a terminal session through it, and its events.

Starts the gateway with a SQLite ledger in a temporary folder and the embedded MQTT broker on a free
port, subscribes to the correction events, plays a cashier's day with the terminal emulator (sales,
a refund, an over-refund, a refund to the wrong card, a void, a second void, a lost response and the
terminal's automatic reversal, a pre-auth completion, settlement) and prints every exchange and event.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tempfile
from pathlib import Path

import aiomqtt
from rich.console import Console
from rich.table import Table

from gateway.app import GatewayApp
from gateway.config import load_settings
from gateway.logs import configure_logging
from terminal_emulator import Exchange, ResponseTimeout, Terminal

OTHER_CARD = "4111111111111111"


async def _collect(url: str, into: list[tuple[str, dict[str, object]]], ready: asyncio.Event) -> None:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    async with aiomqtt.Client(host, int(port), identifier="iso-gateway-demo") as client:
        await client.subscribe("pos/corrections/#", qos=1)
        ready.set()
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                into.append((str(message.topic), json.loads(payload)))


async def run_demo(console: Console) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="iso-gateway-demo-"))
    settings = load_settings(
        listen="127.0.0.1:0",
        ledger_url=f"sqlite:///{workdir / 'ledger.db'}",
        mqtt_url="embedded",
        mqtt={"embedded_listen": "127.0.0.1:0"},
        instance_id="demo",
        pan_hmac_key="demo-key-not-for-production",
    )
    gateway_logs = io.StringIO()
    configure_logging("info", "json", stream=gateway_logs)
    app = GatewayApp(settings)
    await app.start()
    console.print(
        f"[bold]gateway[/] listening on 127.0.0.1:{app.port}, ledger {workdir / 'ledger.db'}, broker {app.mqtt_url}"
    )
    events: list[tuple[str, dict[str, object]]] = []
    ready = asyncio.Event()
    assert app.mqtt_url is not None
    listener = asyncio.create_task(_collect(app.mqtt_url, events, ready))
    await asyncio.wait_for(ready.wait(), 10)

    table = Table(title="terminal TERM0001 at MERCHANT0000001")
    for column in ("step", "request", "answer", "DE39", "RRN", "approval"):
        table.add_column(column)

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

    await asyncio.sleep(0.5)  # let the relay publish the last events
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await listener
    await app.stop()

    events_table = Table(title=f"correction events received ({len(events)})")
    for column in ("type", "topic (after pos/corrections/)", "DE39", "reason", "refunded / refundable"):
        events_table.add_column(column)
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
    console.print(
        f"gateway logs (JSON lines): {len(gateway_logs.getvalue().splitlines())} lines; ledger kept in {workdir}"
    )
    return 0


def main() -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    raise SystemExit(asyncio.run(run_demo(console)))


if __name__ == "__main__":
    main()
