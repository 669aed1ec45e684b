"""``make bench``: the gateway against the bare codec server, measured in the same run.

Each round starts the bare codec server (decode + re-encode with pyiso8583, nothing else: the limit),
drives it with the emulator's load mode, stops it, then does the same with the full gateway: SQLite
ledger with durable commits (``synchronous=FULL``), the rules, events published to a private
Mosquitto when installed (else the embedded broker) and JSON logs written to a file. Rounds
alternate so that drift in the machine's load hits both alike. A last run drives the gateway at half
its measured maximum to report latency under normal load.

Each wire profile is measured in turn, gateway and bare server in the same profile (default
``iso87-binary`` then the UnionPay ``cup-pos``: TPDU, BCD, the cup dialect), and their figures are
printed side by side. Prints throughput, p50/p99 latency, peak memory and the ratio gateway / limit,
and writes the figures per profile with a description of the machine to
``benchmarks/results/latest.json``.

With ``--upstream iso-host`` each round of an ``iso87`` profile also runs the gateway forwarding to the
acquirer host simulator (``iso-host serve`` on a free loopback port, ``GATEWAY_UPSTREAM__URL``; a
fresh host each round) after the stand-in gateway, and reports bare / stand-in / via-host side by
side. The host runs on the same cores, so the via-host figure pays for the host's CPU too. (The host
link speaks iso87; a UnionPay terminal profile is measured in stand-in only.)

    python -m benchmarks.run --duration 10 --rounds 3
    python -m benchmarks.run --profile cup-pos
    python -m benchmarks.run --duration 8 --rounds 3 --upstream iso-host     # make bench BENCH_ARGS="..."
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminal_emulator.load import percentile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU time from a ``/proc/.../stat`` file (a process's or one thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used so far."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time each thread of the process has used so far, by thread id."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread may end meanwhile
            out[task.name] = _stat_cpu_seconds(task / "stat")
    return out


def measured(server: Server, args: argparse.Namespace, rate: float | None = None) -> dict[str, Any]:
    """Drive ``server`` and add the CPU time it spent per answered message, in all and on its busiest
    thread (the event loop), and how busy that thread was: near 100%, only less CPU per message on
    it makes the server faster."""
    pid = server.process.pid
    before, threads_before, started = cpu_seconds(pid), thread_cpu_seconds(pid), time.monotonic()
    summary = load(server.port, args, rate)
    spent, threads_after = cpu_seconds(pid) - before, thread_cpu_seconds(pid)
    elapsed = time.monotonic() - started
    busiest = max((cpu - threads_before.get(tid, 0.0) for tid, cpu in threads_after.items()), default=0.0)
    received = max(1, summary["received"])
    summary["server_cpu_us_per_msg"] = spent / received * 1e6
    summary["busiest_thread_cpu_us_per_msg"] = busiest / received * 1e6
    summary["busiest_thread_busy"] = busiest / elapsed if elapsed > 0 else 0.0
    return summary


def peak_rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> float:
        peak = peak_rss_mib(self.process.pid)
        terminate(self.process)
        return peak


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited 20 s later."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[str]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        yield "embedded"
        return
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def start_bare(profile: str) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bare_server", "--port", str(port), "--profile", profile],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port, process)
    return Server("bare", process, port)


def start_gateway(
    profile: str, workdir: Path, mqtt_url: str, round_no: int, env: dict[str, str] | None = None,
    *, root: Path = ROOT,
) -> Server:
    """The gateway of the source tree at ``root`` (``benchmarks.ab`` runs another version's)."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_PROFILE": profile,
        "GATEWAY_LEDGER_URL": f"sqlite:///{workdir / f'ledger-{round_no}.db'}",
        "GATEWAY_MQTT_URL": mqtt_url,
        "GATEWAY_MQTT__EMBEDDED_LISTEN": f"127.0.0.1:{free_port()}",
        "GATEWAY_MQTT_TOPIC_PREFIX": "bench/corrections",
        "GATEWAY_PAN_HMAC_KEY": "bench-key",
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_MAX_CONNECTIONS": "5000",
        **(env or {}),
    }
    log = (workdir / f"gateway-{round_no}.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=root, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    wait_listening(port, process)
    return Server("gateway", process, port)


def load(port: int, args: argparse.Namespace, rate: float | None = None) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "terminal_emulator", "--port", str(port), "--profile", args.profile,
        "--json", "--timeout", "30", "load", "--duration", str(args.duration), "-c", str(args.connections),
        "--pipeline", str(args.pipeline), "--mix", args.mix, "--quiet", "--seed", "7",
    ]
    if rate is not None:
        command += ["--rate", f"{rate:.0f}"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.duration * 4 + 60,
                         check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"load produced no summary: {out.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def outbox_pending(db: Path) -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0])


@dataclass
class Host:
    """``iso-host serve`` (terminal_emulator/host) on a free loopback port, approving everything."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> int:
        """Stop it; the number of requests it says it received (its stop line), -1 if it did not say."""
        terminate(self.process)
        found = re.search(r"stopped after (\d+) request", self.log.read_text(errors="replace"))
        return int(found.group(1)) if found else -1


def start_host(workdir: Path, round_no: int) -> Host:
    port = free_port()
    script = Path(sys.executable).parent / "iso-host"
    command = ([str(script)] if script.exists()
               else [sys.executable, "-c", "from terminal_emulator.host.cli import main; main()"])
    log = workdir / f"host-{round_no}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "serve", "--listen", f"127.0.0.1:{port}", "--quiet"], cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT)
    wait_listening(port, process)
    return Host(process, port, log)


def via_host_round(args: argparse.Namespace, workdir: Path, mqtt_url: str, round_no: int,
                   rate: float | None = None) -> tuple[dict[str, Any], float]:
    """The gateway forwarding every purchase and checked refund to a fresh ``iso-host``: its figures
    (with the host's CPU per message and how many requests the host received) and its peak memory."""
    host = start_host(workdir, round_no)
    try:
        gateway = start_gateway(args.profile, workdir, mqtt_url, round_no,
                                {"GATEWAY_UPSTREAM__URL": f"tcp://127.0.0.1:{host.port}"})
        try:
            host_before = cpu_seconds(host.process.pid)
            summary = measured(gateway, args, rate)
            summary["host_cpu_us_per_msg"] = ((cpu_seconds(host.process.pid) - host_before)
                                              / max(1, summary["received"]) * 1e6)
        finally:
            peak = gateway.stop()
    finally:
        received = host.stop()
    summary["host_received"] = received
    return summary, peak


def via_host_summary(rounds: list[dict[str, Any]], bare_tps: float, gw_tps: float) -> dict[str, Any]:
    """Medians of the via-host runs and their ratios to the bare server and the stand-in gateway."""
    via = [r["via_host"] for r in rounds]
    tps = statistics.median(v["tps"] for v in via)
    return {
        "via_host_tps_median": tps,
        "via_host_p50_ms_median": statistics.median(v["p50_ms"] for v in via),
        "via_host_p99_ms_median": statistics.median(v["p99_ms"] for v in via),
        "gateway_p50_ms_median": statistics.median(r["gateway"]["p50_ms"] for r in rounds),
        "gateway_p99_ms_median": statistics.median(r["gateway"]["p99_ms"] for r in rounds),
        "bare_p50_ms_median": statistics.median(r["bare"]["p50_ms"] for r in rounds),
        "bare_p99_ms_median": statistics.median(r["bare"]["p99_ms"] for r in rounds),
        "ratio_via_host_to_bare": tps / bare_tps if bare_tps else 0.0,
        "ratio_via_host_to_gateway": tps / gw_tps if gw_tps else 0.0,
        "via_host_round_ratios_to_gateway": [
            r["via_host"]["tps"] / r["gateway"]["tps"] if r["gateway"]["tps"] else 0.0 for r in rounds
        ],
        "via_host_cpu_us_per_msg": statistics.median(v["server_cpu_us_per_msg"] for v in via),
        "host_cpu_us_per_msg": statistics.median(v["host_cpu_us_per_msg"] for v in via),
    }


def print_via_host(s: dict[str, Any], half: dict[str, Any]) -> None:
    print(f"\n{'median of the rounds':<22} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}  ratio")
    print(f"{'bare codec server':<22} {s['bare_tps_median']:>9.0f} {s['bare_p50_ms_median']:>8.2f} "
          f"{s['bare_p99_ms_median']:>8.2f}  100%")
    print(f"{'gateway, stand-in':<22} {s['gateway_tps_median']:>9.0f} {s['gateway_p50_ms_median']:>8.2f} "
          f"{s['gateway_p99_ms_median']:>8.2f}  {s['ratio_gateway_to_bare']:.1%} of bare")
    print(f"{'gateway via iso-host':<22} {s['via_host_tps_median']:>9.0f} {s['via_host_p50_ms_median']:>8.2f} "
          f"{s['via_host_p99_ms_median']:>8.2f}  {s['ratio_via_host_to_bare']:.1%} of bare, "
          f"{s['ratio_via_host_to_gateway']:.1%} of stand-in")
    print("via host / stand-in per round " + " ".join(f"{r:.1%}" for r in s["via_host_round_ratios_to_gateway"]))
    print(f"CPU per message via host: gateway {s['via_host_cpu_us_per_msg']:.0f} µs, iso-host "
          f"{s['host_cpu_us_per_msg']:.0f} µs (same cores)")
    print(f"p99 via host at half load ({half['target_rate']:.0f} msg/s): {half['p99_ms']:.2f} ms")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists()
                                                   else None),
    }


