"""The outbox relay alone: how fast it drains a full outbox into a real Mosquitto.

    python -m benchmarks.relay                          # the working tree, 3 runs
    python -m benchmarks.relay --base main --rounds 4   # main and the working tree, alternated

Each run is a fresh process: an in-memory outbox holding ``--events`` rows of ``--payload`` bytes,
an ``OutboxRelay`` with ``--batch-size``, and a private Mosquitto (``set_tcp_nodelay``, no
persistence, shared by the runs), on uvloop as the gateway runs (``--loop asyncio``: asyncio's
own loop). It reports events/s from the relay's start to the last row marked
sent (each mark follows the broker's PUBACK), and the event-loop thread's CPU time per event. A run
that does not finish within ``--timeout`` seconds fails. With ``--base`` each round runs both
versions back to back, in alternating order, as ``benchmarks.ab`` does; a version given as a git
revision runs that revision's ``gateway`` package with this file's harness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class _QuietLog:
    def info(self, event: str, **kw: Any) -> None:
        pass

    def warning(self, event: str, **kw: Any) -> None:
        print(f"relay warning: {event} {kw}", file=sys.stderr)


class _MemoryOutbox:
    """The ``Outbox`` port over a list; the relay marks rows in id order, so unsent rows are a suffix."""

    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = list(rows)
        self.first_unsent = 0
        self.sent = 0
        self.errors: list[str] = []
        self.drained = asyncio.Event()

    async def pending(self, limit: int) -> Sequence[Any]:
        return self.rows[self.first_unsent : self.first_unsent + limit]

    async def mark_sent(self, ids: Sequence[int], sent_at: datetime) -> None:
        expected = self.rows[self.first_unsent].id
        if list(ids) != list(range(expected, expected + len(ids))):
            raise AssertionError(f"rows marked out of order: {ids[:3]}... after {expected - 1}")
        self.first_unsent += len(ids)
        self.sent += len(ids)
        if self.first_unsent == len(self.rows):
            self.drained.set()

    async def record_error(self, message: str, at: datetime) -> None:
        self.errors.append(message)

    async def prune(self, sent_before: datetime) -> int:
        return 0

    async def status(self) -> Any:
        raise NotImplementedError


async def _drain(url: str, events: int, payload_bytes: int, batch_size: int, limit_s: float) -> dict[str, float]:
    from gateway.adapters.mqtt import OutboxRelay  # the version's package: PYTHONPATH names its tree
    from gateway.ports import OutboxRow

    created = datetime.now(UTC)
    payload = b'{"specversion":"1.0","data":"' + b"x" * max(0, payload_bytes - 32) + b'"}'
    rows = [
        OutboxRow(i, f"evt-{i}", f"bench/relay/MERCHANT0000001/TERM{i % 50:04d}/refund/approved", payload,
                  f"ORIGINAL{i % 500}", created)
        for i in range(1, events + 1)
    ]
    outbox = _MemoryOutbox(rows)
    relay = OutboxRelay(outbox, url=url, client_id=f"bench-relay-{os.getpid()}", clock=_Clock(),
                        batch_size=batch_size, logger=_QuietLog())
    started, cpu_started = time.perf_counter(), time.thread_time()
    task = asyncio.create_task(relay.run())
    try:
        async with asyncio.timeout(limit_s):
            await outbox.drained.wait()
    except TimeoutError:
        raise SystemExit(f"not drained within {limit_s:g} s: {outbox.sent} of {events} sent; "
                         f"errors: {outbox.errors[-3:]}") from None
    finally:
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {"events/s": events / elapsed, "loop µs/event": cpu / events * 1e6, "errors": len(outbox.errors)}


def _child(args: argparse.Namespace) -> int:
    drain = _drain(args.url, args.events, args.payload, args.batch_size, args.timeout)
    if args.loop == "uvloop":  # as the gateway runs (without terminal TLS)
        import uvloop

        result = uvloop.run(drain)
    else:
        result = asyncio.run(drain)
    print(json.dumps(result))
    return 0


def _run(root: Path, url: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--url", url,
               "--events", str(args.events), "--payload", str(args.payload),
               "--batch-size", str(args.batch_size), "--timeout", str(args.timeout), "--loop", args.loop]
    out = subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                         text=True, timeout=args.timeout + 30, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{root}: {(out.stderr or out.stdout)[-1500:]}")
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the outbox relay draining a full outbox into Mosquitto")
    parser.add_argument("--base", help="git revision to compare with the working tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=1024, help="bytes per event")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the event loop (the "
                        "gateway's is uvloop unless terminals use TLS)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    from benchmarks.ab import export, working_tree_label
    from benchmarks.run import mosquitto

    with tempfile.TemporaryDirectory(prefix="iso-relay-") as tmp:
        workdir = Path(tmp)
        versions = [(f"head {working_tree_label()}", ROOT)]
        if args.base:
            base_root = workdir / "base"
            versions.insert(0, (f"base {export(args.base, base_root)}", base_root))
        print(f"{' against '.join(label for label, _ in versions)}: {args.events} events of {args.payload} bytes, "
              f"batches of {args.batch_size}, {args.loop}, {args.rounds} rounds\n", flush=True)
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in versions}
        with mosquitto(workdir) as url:
            if not url.startswith("mqtt://"):
                raise SystemExit("benchmarks.relay needs Mosquitto installed")
            for number in range(args.rounds):
                order = versions if number % 2 == 0 else versions[::-1]
                for label, root in order:
                    figures = _run(root, url, args)
                    results[label].append(figures)
                    print(f"round {number + 1} {label:36} {figures['events/s']:9,.0f} events/s  "
                          f"{figures['loop µs/event']:6.1f} loop µs/event  errors {figures['errors']:.0f}", flush=True)
    print()
    medians = {label: {kind: statistics.median(run[kind] for run in runs) for kind in ("events/s", "loop µs/event")}
               for label, runs in results.items()}
    for label, figures in medians.items():
        print(f"median {label:35} {figures['events/s']:9,.0f} events/s  {figures['loop µs/event']:6.1f} loop µs/event")
    if args.base:
        base, head = (medians[label] for label, _ in versions)
        print(f"head / base: events/s {head['events/s'] / base['events/s']:.1%}, "
              f"loop µs/event {head['loop µs/event'] / base['loop µs/event']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
