"""Keyed hashing of card data: the HMAC built from copied SHA-256 states is the standard HMAC-SHA256."""

from __future__ import annotations

import hmac

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.core.cards import keyed_sha256, pan_digest


@given(st.binary(max_size=200), st.binary(max_size=200))
@example(b"k" * 64, b"one block")  # a key of exactly one block is padded by nothing
@example(b"k" * 65, b"one block")  # a longer one is hashed first
@example(b"", b"")
def test_the_keyed_hash_is_hmac_sha256(key: bytes, data: bytes) -> None:
    assert keyed_sha256(key, data) == hmac.digest(key, data, "sha256")
    assert keyed_sha256(key, data) == hmac.digest(key, data, "sha256")  # the prototype is not consumed


@given(st.lists(st.binary(min_size=1, max_size=80), min_size=2, max_size=20, unique=True))
def test_keys_do_not_leak_into_each_other(keys: list[bytes]) -> None:
    pan = "4761739001010010"
    digests = [pan_digest(key, pan) for key in keys]
    assert digests == [hmac.digest(key, pan.encode(), "sha256").hex() for key in keys]