#: the bare server's rounds moving by more than this (max / min - 1) means the machine's speed moved
DRIFT_WARNING = 0.10


def round_ratios(rounds: list[dict[str, Any]]) -> list[float]:
    """Each round's gateway / bare throughput (the two runs of a round are back to back)."""
    return [r["gateway"]["tps"] / r["bare"]["tps"] if r["bare"]["tps"] else 0.0 for r in rounds]


def drift(rounds: list[dict[str, Any]]) -> float:
    """How far the bare server's rounds spread (max / min - 1): it does the same work every round,
    so its spread is the machine's, not the code's."""
    tps = [r["bare"]["tps"] for r in rounds]
    return max(tps) / min(tps) - 1 if tps and min(tps) > 0 else 0.0


def logged_latencies(log: Path) -> list[float]:
    """Each request's latency as the gateway logged it (``message.processed``: from decoding the
    request to handing its answer to the socket), in ms; other lines are skipped."""
    out: list[float] = []
    with contextlib.suppress(OSError), log.open("rb") as lines:
        for line in lines:
            if b'"message.processed"' not in line:
                continue
            with contextlib.suppress(ValueError):
                value = json.loads(line).get("latency_ms")
                if isinstance(value, int | float):
                    out.append(float(value))
    return out


def row(name: str, s: dict[str, Any], peak: float) -> str:
    return (f"{name:<22} {s['tps']:>9.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
            f"{s['server_cpu_us_per_msg']:>8.0f} {s['busiest_thread_busy']:>6.0%} {peak:>9.1f} "
            f"{s['errors']:>6} {s['timeouts']:>8}  {s['response_codes']}")


