"""Message framing on a TCP stream, sans-I/O (in the style of h11).

A frame on the wire is ``length header | [TPDU] | message``. :class:`FrameBuffer` takes bytes as they
arrive, in chunks of any size, and hands out every complete :class:`Frame`; :func:`encode_frame`
builds the bytes to send. Nothing here reads a socket or a clock.

The length header is 2 or 4 bytes, big-endian binary (``2b``, ``4b``) or ASCII decimal digits
(``2a``, ``4a``), and counts what follows it, or itself too when ``length_includes_header`` is set.
The optional TPDU is 5 bytes: ``0x60``, a 2-byte destination and a 2-byte source address; a reply
swaps the two addresses (:func:`reply_tpdu`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.protocol.profile import Framing

__all__ = ["TPDU_ID", "TPDU_SIZE", "Frame", "FrameBuffer", "FramingError", "encode_frame", "reply_tpdu"]

#: First byte of a TPDU (transport protocol data unit).
TPDU_ID = 0x60
#: A TPDU is the id byte, a 2-byte destination and a 2-byte source address.
TPDU_SIZE = 5


class FramingError(Exception):
    """The byte stream cannot be framed any more: the connection has to be closed.

    The message says what was wrong (a length, never the bytes). ``frames`` holds the complete frames
    that preceded the fault in the same :meth:`FrameBuffer.feed` call, so that none is lost.
    """

    def __init__(self, reason: str, frames: list[Frame] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frames: list[Frame] = frames if frames is not None else []


@dataclass(slots=True, repr=False)
class Frame:
    """One framed message: ``payload`` is the ISO 8583 message without length header and TPDU.

    Not a frozen dataclass, though nothing changes it: one is made per frame, and a frozen one costs
    about 0.4 µs more to make (its ``__init__`` goes through ``object.__setattr__``).
    """

    payload: bytes
    tpdu: bytes | None = None

    def __repr__(self) -> str:
        # The payload may hold card data: show its size only.
        tpdu = self.tpdu.hex() if self.tpdu is not None else None
        return f"Frame(<{len(self.payload)} bytes>, tpdu={tpdu!r})"


#: The largest length value each header kind can express.
_HEADER_CAPACITY: dict[str, int] = {"2b": 0xFFFF, "4b": 0xFFFF_FFFF, "2a": 99, "4a": 9999}


class FrameBuffer:
    """Accumulates received bytes and cuts them into frames.

    ``feed`` survives any chunking: a header or a TPDU split across calls is fine. A header that
    announces more than ``max_frame_bytes`` raises :class:`FramingError` as soon as the header is
    complete, before its body is buffered. After a FramingError the buffer stays broken.
    """

    __slots__ = ("_adjust", "_ascii", "_broken", "_buf", "_hsize", "_max_body", "_min_body", "_tpdu")

    def __init__(self, framing: Framing) -> None:
        self._hsize = framing.header_size
        self._ascii = framing.header[1] == "a"
        self._adjust = self._hsize if framing.length_includes_header else 0
        self._tpdu = framing.tpdu
        self._max_body = framing.max_frame_bytes
        self._min_body = TPDU_SIZE + 1 if framing.tpdu else 1
        self._buf = bytearray()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def has_frame(self) -> bool:
        """Whether ``feed(b"")`` would give a frame, or raise: a whole header and the body it announces."""
        if self._broken is not None or len(self._buf) < self._hsize:
            return False
        try:
            body = self._body_length(self._buf[: self._hsize])
        except FramingError:
            return True
        return self._hsize + body <= len(self._buf)

    def feed(self, data: bytes, limit: int | None = None) -> list[Frame]:
        """Add received bytes; return the frames complete so far, in order (often none), at most
        ``limit`` of them: the others stay buffered for a later call (``feed(b"", limit)``)."""
        if self._broken is not None:
            raise FramingError(f"the stream is unusable after an earlier error ({self._broken})")
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        hsize = self._hsize
        end = len(buf)
        pos = 0
        try:
            while end - pos >= hsize and (limit is None or len(frames) < limit):
                body_start = pos + hsize
                body = self._body_length(buf[pos:body_start])
                body_end = body_start + body
                if body_end > end:
                    break
                if self._tpdu:
                    if buf[body_start] != TPDU_ID:
                        raise FramingError(f"bad TPDU id 0x{buf[body_start]:02X} (expected 0x{TPDU_ID:02X})")
                    payload_start = body_start + TPDU_SIZE
                    frames.append(Frame(bytes(buf[payload_start:body_end]), bytes(buf[body_start:payload_start])))
                else:
                    frames.append(Frame(bytes(buf[body_start:body_end])))
                pos = body_end
        except FramingError as exc:
            self._broken = exc.reason
            del buf[:]
            exc.frames = frames
            raise
        if pos:
            # Deleting a prefix of a bytearray is cheap in CPython (the start pointer moves).
            del buf[:pos]
        return frames

    def _body_length(self, header: bytearray) -> int:
        """Bytes that follow the header for this frame, checked against the limits."""
        if self._ascii:
            if not header.isdigit():
                raise FramingError(f"length header is not {self._hsize} ASCII digits")
            announced = int(header)
        else:
            announced = int.from_bytes(header, "big")
        body = announced - self._adjust
        if body > self._max_body:
            raise FramingError(f"frame of {body} bytes announced, more than the {self._max_body} allowed")
        if body < self._min_body:
            if announced == 0:
                raise FramingError("zero length frame")
            what = "TPDU and message" if self._tpdu else "message"
            raise FramingError(f"length {announced} leaves no room for a {what}")
        return body


def encode_frame(framing: Framing, payload: bytes, tpdu: bytes | None = None) -> bytes:
    """The bytes to send for one message: length header, TPDU (when the framing has one), payload."""
    if not payload:
        raise FramingError("cannot frame an empty message")
    if framing.tpdu:
        if tpdu is None:
            raise FramingError("this framing needs a TPDU")
        _check_tpdu(tpdu)
        body = len(tpdu) + len(payload)
    else:
        if tpdu is not None:
            raise FramingError("this framing has no TPDU")
        body = len(payload)
    if body > framing.max_frame_bytes:
        raise FramingError(f"frame of {body} bytes is more than the {framing.max_frame_bytes} allowed")
    size = framing.header_size
    announced = body + size if framing.length_includes_header else body
    if announced > _HEADER_CAPACITY[framing.header]:
        raise FramingError(f"length {announced} does not fit a {framing.header!r} header")
    header = announced.to_bytes(size, "big") if framing.header[1] == "b" else b"%0*d" % (size, announced)
    if tpdu is not None:
        return header + tpdu + payload
    return header + payload


def reply_tpdu(tpdu: bytes) -> bytes:
    """The TPDU for a reply: same id, destination and source addresses swapped."""
    _check_tpdu(tpdu)
    return tpdu[:1] + tpdu[3:5] + tpdu[1:3]


def _check_tpdu(tpdu: bytes) -> None:
    if len(tpdu) != TPDU_SIZE:
        raise FramingError(f"a TPDU is {TPDU_SIZE} bytes, not {len(tpdu)}")
    if tpdu[0] != TPDU_ID:
        raise FramingError(f"bad TPDU id 0x{tpdu[0]:02X} (expected 0x{TPDU_ID:02X})")
