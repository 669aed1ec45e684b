"""Correction events from the gateway itself: SQLite outbox, real broker, outages and crashes (issue 4)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import jsonschema
from brokers import MosquittoBroker, Subscriber
from harness import CARD, OTHER_CARD, GatewayProcess, IsoClient, gateway_settings, running_gateway

DOCS = Path(__file__).resolve().parents[2] / "docs" / "events"
FULL_PAN = re.compile(rb"\d{13,19}")


def schema_for(event_type: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((DOCS / f"{event_type}.schema.json").read_text())
    return loaded


async def test_a_scenario_publishes_its_corrections_on_the_documented_topics_and_purchases_nothing(
    tmp_path: Path, mqtt_broker_url: str, topic_prefix: str
) -> None:
    settings = gateway_settings(tmp_path, mqtt_broker_url, mqtt_topic_prefix=topic_prefix)
    async with Subscriber(mqtt_broker_url, f"{topic_prefix}/#") as sub, running_gateway(settings) as app:
        pos = await IsoClient.connect(app.port)
        sale = await pos.sale(10_000)  # publishes nothing
        await pos.preauth(3_000)  # publishes nothing
        await pos.refund(sale[37], 6_000)  # refund/approved
        await pos.refund(sale[37], 5_000)  # refund/declined 64
        await pos.refund(sale[37], 100, pan=OTHER_CARD)  # refund/declined 14
        coffee = await pos.sale(450)
        await pos.void(coffee[37], 450)  # void/approved
        await pos.void(coffee[37], 450)  # void/declined
        tea = await pos.sale(300)
        await pos.reverse(tea, mti="0420")  # reversal/applied
        await pos.reverse(tea, mti="0420")  # duplicate/replayed (second reversal of the same original)
        ghost = {3: "000000", **pos.base(100)}
        await pos.reverse(ghost, mti="0400")  # reversal/unmatched
        await pos.close()
        received = await sub.collect(8, timeout=10)
        await asyncio.sleep(0.3)  # nothing else may follow
    topics = [message.topic.removeprefix(f"{topic_prefix}/MERCHANT0000001/TERM0001/") for message in sub.received]
    assert topics == [
        "refund/approved",
        "refund/declined",
        "refund/declined",
        "void/approved",
        "void/declined",
        "reversal/applied",
        "duplicate/replayed",
        "reversal/unmatched",
    ]
    ids = set()
    for message in received:
        document = json.loads(message.payload)
        jsonschema.validate(document, schema_for(document["type"]), cls=jsonschema.Draft202012Validator)
        ids.add(document["id"])
        assert not FULL_PAN.search(message.payload), message.payload
        assert CARD.encode() not in message.payload
    assert len(ids) == len(received)
    approved = json.loads(received[0].payload)["data"]
    assert approved["balance"] == {"original_amount": 10_000, "refunded": 6_000, "reversed": 0,
                                   "refundable": 4_000, "status": "partially_refunded"}
    assert approved["request"]["pan"] == "476173******0119"
    assert json.loads(received[1].payload)["data"]["reason"] == "exceeds_refundable"


async def test_refunds_are_approved_during_a_broker_outage_and_their_events_delivered_after(
    tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    settings = gateway_settings(tmp_path, mosquitto.url, mqtt_topic_prefix=topic_prefix)
    consumer = f"backoffice-{tmp_path.name}"[:23]
    async with running_gateway(settings) as app:
        assert app.ledger is not None
        async with Subscriber(mosquitto.url, f"{topic_prefix}/#", client_id=consumer, clean_session=False):
            pass  # the back office's persistent session exists before the outage
        pos = await IsoClient.connect(app.port)
        sale = await pos.sale(10_000)
        mosquitto.stop()
        for _ in range(5):
            answer = await asyncio.wait_for(pos.refund(sale[37], 1_000), 2)
            assert answer[39] == "00"
        status = await app.ledger.status()
        assert status.pending == 5
        mosquitto.start()
        async with Subscriber(mosquitto.url, f"{topic_prefix}/#", client_id=consumer, clean_session=False) as sub:
            received = await sub.collect(5, timeout=15)
        ids = {json.loads(m.payload)["id"] for m in received}
        assert len(ids) == 5
        for _ in range(100):
            if (await app.ledger.status()).pending == 0:
                break
            await asyncio.sleep(0.05)
        assert (await app.ledger.status()).pending == 0
        await pos.close()


async def test_events_still_pending_when_the_gateway_is_killed_are_delivered_after_restart(
    tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    proc = GatewayProcess(tmp_path, mosquitto.url)
    proc.env["GATEWAY_MQTT_TOPIC_PREFIX"] = topic_prefix
    consumer = f"crash-{tmp_path.name}"[:23]
    async with Subscriber(mosquitto.url, f"{topic_prefix}/#", client_id=consumer, clean_session=False):
        pass
    try:
        proc.start()
        pos = await IsoClient.connect(proc.port)
        sale = await pos.sale(5_000)
        mosquitto.stop()  # events can only pile up in the outbox now
        for _ in range(3):
            assert (await pos.refund(sale[37], 500))[39] == "00"
        proc.signal(signal.SIGKILL)
        await pos.close()
        mosquitto.start()
        proc.start()
        async with Subscriber(mosquitto.url, f"{topic_prefix}/#", client_id=consumer, clean_session=False) as sub:
            received = await sub.collect(3, timeout=15)
        assert {json.loads(m.payload)["type"] for m in received} == {"pos.refund.approved"}
        assert len({json.loads(m.payload)["id"] for m in received}) == 3
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.kill()  # never leave a gateway behind, whatever failed
