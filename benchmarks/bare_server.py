"""The bare codec server: the speed limit the gateway is compared with.

An asyncio TCP server that does only what any ISO 8583 server must: split frames, decode each one
with pyiso8583, and encode an answer (MTI + 10, the request's fields echoed, DE39 ``00``). With a
TPDU profile (``cup-pos``) the answer's TPDU swaps the request's destination and source, and the
application header is decoded and sent back as it came. No
ledger, no rules, no events. What the gateway achieves divided by what this achieves is the cost of
everything the gateway adds.

    python -m benchmarks.bare_server --port 8583 --profile iso87-binary
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import cast

import iso8583

from terminal_emulator.framing import FrameDecoder, FramingError, frame
from terminal_emulator.profile import ProfileError, WireProfile, load_profile

__all__ = ["BareServerProtocol", "main", "reply_tpdu", "serve"]


def reply_tpdu(tpdu: bytes | None) -> bytes | None:
    """The TPDU of an answer: the request's with destination and source swapped (``60 dddd ssss``)."""
    return tpdu[:1] + tpdu[3:5] + tpdu[1:3] if tpdu is not None else None


class BareServerProtocol(asyncio.Protocol):
    """One connection: decode every frame, answer it; a bad frame closes the connection."""

    def __init__(self, profile: WireProfile) -> None:
        self.profile = profile
        self.spec = profile.spec
        self.decoder = FrameDecoder(profile.framing)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            bodies = self.decoder.feed(data)
        except FramingError:
            transport.abort()
            return
        out: list[bytes] = []
        spec = self.spec
        framing = self.profile.framing
        for body in bodies:
            try:
                doc, _ = iso8583.decode(body, spec)
                mti = doc["t"]
                doc["t"] = f"{mti[:2]}{int(mti[2]) + 1}{mti[3]}"
                doc["39"] = "00"
                doc.pop("p", None)
                doc.pop("1", None)
                encoded, _ = iso8583.encode(doc, spec)
            except (iso8583.DecodeError, iso8583.EncodeError, ValueError, KeyError):
                transport.abort()
                return
            out.append(frame(bytes(encoded), framing, tpdu=reply_tpdu(self.decoder.last_tpdu)))
        if out:
            transport.write(b"".join(out))


async def serve(host: str, port: int, profile: WireProfile) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: BareServerProtocol(profile), host, port)


async def _run(host: str, port: int, profile: WireProfile) -> None:
    server = await serve(host, port, profile)
    bound = server.sockets[0].getsockname()
    print(f"bare codec server on {bound[0]}:{bound[1]} profile {profile.name}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8583)
    parser.add_argument("--profile", default="iso87-binary", help="name in specs/ or path to a .toml")
    parser.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(_run(args.host, args.port, profile))
            return 0
    asyncio.run(_run(args.host, args.port, profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
