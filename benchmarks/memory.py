"""Memory of the gateway: idle terminal connections and a long run (issue 7, item 3).

Starts the gateway the way ``benchmarks.run`` does (SQLite ledger with durable commits, events to a
private Mosquitto when installed, else the embedded broker, JSON logs to a file), with a long idle
time-out and its metrics endpoint on, and reads its memory from ``/proc/PID/status`` (``VmRSS``,
``VmHWM``, and ``RssAnon`` / ``RssFile`` / ``RssShmem``, the parts of the RSS) at these points:

1. after start;
2. after this script opened ``--connections`` TCP connections and each sent one 0800 echo (a real
   terminal session, answered 0810/00), kept open: the gateway's ``connections_open`` gauge confirms
   they are all held;
3. after they closed (the gauge back at 0); steps 2 and 3 are done ``--cycles`` times, so a second
   cycle shows whether the memory of the first is reused;
4. while the emulator's load mode drives ``--messages`` requests (purchases and refunds against them)
   in ``--slices`` slices: after each slice;
5. at the end, once the outbox is drained.

Each sample also records the ledger's size on disk (database + WAL) and the outbox's pending count.
Prints a table and the figures that answer the claim (RSS per idle connection, RSS back after they
close, RSS flat over the messages) and writes ``benchmarks/results/memory.json``.

    python -m benchmarks.memory --connections 2000 --messages 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.run import RESULTS, ROOT, Server, free_port, machine, mosquitto, outbox_pending, start_gateway
from terminal_emulator import WireProfile, decode_message, encode_message, load_profile
from terminal_emulator.framing import frame
from terminal_emulator.messages import echo, stamp

#: ``benchmarks.run.start_gateway`` sets GATEWAY_MAX_CONNECTIONS to this
GATEWAY_MAX_CONNECTIONS = 5000
#: file descriptors the script needs besides its idle connections
_SPARE_FDS = 256
_CONNECT_CONCURRENCY = 100

STATUS_KEYS = {"VmRSS": "rss_kib", "VmHWM": "hwm_kib", "RssAnon": "anon_kib", "RssFile": "file_kib",
               "RssShmem": "shmem_kib", "Threads": "threads"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Sample:
    """The gateway's memory and the ledger's size at one point of the run."""

    label: str
    messages: int  #: requests answered by the gateway so far (load slices)
    connections: int  #: terminal connections the gateway holds open
    rss_kib: int
    hwm_kib: int
    anon_kib: int
    file_kib: int
    shmem_kib: int
    threads: int
    tcp_mem_pages: int  #: kernel memory of all TCP sockets on the machine (/proc/net/sockstat), not in RSS
    ledger_bytes: int  #: database + WAL file
    outbox_pending: int
    elapsed_s: float


def read_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``, ``RssShmem`` (KiB) and ``Threads`` of ``pid``."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            values[STATUS_KEYS[key]] = int(rest.split()[0])
    missing = set(STATUS_KEYS.values()) - values.keys()
    if missing:
        raise RuntimeError(f"/proc/{pid}/status lacks {', '.join(sorted(missing))}")
    return values


def tcp_mem_pages() -> int:
    """The ``mem`` figure of the ``TCP:`` line of ``/proc/net/sockstat`` (pages, whole machine; -1 if absent)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1])
    return -1


def ledger_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def code_version() -> dict[str, Any]:
    """The commit measured and whether ``gateway/`` had uncommitted changes (None without git)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return {"commit": None, "gateway_modified": None}
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "gateway"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return {"commit": head.stdout.strip(), "gateway_modified": bool(status.stdout.strip())}


def raise_nofile_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (at most the hard limit); returns the soft limit now.

    Called before the gateway starts, so that it inherits the same limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def metric(port: int, name: str) -> float:
    """One unlabelled sample from the gateway's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"the gateway exposes no {name}")


