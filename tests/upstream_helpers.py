"""What the upstream link's tests share: requests as the service would hand them to the link, a link
to a given URL with short test timings, and a logger that records its lines."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

from gateway.adapters.upstream import UpstreamLink
from gateway.config import UpstreamSettings
from gateway.metrics import Metrics
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile

CARD = "4761739001010119"
TERMINAL = "TERM0001"
MERCHANT = "MERCHANT0000001"
_RRNS = itertools.count(100_000_000_001)


def purchase(amount: int, *, pan: str = CARD, terminal: str = TERMINAL, stan: str = "000001") -> Message:
    """A 0200 the service forwards: the caller's RRN in DE37; DE7 and DE11 are the link's to set."""
    return Message(
        "0200",
        {2: pan, 3: "000000", 4: f"{amount:012d}", 11: stan, 12: "101010", 13: "1207", 14: "2912",
         37: f"{next(_RRNS):012d}", 41: terminal, 42: MERCHANT, 49: "840"},
    )  # fmt: skip


def reversal(original: Message, mti: str = "0420") -> Message:
    """A reversal of ``original`` as it went out: DE90 quotes its MTI, STAN and DE7."""
    fields = original.fields
    de90 = original.mti + fields[11] + fields[7] + "0" * 22
    return Message(mti, {2: fields[2], 3: fields[3], 4: fields[4], 11: fields[11], 37: fields[37], 41: fields[41],
                         42: fields[42], 49: fields[49], 90: de90})  # fmt: skip


def quick_settings(url: str, **overrides: Any) -> UpstreamSettings:
    """Short timings: a failure shows within a second, a reconnect within a fraction of one."""
    values: dict[str, Any] = {
        "url": url,
        "timeout_s": 2.0,
        "connect_timeout_s": 1.0,
        "network_timeout_s": 1.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
    }
    values.update(overrides)
    return UpstreamSettings(**values)


@contextlib.asynccontextmanager
async def link_to(
    url: str, *, logger: Any = None, recorder: Any = None, clock: Any = None, **settings: Any
) -> AsyncIterator[UpstreamLink]:
    """A started link to ``url`` (stopped on the way out)."""
    upstream = quick_settings(url, **settings)
    link = UpstreamLink(upstream, load_profile(upstream.profile), logger=logger or Lines(), recorder=recorder,
                        clock=clock)  # fmt: skip
    await link.start()
    try:
        yield link
    finally:
        await link.stop()


class Lines:
    """A structlog-style logger that keeps its lines: ``of(event)`` gives their key-value pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self._added = asyncio.Event()

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))
        self._added.set()

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.lines if name == event]

    def events(self) -> list[str]:
        return [name for _, name, _ in self.lines]

    async def wait_for(self, event: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.of(event)) < count:
                self._added.clear()
                await self._added.wait()
        return self.of(event)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)
