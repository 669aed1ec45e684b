"""The embedded amqtt broker: real TCP clients, a clear error for a taken port, clean stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import aiomqtt
import pytest
from brokers import Subscriber, ThreadedEmbeddedBroker, collect_messages, port_accepts

from gateway.adapters.broker import BrokerError, EmbeddedBroker


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    embedded = EmbeddedBroker("127.0.0.1", 0)
    await embedded.start()
    try:
        yield embedded
    finally:
        await embedded.stop()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_it_delivers_qos_1_messages_between_clients(broker: EmbeddedBroker) -> None:
    async with Subscriber(broker.url, "shop/#") as subscriber:
        async with aiomqtt.Client(broker.host, broker.port, identifier="publisher") as publisher:
            await publisher.publish("shop/1/refund", b"first", qos=1)
            await publisher.publish("shop/2/void", b"second", qos=1)
        received = await subscriber.collect(2, timeout=5)

    assert [(r.topic, r.payload, r.qos) for r in received] == [
        ("shop/1/refund", b"first", 1),
        ("shop/2/void", b"second", 1),
    ]


async def test_collect_messages_returns_what_arrives_after_its_subscription_is_ready(
    broker: EmbeddedBroker,
) -> None:
    ready = asyncio.Event()
    collecting = asyncio.create_task(collect_messages(broker.url, "a/+", 2, timeout=5, ready=ready))
    async with asyncio.timeout(5):
        await ready.wait()
    async with aiomqtt.Client(broker.host, broker.port) as publisher:
        await publisher.publish("a/1", b"x", qos=1)
        await publisher.publish("b/1", b"not subscribed", qos=1)
        await publisher.publish("a/2", b"y", qos=1)

    assert await collecting == [("a/1", b"x"), ("a/2", b"y")]


async def test_with_port_0_the_url_names_the_port_the_system_chose(broker: EmbeddedBroker) -> None:
    assert broker.port != 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert port_accepts("127.0.0.1", broker.port)


async def test_a_taken_port_gives_a_clear_error_naming_the_settings(taken_port: int) -> None:
    embedded = EmbeddedBroker("127.0.0.1", taken_port)

    with pytest.raises(BrokerError) as caught:
        await embedded.start()

    assert str(caught.value) == (
        f"cannot listen on 127.0.0.1:{taken_port}: address already in use; "
        "set GATEWAY_MQTT__EMBEDDED_LISTEN or GATEWAY_MQTT_URL"
    )
    assert not embedded.running


async def test_an_address_that_is_not_local_gives_a_clear_error() -> None:
    embedded = EmbeddedBroker("192.0.2.1", 0)  # TEST-NET-1: never assigned to this host

    with pytest.raises(BrokerError, match=r"^cannot listen on 192\.0\.2\.1:0: cannot assign requested address"):
        await embedded.start()


async def test_stopping_disconnects_clients_and_frees_the_port_for_a_new_broker(broker: EmbeddedBroker) -> None:
    port = broker.port
    async with aiomqtt.Client(broker.host, port) as client:
        await broker.stop()
        with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
            await asyncio.wait_for(anext(aiter(client.messages)), 5)

    assert not port_accepts("127.0.0.1", port)
    again = EmbeddedBroker("127.0.0.1", port)
    await again.start()
    try:
        async with Subscriber(again.url, "t") as subscriber:
            async with aiomqtt.Client("127.0.0.1", port) as publisher:
                await publisher.publish("t", b"after restart", qos=1)
            assert [r.payload for r in await subscriber.collect(1, timeout=5)] == [b"after restart"]
    finally:
        await again.stop()


async def test_starting_twice_is_an_error_and_stopping_twice_is_harmless(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="already running"):
        await broker.start()

    await broker.stop()
    await broker.stop()
    assert not broker.running


async def test_a_client_session_leaves_nothing_in_the_logs_at_info_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with EmbeddedBroker("127.0.0.1", 0) as embedded, Subscriber(embedded.url, "q") as subscriber:
        async with aiomqtt.Client("127.0.0.1", embedded.port) as publisher:
            await publisher.publish("q", b"quiet", qos=1)
        await subscriber.collect(1, timeout=5)

    assert [r for r in caplog.records if r.name.startswith(("amqtt", "transitions"))] == []


def test_the_threaded_fallback_serves_sync_fixtures_and_restarts_on_the_same_port() -> None:
    with ThreadedEmbeddedBroker() as embedded:
        port = embedded.port
        assert port_accepts("127.0.0.1", port)
        embedded.restart()
        assert embedded.port == port
        assert port_accepts("127.0.0.1", port)
    assert not port_accepts("127.0.0.1", port)