async def wait_for(what: str, check: Callable[[], bool], within_s: float, interval: float = 0.1) -> None:
    """Poll ``check`` until it holds; ``TimeoutError`` naming ``what`` after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(_holds, check):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {within_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except OSError:  # e.g. the metrics endpoint is not listening yet
        return False


# --- idle terminal sessions ---------------------------------------------------------------------
Session = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_session(port: int, profile: WireProfile, index: int, mid: str, answer_s: float) -> Session:
    """A connection that sent one 0800 echo and got its 0810/00; left open."""
    tid = f"I{index:07d}"
    request = echo(stamp(index % 999_999 + 1, datetime.now(UTC)), tid=tid, mid=mid)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), answer_s)
    try:
        writer.write(frame(encode_message(profile, request), profile.framing))
        framing = profile.framing
        header = await asyncio.wait_for(reader.readexactly(framing.header_size), answer_s)
        length = int.from_bytes(header, "big") if framing.binary_header else int(header)
        if framing.length_includes_header:
            length -= framing.header_size
        body = await asyncio.wait_for(reader.readexactly(length), answer_s)
        if framing.tpdu is not None:
            body = body[5:]
        answer = decode_message(profile, body)
        if answer.mti != "0810" or answer.response_code != "00":
            raise RuntimeError(f"echo on {tid} answered {answer.mti}/{answer.response_code}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def open_sessions(port: int, profile: WireProfile, count: int, mid: str, answer_s: float) -> list[Session]:
    gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)

    async def one(index: int) -> Session:
        async with gate:
            return await open_session(port, profile, index, mid, answer_s)

    results = await asyncio.gather(*(one(i) for i in range(1, count + 1)), return_exceptions=True)
    sessions = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_sessions(sessions)
        raise RuntimeError(f"{len(failures)} of {count} sessions failed, first: {failures[0]!r}")
    return sessions


async def close_sessions(sessions: list[Session]) -> None:
    for _, writer in sessions:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in sessions), return_exceptions=True)


# --- load ---------------------------------------------------------------------------------------
async def drive(port: int, count: int, args: argparse.Namespace, slice_no: int = 0) -> dict[str, Any]:
    """``count`` requests through the emulator's load mode; its JSON summary. Each slice's terminals
    have ids of their own (``S<slice>...``): the load numbers its STANs from 1 in every run, so the
    same terminals would send the same requests again, which the gateway answers as retransmissions
    (a replay and a ``pos.duplicate.replayed`` event each), not as new transactions."""
    command = [
        sys.executable, "-m", "terminal_emulator", "--port", str(port), "--profile", args.profile,
        "--mid", args.mid, "--json", "--timeout", "30", "load", "--count", str(count),
        "-c", str(args.load_connections), "--pipeline", str(args.pipeline), "--mix", args.mix, "--quiet",
        "--seed", "7", "--tid-prefix", f"S{slice_no % 1000:03d}",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    limit = count / 200 + 120  # far beyond 200 msg/s: only a stuck run hits it
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"load produced no summary (exit {process.returncode}): {err.decode()[-2000:]}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


# --- the run ------------------------------------------------------------------------------------
class Recorder:
    def __init__(self, server: Server, db: Path, metrics_port: int) -> None:
        self.server = server
        self.db = db
        self.metrics_port = metrics_port
        self.samples: list[Sample] = []
        self.started = time.monotonic()

    def connections_open(self) -> int:
        return int(metric(self.metrics_port, "gateway_connections_open"))

    def check_alive(self) -> None:
        """Raise, with the end of the gateway's log, when the gateway process has exited."""
        code = self.server.process.poll()
        if code is not None:
            log = self.db.with_name("gateway-1.log")
            tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise RuntimeError(f"the gateway ended ({how}); its log ends:\n" + "\n".join(tail))

    def take(self, label: str, messages: int) -> Sample:
        self.check_alive()
        status = read_status(self.server.process.pid)
        sample = Sample(
            label=label,
            messages=messages,
            connections=self.connections_open(),
            tcp_mem_pages=tcp_mem_pages(),
            ledger_bytes=ledger_bytes(self.db),
            outbox_pending=outbox_pending(self.db),
            elapsed_s=round(time.monotonic() - self.started, 1),
            **status,
        )
        self.samples.append(sample)
        print(row(sample), flush=True)
        return sample


HEADER = (f"{'point':<26} {'messages':>9} {'conns':>5} {'RSS MiB':>8} {'anon MiB':>8} {'file MiB':>8} "
          f"{'shm MiB':>7} {'peak MiB':>8} {'thr':>3} {'ledger MiB':>10} {'outbox':>6} {'t s':>6}")  # fmt: skip