#: what ``make bench`` measures: the default profile, and the UnionPay one next to it
DEFAULT_PROFILES = "iso87-binary,cup-pos"
HEADER = (f"{'run':<22} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs':>8} {'loop':>6} {'peak MiB':>9} "
          f"{'errors':>6} {'timeouts':>8}  codes")


def bench_profile(args: argparse.Namespace, workdir: Path, mqtt_url: str) -> dict[str, Any]:
    """The rounds (bare server then gateway, both in ``args.profile``), the half-load run and their summary."""
    print(f"\nprofile {args.profile}\n{HEADER}")
    rounds: list[dict[str, Any]] = []
    db_prefix = workdir / args.profile
    db_prefix.mkdir()
    for round_no in range(1, args.rounds + 1):
        bare = start_bare(args.profile)
        bare_summary = measured(bare, args)
        bare_peak = bare.stop()
        print(row(f"round {round_no} bare", bare_summary, bare_peak))
        gateway = start_gateway(args.profile, db_prefix, mqtt_url, round_no)
        gw_summary = measured(gateway, args)
        db = db_prefix / f"ledger-{round_no}.db"
        lag = outbox_pending(db)  # events not yet published when the load stopped
        time.sleep(1.0)  # let the relay drain before the gateway stops
        gw_peak = gateway.stop()
        pending = outbox_pending(db)
        print(row(f"round {round_no} gateway", gw_summary, gw_peak) + f"  outbox at end {lag}, 1 s later {pending}")
        rounds.append({"bare": bare_summary | {"peak_rss_mib": bare_peak},
                       "gateway": gw_summary | {"peak_rss_mib": gw_peak, "outbox_pending_at_end": lag,
                                                "outbox_pending_after": pending}})
        if args.via_host:
            via, via_peak = via_host_round(args, db_prefix, mqtt_url, round_no + 100)
            print(row(f"round {round_no} via iso-host", via, via_peak) + f"  host received {via['host_received']}")
            rounds[-1]["via_host"] = via | {"peak_rss_mib": via_peak}
    bare_tps = statistics.median(r["bare"]["tps"] for r in rounds)
    gw_tps = statistics.median(r["gateway"]["tps"] for r in rounds)
    half = gw_tps / 2
    gateway = start_gateway(args.profile, db_prefix, mqtt_url, 0)
    half_summary = measured(gateway, args, rate=half)
    half_peak = gateway.stop()
    print(row("gateway at half max", half_summary, half_peak))
    # the same nearest-rank percentile as the load generator's figures
    half_summary["gateway_logged_p99_ms"] = percentile(sorted(logged_latencies(db_prefix / "gateway-0.log")), 99)
    via_half_summary: dict[str, Any] = {}
    if args.via_host:
        via_half = statistics.median(r["via_host"]["tps"] for r in rounds) / 2
        via_half_summary, _ = via_host_round(args, db_prefix, mqtt_url, 100, rate=via_half)
        print(row("via iso-host at half", via_half_summary, 0.0))
    bare_cpu = statistics.median(r["bare"]["server_cpu_us_per_msg"] for r in rounds)
    gw_cpu = statistics.median(r["gateway"]["server_cpu_us_per_msg"] for r in rounds)
    summary = {
        "bare_tps_median": bare_tps,
        "gateway_tps_median": gw_tps,
        "ratio_gateway_to_bare": gw_tps / bare_tps if bare_tps else 0.0,
        "half_load_rate": half,
        "half_load_p99_ms": half_summary["p99_ms"],
        "half_load_p50_ms": half_summary["p50_ms"],
        "half_load_gateway_logged_p99_ms": half_summary["gateway_logged_p99_ms"],
        "bare_cpu_us_per_msg": bare_cpu,
        "gateway_cpu_us_per_msg": gw_cpu,
        "cpu_ratio_bare_to_gateway": bare_cpu / gw_cpu if gw_cpu else 0.0,
        "gateway_loop_thread_cpu_us_per_msg": statistics.median(
            r["gateway"]["busiest_thread_cpu_us_per_msg"] for r in rounds),
        "gateway_loop_thread_busy": statistics.median(r["gateway"]["busiest_thread_busy"] for r in rounds),
        "round_ratios": round_ratios(rounds),
        "bare_drift": drift(rounds),
    }
    if args.via_host:
        summary |= via_host_summary(rounds, bare_tps, gw_tps) | {
            "via_host_half_load_rate": via_half_summary["target_rate"],
            "via_host_half_load_p99_ms": via_half_summary["p99_ms"],
            "via_host_half_load_p50_ms": via_half_summary["p50_ms"]}
    return {"rounds": rounds, "half_load": half_summary | {"peak_rss_mib": half_peak}, "summary": summary,
            "via_host_half_load": via_half_summary}


