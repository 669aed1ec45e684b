"""The MQTT 3.1.1 packets of the relay's publisher, byte for byte (OASIS MQTT 3.1.1, sections 2 and 3)."""

from __future__ import annotations

import pytest

from gateway.adapters.mqtt_publisher import connect_packet, publish_packet


def test_connect_without_credentials_is_a_clean_session_with_its_keepalive() -> None:
    assert connect_packet("gw-1", username=None, password=None, keepalive=30) == (
        b"\x10\x10"  # CONNECT, remaining length 16
        b"\x00\x04MQTT\x04"  # protocol name, level 4 (3.1.1)
        b"\x02"  # clean session
        b"\x00\x1e"  # keep-alive 30 s
        b"\x00\x04gw-1"  # client identifier
    )


def test_connect_with_credentials_sets_both_flags_and_a_password_alone_gets_an_empty_user() -> None:
    packet = connect_packet("gw", username="acme", password="s3cr/t", keepalive=0)
    assert packet[9] == 0x80 | 0x40 | 0x02
    assert packet.endswith(b"\x00\x02gw\x00\x04acme\x00\x06s3cr/t")
    alone = connect_packet("gw", username=None, password="p", keepalive=0)
    assert alone[9] == 0x80 | 0x40 | 0x02
    assert alone.endswith(b"\x00\x02gw\x00\x00\x00\x01p")


def test_publish_is_qos_1_with_its_packet_id_and_a_multi_byte_length_when_needed() -> None:
    assert publish_packet("a/b", 10, b"xyz") == b"\x32\x0a\x00\x03a/b\x00\x0axyz"
    big = publish_packet("t", 65535, b"x" * 200)
    # remaining length 2 + 1 + 2 + 200 = 205 = 0xCD -> 0xCD 0x01 (7 bits at a time, low first)
    assert big[:3] == b"\x32\xcd\x01"
    assert big[3:8] == b"\x00\x01t\xff\xff"
    assert len(big) == 3 + 205


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "a\x00b"])
def test_topics_that_cannot_be_published_to_are_refused(topic: str) -> None:
    with pytest.raises(ValueError, match="not a topic"):
        publish_packet(topic, 1, b"")
