"""CPU per message of the gateway's own work, in one process, without sockets: a steady figure.

``make bench`` measures the gateway the way terminals see it, over TCP against a real broker, and
its figures drift with the machine (about 15% within an hour on a shared VM). This script feeds
pre-encoded frames straight into :meth:`gateway.service.GatewayService.handle_nowait` with a durable
SQLite ledger (``synchronous=FULL``, group commit), JSON log lines written to ``/dev/null`` and the
metrics recorder, in groups of ``--group`` requests (the group size ``make bench`` produces), and
reports the event-loop thread's CPU time per message (``time.thread_time``). Runs back to back
agree within about 1%, over minutes the VM drifts by up to 5%: compare variants in alternating
runs, or count instructions under ``valgrind --tool=callgrind`` for changes of a few percent
(docs/performance.md shows how). It leaves out what only the live run has: sockets, framing, the
relay and the broker.

Purchases, plus ``--refunds`` percent of partial refunds by RRN against purchases approved during
the warm-up. ``--no-log`` and ``--no-metrics`` leave out the log line or the recorder, to measure
what they cost.

    python -m benchmarks.inproc --messages 20000 --refunds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from gateway.adapters.ledger import SqliteLedger
from gateway.app import build_policy, tune_runtime
from gateway.config import Settings
from gateway.logs import configure_logging, get_logger
from gateway.metrics import Metrics
from gateway.protocol.codec import Codec
from gateway.protocol.profile import load_profile
from gateway.service import GatewayService, ServiceConfig
from terminal_emulator import messages
from terminal_emulator.codec import encode_message
from terminal_emulator.dialects import Card, Station, dialect_for
from terminal_emulator.profile import load_profile as load_wire_profile

MERCHANT = "MERCHANT0000001"
PAN = "4761739001010010"
TERMINALS = 64


class Harness:
    def __init__(self, service: GatewayService, codec: Codec, profile_name: str, refund_pct: int) -> None:
        self.service = service
        self.codec = codec
        self.wire = load_wire_profile(profile_name)
        self.dialect = dialect_for(self.wire)  # the profile's requests: iso87, or UnionPay's in cup-pos
        self.refund_pct = refund_pct
        self.rrns: list[str] = []  #: approved purchases a refund may point at
        self.refunds = 0  #: refunds among the frames made so far
        self.now = datetime.now(UTC)

    def frames(self, start: int, count: int, *, refunds: bool = True) -> list[bytes]:
        """Requests ``start`` .. ``start + count - 1``: with ``refunds``, ``refund_pct`` of every 100 are
        partial refunds of purchases approved before (each its own original), else purchases only."""
        out: list[bytes] = []
        for i in range(start, start + count):
            stamp = messages.stamp(i % 999_999 + 1, self.now)
            station = Station(f"L{i % TERMINALS:07d}", MERCHANT, 1)
            currency = self.dialect.default_currency
            if refunds and i % 100 < self.refund_pct:
                if not self.rrns:
                    raise SystemExit("no approved purchase left to refund: the warm-up was too short")
                message = self.dialect.refund(stamp, station, Card(PAN), 100, currency, rrn=self.rrns.pop(),
                                              original=None, by_original_data=False)
                self.refunds += 1
            else:
                message = self.dialect.purchase(stamp, station, Card(PAN), 1000, currency)
            out.append(encode_message(self.wire, message))
        return out

    async def run(self, payloads: list[bytes]) -> list[bytes]:
        """Hand every payload to the service at once; return once each has its answer."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        answers: list[bytes] = []
        expected = len(payloads)

        def reply(answer: bytes | None, delivered: Callable[[], None] | None = None) -> None:
            assert answer is not None
            answers.append(answer)
            if delivered is not None:
                delivered()
            if len(answers) == expected:
                done.set_result(None)

        fail: Callable[[BaseException], None] = done.set_exception
        for payload in payloads:
            self.service.handle_nowait(payload, reply, fail)
        await done
        return answers

    def check(self, answers: list[bytes], *, keep_rrns: bool) -> None:
        for answer in answers:
            message = self.codec.decode(answer)
            code = message.fields.get(39)
            if code != "00":
                raise SystemExit(f"a request was answered {code}, not 00")
            if keep_rrns and message.fields.get(3, "").startswith("00"):
                self.rrns.append(message.fields[37])


async def measure(args: argparse.Namespace) -> dict[str, float]:
    configure_logging("info", "json", coalesce=True)
    logger = None if args.no_log else get_logger("gateway")
    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory(prefix="iso-inproc-") as tmp:
        ledger = await SqliteLedger(Path(tmp) / "ledger.db", synchronous="FULL").open()
        try:
            service = GatewayService(
                profile,
                ledger,
                ServiceConfig("inproc", "bench/corrections", b"bench-key", build_policy(Settings())),
                logger=logger,
                recorder=None if args.no_metrics else Metrics(),
            )
            harness = Harness(service, Codec(profile), args.profile, args.refunds)
            # warm-up: purchases only, one for every refund to come plus --warmup, so that every refund
            # of the measurement has an original of its own (a refund in the warm-up would use one up)
            warm = -(-args.messages * args.refunds // 100) + args.warmup
            warm = -(-warm // args.group) * args.group  # whole groups: the measurement starts after the last
            for start in range(0, warm, args.group):
                harness.check(await harness.run(harness.frames(start, args.group, refunds=False)), keep_rrns=True)
            groups = [harness.frames(warm + k * args.group, args.group) for k in range(args.messages // args.group)]
            refunds = harness.refunds
            tune_runtime()  # as the gateway runs (gateway.app.serve)
            answers: list[bytes] = []
            thread0, process0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
            for payloads in groups:
                answers += await harness.run(payloads)
            thread1, process1, wall1 = time.thread_time(), time.process_time(), time.perf_counter()
            harness.check(answers, keep_rrns=False)
        finally:
            await ledger.close()
    count = len(answers)
    return {
        "messages": count,
        "loop_thread_us_per_msg": (thread1 - thread0) / count * 1e6,
        "process_us_per_msg": (process1 - process0) / count * 1e6,
        "wall_us_per_msg": (wall1 - wall0) / count * 1e6,
        "refunds": refunds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the gateway's CPU per message, in process")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--refunds", type=int, default=20, help="percent of partial refunds (0-100)")
    parser.add_argument("--group", type=int, default=32, help="requests handed over together")
    parser.add_argument("--warmup", type=int, default=2000, help="purchases sent before the measurement")
    parser.add_argument("--profile", default="iso87-binary")
    parser.add_argument("--no-log", action="store_true", help="no message.processed log line")
    parser.add_argument("--no-metrics", action="store_true", help="no metrics recorder")
    args = parser.parse_args(argv)
    if not 0 <= args.refunds <= 100 or args.group < 1 or args.messages < args.group or args.warmup < 0:
        parser.error("--refunds is 0-100, --group at least 1, --messages at least --group, --warmup at least 0")
    stdout = sys.stdout
    with open(os.devnull, "w") as sink:
        sys.stdout = sink  # the JSON log lines go to stdout
        try:
            import uvloop

            figures = uvloop.run(measure(args))
        finally:
            sys.stdout = stdout
    print(f"{figures['messages']} messages ({figures['refunds']} of them refunds): event-loop thread "
          f"{figures['loop_thread_us_per_msg']:.1f} µs/msg, process {figures['process_us_per_msg']:.1f} µs/msg, "
          f"wall {figures['wall_us_per_msg']:.1f} µs/msg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