def print_summary(name: str, summary: dict[str, Any]) -> None:
    s = summary
    print(f"\n{name}")
    print(f"  bare codec server (median) {s['bare_tps_median']:9.0f} msg/s")
    print(f"  gateway (median)           {s['gateway_tps_median']:9.0f} msg/s")
    print(f"  ratio gateway / bare       {s['ratio_gateway_to_bare']:9.1%}   (target >= 40%, aim 60%)")
    print("  ratio per round            " + " ".join(f"{r:.1%}" for r in s["round_ratios"]))
    if s["bare_drift"] > DRIFT_WARNING:
        print(f"    the machine's speed moved during this run: the bare server's rounds spread by "
              f"{s['bare_drift']:.0%} (read the ratio to a few points; benchmarks.ab alternates two versions)")
    print(f"  server CPU per message     bare {s['bare_cpu_us_per_msg']:.0f} µs, gateway "
          f"{s['gateway_cpu_us_per_msg']:.0f} µs (efficiency ratio {s['cpu_ratio_bare_to_gateway']:.1%})")
    print(f"  gateway event-loop thread  {s['gateway_loop_thread_cpu_us_per_msg']:.0f} µs per message, "
          f"{s['gateway_loop_thread_busy']:.0%} busy (its busiest thread; near 100% only less CPU on it helps)")
    print(f"  p99 at half load ({s['half_load_rate']:.0f} msg/s): {s['half_load_p99_ms']:.2f} ms   (target < 20 ms)")
    print(f"    as the gateway logged it: p99 {s['half_load_gateway_logged_p99_ms']:.2f} ms from decoding a request "
          "to answering it (the terminal's figure adds time in sockets and in the load generator)")