def row(s: Sample) -> str:
    return (f"{s.label:<26} {s.messages:>9,} {s.connections:>5} {s.rss_kib / 1024:>8.1f} {s.anon_kib / 1024:>8.1f} "
            f"{s.file_kib / 1024:>8.1f} {s.shmem_kib / 1024:>7.1f} {s.hwm_kib / 1024:>8.1f} {s.threads:>3} "
            f"{s.ledger_bytes / 2**20:>10.1f} {s.outbox_pending:>6} {s.elapsed_s:>6.0f}")  # fmt: skip


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (0.0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def conclusions(samples: list[Sample], connections: int, cycles: int) -> dict[str, Any]:
    by_label = {s.label: s for s in samples}
    start = by_label["start"]
    out: dict[str, Any] = {}
    for cycle in range(1, cycles + 1):
        before = by_label["start"] if cycle == 1 else by_label[f"closed (cycle {cycle - 1})"]
        opened = by_label[f"{connections} open (cycle {cycle})"]
        closed = by_label[f"closed (cycle {cycle})"]
        out[f"cycle_{cycle}"] = {
            "rss_before_kib": before.rss_kib,
            "rss_open_kib": opened.rss_kib,
            "rss_closed_kib": closed.rss_kib,
            "kib_per_idle_connection": round((opened.rss_kib - before.rss_kib) / connections, 2),
            "kib_kept_after_close": closed.rss_kib - before.rss_kib,
            "rss_closed_vs_start_kib": closed.rss_kib - start.rss_kib,
        }
    slices = [s for s in samples if s.label.startswith("load ")]
    if slices:
        first, last = slices[0], slices[-1]
        # fit from the second slice on: the first one also pays the one-time warm-up
        tail = slices[1:] if len(slices) > 2 else slices
        per_100k = slope([(s.messages / 100_000, s.rss_kib) for s in tail])
        anon_per_100k = slope([(s.messages / 100_000, s.anon_kib) for s in tail])
        out["messages"] = {
            "rss_after_first_slice_kib": first.rss_kib,
            "rss_after_last_slice_kib": last.rss_kib,
            "rss_change_first_to_last_kib": last.rss_kib - first.rss_kib,
            "rss_min_over_slices_kib": min(s.rss_kib for s in slices),
            "rss_max_over_slices_kib": max(s.rss_kib for s in slices),
            "rss_slope_kib_per_100k_messages": round(per_100k, 1),
            "anon_slope_kib_per_100k_messages": round(anon_per_100k, 1),
            "rss_growth_over_start_kib": last.rss_kib - start.rss_kib,
            "ledger_bytes_per_message": round((last.ledger_bytes - start.ledger_bytes) / max(1, last.messages), 1),
        }
    return out


async def measure(args: argparse.Namespace, workdir: Path, mqtt_url: str) -> dict[str, Any]:
    profile = load_profile(args.profile)
    metrics_port = free_port()
    server = start_gateway(
        args.profile,
        workdir,
        mqtt_url,
        1,
        env={
            "GATEWAY_IDLE_TIMEOUT_S": str(args.idle_timeout),
            "GATEWAY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            "GATEWAY_MAX_CONNECTIONS": str(max(GATEWAY_MAX_CONNECTIONS, args.connections + 100)),
            # every connection comes from 127.0.0.1: above the default of 250 per address (issue 21)
            "GATEWAY_LIMITS__PER_ADDRESS": str(args.connections + args.load_connections + 100),
        },
    )
    rec = Recorder(server, workdir / "ledger-1.db", metrics_port)
    loads: list[dict[str, Any]] = []
    try:
        await wait_for("the metrics endpoint", lambda: rec.connections_open() == 0, 20)
        print(HEADER, flush=True)
        rec.take("start", 0)
        for cycle in range(1, args.cycles + 1):
            began = time.monotonic()
            sessions = await open_sessions(server.port, profile, args.connections, args.mid, args.timeout)
            took = time.monotonic() - began
            await wait_for(
                f"{args.connections} open connections", lambda: rec.connections_open() == args.connections, 30
            )
            rec.take(f"{args.connections} open (cycle {cycle})", 0)
            print(f"  ({args.connections} sessions opened and echoed in {took:.1f} s)", flush=True)
            await close_sessions(sessions)
            await wait_for("the connections to close", lambda: rec.connections_open() == 0, 30)
            rec.take(f"closed (cycle {cycle})", 0)
        done = 0
        per_slice = -(-args.messages // args.slices)
        while done < args.messages:
            count = min(per_slice, args.messages - done)
            try:
                summary = await drive(server.port, count, args, len(loads) + 1)
            except RuntimeError:
                # the better message when the gateway died under load (it may still be shutting down)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.process.wait(timeout=25)
                rec.check_alive()
                raise
            done += summary["received"]
            loads.append(summary)
            sample = rec.take(f"load {len(loads)}", done)
            print(
                f"  ({summary['tps']:.0f} msg/s, codes {summary['response_codes']}, errors {summary['errors']}, "
                f"timeouts {summary['timeouts']}; sample {sample.label})",
                flush=True,
            )
            if summary["received"] == 0:
                raise RuntimeError("a load slice got no answer at all")
        began = time.monotonic()
        try:
            await wait_for("the outbox to drain", lambda: outbox_pending(rec.db) == 0, args.drain_timeout, 0.5)
        except TimeoutError:
            print(f"  (the outbox did not drain within {args.drain_timeout:.0f} s)", flush=True)
        drain_s = round(time.monotonic() - began, 1)
        end = rec.take("end", done)
        print(f"  (after the load: outbox drained to {end.outbox_pending} in {drain_s:.0f} s)", flush=True)
    finally:
        peak_mib = server.stop()
    return {
        "samples": [asdict(s) for s in rec.samples],
        "loads": loads,
        "peak_rss_mib": round(peak_mib, 1),
        "drain_s": drain_s,
        "conclusions": conclusions(rec.samples, args.connections, args.cycles),
    }


def report(conclusions_: dict[str, Any], connections: int) -> None:
    print()
    for key, cycle in conclusions_.items():
        if not key.startswith("cycle_"):
            continue
        print(f"{key.replace('_', ' ')}: opening {connections} idle connections added "
              f"{cycle['kib_per_idle_connection']:.2f} KiB RSS each; after they closed RSS was "
              f"{cycle['kib_kept_after_close'] / 1024:+.1f} MiB against before this cycle, "
              f"{cycle['rss_closed_vs_start_kib'] / 1024:+.1f} MiB against start")  # fmt: skip
    m = conclusions_.get("messages")
    if m is not None:
        print(f"messages: RSS {m['rss_after_first_slice_kib'] / 1024:.1f} MiB after the first slice, "
              f"{m['rss_after_last_slice_kib'] / 1024:.1f} MiB after the last "
              f"(range {m['rss_min_over_slices_kib'] / 1024:.1f}..{m['rss_max_over_slices_kib'] / 1024:.1f} MiB); "
              f"fitted slope {m['rss_slope_kib_per_100k_messages']:+.1f} KiB RSS "
              f"({m['anon_slope_kib_per_100k_messages']:+.1f} KiB anonymous) per 100k messages; "
              f"ledger {m['ledger_bytes_per_message']:.0f} bytes per message on disk")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gateway memory: idle connections and a long run")
    parser.add_argument("--connections", type=int, default=2000, help="idle terminal connections to hold")
    parser.add_argument("--cycles", type=int, default=2, help="times to open and close the idle connections")
    parser.add_argument("--messages", type=int, default=1_000_000, help="requests to drive through the gateway")
    parser.add_argument("--slices", type=int, default=10, help="memory samples over the messages")
    parser.add_argument("--load-connections", type=int, default=4)
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--mix", default="purchase=80,refund=20")
    parser.add_argument("--profile", default="iso87-binary")
    parser.add_argument("--mid", default="MERCHANT0000001")
    parser.add_argument("--idle-timeout", type=float, default=3600.0, help="GATEWAY_IDLE_TIMEOUT_S")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to connect and get each echo answer")
    parser.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for the outbox to drain")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the ledger, the gateway's log and the broker config here "
        "(default: a temporary directory, removed at the end)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.connections < GATEWAY_MAX_CONNECTIONS - args.load_connections:
        most = GATEWAY_MAX_CONNECTIONS - args.load_connections - 1
        parser.error(
            f"--connections must be between 1 and {most} "
            f"(benchmarks.run.start_gateway sets GATEWAY_MAX_CONNECTIONS={GATEWAY_MAX_CONNECTIONS})"
        )
    if args.messages < 1 or args.slices < 1 or args.cycles < 1:
        parser.error("--messages, --slices and --cycles must be at least 1")

    nofile = raise_nofile_limit(args.connections + _SPARE_FDS)
    if nofile != resource.RLIM_INFINITY and nofile < args.connections + _SPARE_FDS:
        parser.error(f"RLIMIT_NOFILE is {nofile}; {args.connections} connections need {args.connections + _SPARE_FDS}")
    info = machine()
    code = code_version()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    print(
        f"{args.connections} idle connections x {args.cycles} cycles, then {args.messages:,} messages "
        f"({args.mix}) in {args.slices} slices, {args.load_connections} connections x {args.pipeline} in flight\n"
    )
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    place = tempfile.TemporaryDirectory(prefix="iso-memory-") if args.workdir is None else None
    with place if place is not None else contextlib.nullcontext():
        workdir = args.workdir if place is None else Path(place.name)
        with mosquitto(workdir) as mqtt_url:
            figures = asyncio.run(measure(args, workdir, mqtt_url))
            figures["mqtt"] = "mosquitto" if mqtt_url != "embedded" else "embedded"
            figures["log_bytes"] = (workdir / "gateway-1.log").stat().st_size
    report(figures["conclusions"], args.connections)
    results = {
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code,
        **figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
