"""A/B: two versions of the gateway alternated in one run, to see a change of a few percent on a
machine whose speed drifts by more than that between runs.

``make bench`` compares the gateway with the bare codec server; between two of its runs a shared VM
may change speed by 10-25%, more than most single changes. Here each pair of runs drives the base
version and the head version back to back, in alternating order (AB, BA, AB, ...), so that a drift
of the machine hits both alike, and the pairs' ratios are summarised with a sign test.

    python -m benchmarks.ab --base HEAD~1                      # the working tree against HEAD~1
    python -m benchmarks.ab --base v0.1 --head HEAD --pairs 8 --duration 5
    python -m benchmarks.ab --base HEAD~1 --inproc             # benchmarks.inproc, no sockets

A version given as a git revision is exported (``git archive``) to a temporary directory; the head
defaults to the working tree, uncommitted changes included. TCP runs start each version's gateway
as ``make bench`` does (SQLite ledger with durable commits, a private Mosquitto when installed,
JSON logs to a file, a fresh ledger every run) and drive it with the working tree's load generator
(``make bench``'s settings); they report throughput and the event loop's CPU per message. In-process
runs report the event loop's CPU per message of ``benchmarks.inproc`` from each version's tree.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.run import ROOT, measured, mosquitto, start_gateway

__all__ = ["Comparison", "compare", "export", "main", "sign_test_p"]


@dataclass(frozen=True)
class Comparison:
    """Pairs of (base, head) figures of one kind, summarised."""

    #: head / base for each pair, in run order
    ratios: tuple[float, ...]
    median: float
    low: float
    high: float
    #: pairs where the head did better (higher, or lower with ``lower_is_better``)
    better: int
    #: two-sided sign test: the chance of a split at least this uneven if neither version were better
    p_value: float


def sign_test_p(better: int, pairs: int) -> float:
    """Two-sided sign test for ``better`` of ``pairs`` (ties count as neither, so ``pairs`` excludes them)."""
    if pairs <= 0:
        return 1.0
    tail = min(better, pairs - better)
    return min(1.0, 2 * sum(math.comb(pairs, k) for k in range(tail + 1)) / (1 << pairs))


def compare(pairs: list[tuple[float, float]], *, lower_is_better: bool = False) -> Comparison:
    """Summarise (base, head) figures: the ratios head / base, and how often the head did better."""
    if not pairs or any(base <= 0 for base, _ in pairs):
        raise ValueError("each pair needs a positive base figure")
    ratios = tuple(head / base for base, head in pairs)
    better = sum(1 for r in ratios if (r < 1 if lower_is_better else r > 1))
    untied = sum(1 for r in ratios if r != 1)
    return Comparison(ratios, statistics.median(ratios), min(ratios), max(ratios), better,
                      sign_test_p(better, untied))


def export(revision: str, into: Path) -> str:
    """Write the tree of ``revision`` to ``into``; returns its short commit id."""
    commit = subprocess.run(["git", "rev-parse", "--short", f"{revision}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if commit.returncode != 0:
        raise SystemExit(f"not a revision of this repository: {revision}")
    archive = subprocess.run(["git", "archive", "--format=tar", commit.stdout.strip()], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return commit.stdout.strip()


def working_tree_label() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "benchmarks"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{head} + uncommitted changes" if dirty else head


@dataclass(frozen=True)
class Version:
    label: str
    root: Path


#: one run of one version: a figure per kind (e.g. {"msg/s": ..., "loop µs/msg": ...})
Runner = Callable[[Version, int], dict[str, float]]


def tcp_runner(args: argparse.Namespace, workdir: Path, mqtt_url: str) -> Runner:
    def run(version: Version, number: int) -> dict[str, float]:
        server = start_gateway(args.profile, workdir, mqtt_url, number, root=version.root)
        try:
            summary = measured(server, args)
        finally:
            server.stop()
        if summary["errors"] or summary["timeouts"]:
            raise SystemExit(f"{version.label}: {summary['errors']} errors, {summary['timeouts']} time-outs")
        return {"msg/s": summary["tps"], "loop µs/msg": summary["busiest_thread_cpu_us_per_msg"]}

    return run


_INPROC_FIGURE = re.compile(r"event-loop thread ([0-9.]+) µs/msg")


def inproc_runner(args: argparse.Namespace) -> Runner:
    def run(version: Version, number: int) -> dict[str, float]:
        command = [sys.executable, "-m", "benchmarks.inproc", "--messages", str(args.messages),
                   "--refunds", str(args.refunds), "--profile", args.profile]
        out = subprocess.run(command, cwd=version.root, env=_env(version.root), capture_output=True, text=True,
                             check=False)
        found = _INPROC_FIGURE.search(out.stdout)
        if out.returncode != 0 or found is None:
            raise SystemExit(f"{version.label}: benchmarks.inproc failed: {(out.stderr or out.stdout)[-1500:]}")
        return {"loop µs/msg": float(found.group(1))}

    return run


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


LOWER_IS_BETTER = {"loop µs/msg"}


def run_pairs(base: Version, head: Version, pairs: int, runner: Runner) -> dict[str, list[tuple[float, float]]]:
    figures: dict[str, list[tuple[float, float]]] = {}
    for pair in range(pairs):
        order = (base, head) if pair % 2 == 0 else (head, base)
        results = {version.label: runner(version, 2 * pair + index) for index, version in enumerate(order)}
        b, h = results[base.label], results[head.label]
        for kind in b:
            figures.setdefault(kind, []).append((b[kind], h[kind]))
        cells = "  ".join(f"{kind} {b[kind]:9.1f} -> {h[kind]:9.1f} ({h[kind] / b[kind]:6.1%})" for kind in b)
        first = "base first" if order[0] is base else "head first"
        print(f"pair {pair + 1:2d} ({first}): {cells}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="two versions of the gateway, alternated in one run")
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", help="git revision (default: the working tree, uncommitted changes included)")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--inproc", action="store_true", help="benchmarks.inproc instead of TCP runs")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per TCP run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--mix", default="purchase=80,refund=20")
    parser.add_argument("--messages", type=int, default=8000, help="messages per in-process run")
    parser.add_argument("--refunds", type=int, default=20, help="percent of refunds in-process")
    parser.add_argument("--profile", default="iso87-binary")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="iso-ab-") as tmp:
        workdir = Path(tmp)
        base_root = workdir / "base"
        base = Version(f"base {export(args.base, base_root)}", base_root)
        if args.head is None:
            head = Version(f"head {working_tree_label()}", ROOT)
        else:
            head_root = workdir / "head"
            head = Version(f"head {export(args.head, head_root)}", head_root)
        what = "benchmarks.inproc" if args.inproc else (
            f"TCP, {args.connections} connections x {args.pipeline} in flight, {args.mix}, {args.duration:.0f} s")
        print(f"{base.label} against {head.label}: {args.pairs} pairs, {what}\n", flush=True)
        if args.inproc:
            figures = run_pairs(base, head, args.pairs, inproc_runner(args))
        else:
            with mosquitto(workdir) as mqtt_url:
                figures = run_pairs(base, head, args.pairs, tcp_runner(args, workdir, mqtt_url))
    print()
    for kind, pairs in figures.items():
        lower = kind in LOWER_IS_BETTER
        c = compare(pairs, lower_is_better=lower)
        print(f"{kind:12} head / base: median {c.median:.1%} (pairs {c.low:.1%} .. {c.high:.1%}); head better in "
              f"{c.better} of {len(pairs)} pairs, sign test p = {c.p_value:.3f}"
              + ("  (lower is better)" if lower else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