def side_by_side(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """One line per profile: the figures to compare across profiles (each measured against its own bare server)."""
    lines = [f"{'profile':<14} {'bare msg/s':>10} {'gateway msg/s':>13} {'ratio':>7} {'gw CPU µs':>9} "
             f"{'p99 half ms':>11}"]
    for name, result in profiles.items():
        s = result["summary"]
        lines.append(f"{name:<14} {s['bare_tps_median']:>10.0f} {s['gateway_tps_median']:>13.0f} "
                     f"{s['ratio_gateway_to_bare']:>7.1%} {s['gateway_cpu_us_per_msg']:>9.0f} "
                     f"{s['half_load_p99_ms']:>11.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gateway vs bare codec server, per wire profile")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--mix", default="purchase=80,refund=20")
    parser.add_argument("--profile", dest="profiles", default=DEFAULT_PROFILES,
                        help=f"comma-separated wire profiles, each measured in turn (default {DEFAULT_PROFILES})")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--upstream", choices=["none", "iso-host"], default=os.environ.get("BENCH_UPSTREAM", "none"),
                        help="iso-host: also run the gateway forwarding to iso-host each round of an iso87 profile "
                             "(env BENCH_UPSTREAM)")
    args = parser.parse_args(argv)
    names = [p.strip() for p in args.profiles.split(",") if p.strip()]

    results: dict[str, Any] = {"machine": machine(), "settings": vars(args) | {"output": str(args.output)},
                               "profiles": {}}
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"Python {results['machine']['python']}")
    print(f"load: {args.connections} connections x {args.pipeline} in flight, mix {args.mix}, "
          f"{args.duration:.0f} s per run; profiles {', '.join(names)}")
    with tempfile.TemporaryDirectory(prefix="iso-bench-") as tmp, mosquitto(Path(tmp)) as mqtt_url:
        for name in names:
            via_host = args.upstream == "iso-host" and name.startswith("iso87")
            profile_args = argparse.Namespace(**vars(args), profile=name, via_host=via_host)
            results["profiles"][name] = bench_profile(profile_args, Path(tmp), mqtt_url)
    for name, result in results["profiles"].items():
        print_summary(name, result["summary"])
        if "via_host_tps_median" in result["summary"]:
            print_via_host(result["summary"], result["via_host_half_load"])
    results["side_by_side"] = side_by_side(results["profiles"])
    print("\n" + "\n".join(results["side_by_side"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
