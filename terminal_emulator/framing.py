"""Length-prefixed framing, sans-I/O: ``frame()`` builds bytes, ``FrameDecoder`` splits a stream."""

from __future__ import annotations

from .profile import Framing

__all__ = ["FrameDecoder", "FramingError", "frame"]


class FramingError(ValueError):
    """The byte stream does not follow the profile's framing (costs the connection)."""


def frame(payload: bytes, framing: Framing, tpdu: bytes | None = None) -> bytes:
    """Prefix ``payload`` with the length header (and the TPDU when the profile has one)."""
    body = payload
    if framing.tpdu is not None:
        body = (tpdu if tpdu is not None else framing.tpdu) + payload
    length = len(body) + (framing.header_size if framing.length_includes_header else 0)
    return encode_length(length, framing) + body


def encode_length(length: int, framing: Framing) -> bytes:
    size = framing.header_size
    if framing.binary_header:
        if length >= 1 << (8 * size):
            raise FramingError(f"frame of {length} bytes does not fit a {size}-byte length header")
        return length.to_bytes(size, "big")
    if length >= 10**size:
        raise FramingError(f"frame of {length} bytes does not fit {size} length digits")
    return str(length).zfill(size).encode("ascii")


class FrameDecoder:
    """Feed received bytes, get complete frames back (TPDU removed; see ``last_tpdu``)."""

    __slots__ = ("_buffer", "_framing", "last_tpdu")

    def __init__(self, framing: Framing) -> None:
        self._framing = framing
        self._buffer = bytearray()
        self.last_tpdu: bytes | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        framing = self._framing
        size = framing.header_size
        buf = self._buffer
        start = 0
        end = len(buf)
        while end - start >= size:
            raw = bytes(buf[start : start + size])
            if framing.binary_header:
                length = int.from_bytes(raw, "big")
            else:
                if not raw.isdigit():
                    raise FramingError("length header is not ASCII digits")
                length = int(raw)
            if framing.length_includes_header:
                length -= size
            if length < 0 or length > framing.max_frame_bytes:
                raise FramingError(f"frame length {length} outside 0..{framing.max_frame_bytes}")
            if end - start - size < length:
                break
            body = bytes(buf[start + size : start + size + length])
            start += size + length
            if framing.tpdu is not None:
                if len(body) < 5:
                    raise FramingError("frame shorter than its TPDU")
                self.last_tpdu, body = body[:5], body[5:]
            frames.append(body)
        if start:
            del buf[:start]
        return frames
