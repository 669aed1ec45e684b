"""The README's quick start and tour, run as written in a fresh clone, twice in a row (issue 22).

What "as written" means here:

- **The clone**: the files of this tree that ``git clone`` would give (tracked, and new files git does
  not ignore, so that uncommitted work is tested too), copied to a new folder: no ``.venv``, no
  ``gateway.db``, no ``demo-output``, no caches.
- **Its .venv**: ``make`` would build it with pip, downloading every dependency (minutes, and the
  network, for what is already installed here). Instead the clone gets a virtual environment of the
  same interpreter whose ``site-packages`` reach the clone's own code first, then the dependencies
  installed in this one, with the console scripts pip would write and the Makefile's stamp, so that
  ``make demo`` and ``make test`` run as written without installing anything. ``README_TOUR_FULL=1``
  runs the long variant: ``make`` builds ``.venv`` itself, and ``make test`` runs the whole suite
  (minutes; not in CI).
- **``make test``** runs as written, on a bounded slice of the suite (``PYTEST_ADDOPTS`` names two test
  files; pytest reads that variable itself), except in the long variant.
- **The commands**: every line of the ``sh`` blocks of "Quickstart" and "A short tour", in order, by
  bash in the clone. ``iso-gateway serve``, ``iso-host serve`` and ``mosquitto_sub`` run in terminals
  of their own (in the background) until the tour stops them: the gateway when the README says "Stop"
  (Ctrl-C is SIGINT: exit 0), the rest (the second gateway, in front of the host, included) at the
  end. Every other line must exit 0, and a line whose comment starts with a response code must get it.
- **The machine**: Mosquitto answers on 127.0.0.1:1883 (as here and in CI), 8583 and 8600 are free; a new
  home folder (a new user, so no terminal journal yet), the same for both runs. Runs of this test on
  one machine take turns (a lock file): they need the same ports.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from brokers import missing_service, port_accepts, wait_until

REPO = Path(__file__).resolve().parents[2]
FULL = os.environ.get("README_TOUR_FULL") == "1"
INNER = "README_TOUR_INNER"  #: set for the suite the long variant runs inside the clone
SLICE = "tests/unit/test_config.py tests/unit/test_framing.py"
LOCK = Path("/tmp/iso-gateway-readme-tour.lock")
#: commands that run until stopped, each in a terminal of its own
LONG_RUNNING = ("iso-gateway serve", "iso-host serve", "mosquitto_sub")
#: the gateway's and the acquirer host simulator's default ports
TOUR_PORTS = (8583, 8600)

pytestmark = pytest.mark.skipif(os.environ.get(INNER) == "1", reason="inside the long variant's own suite run")


# --- the README, read as a newcomer reads it --------------------------------------------------------


@dataclass(frozen=True)
class Line:
    command: str
    comment: str = ""

    @property
    def expected_code(self) -> str | None:
        """``# 64 exceeds_refundable: ...`` -> ``64``."""
        match = re.match(r"(\d\d)\b", self.comment)
        return match.group(1) if match else None


STOP = Line("<stop the gateway>")


def readme_steps() -> list[Line]:
    """The lines of the sh blocks of "Quickstart" and "A short tour", in order, with :data:`STOP` where
    the tour says to stop the gateway."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    steps: list[Line] = []
    for title in ("Quickstart", "A short tour"):
        section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        for part in re.split(r"(```sh\n.*?```|\n\*\*Stop\*\*)", section, flags=re.DOTALL):
            if part == "\n**Stop**":
                steps.append(STOP)
            elif part.startswith("```sh"):
                for raw in part.splitlines()[1:-1]:
                    command, *comment = re.split(r"\s{2,}#\s*", raw.strip(), maxsplit=1)
                    if command:
                        steps.append(Line(command, "".join(comment)))
    return steps


def test_a_long_running_command_is_run_as_the_process_itself() -> None:
    assert exec_line(".venv/bin/iso-gateway serve") == "exec .venv/bin/iso-gateway serve"
    assert exec_line("A=tcp://x:1 B= .venv/bin/x --y=1") == "A=tcp://x:1 B= exec .venv/bin/x --y=1"


def test_the_tour_reads_as_this_test_expects() -> None:
    """The parse above finds what the README asks a newcomer to do (if the README changes shape, this
    says so before the tour below fails in a less obvious way)."""
    commands = [step.command for step in readme_steps()]
    assert commands[:2] == ["make demo", "make test"]
    assert ".venv/bin/iso-gateway serve" in commands
    assert "mosquitto_sub -t 'pos/corrections/#' -v" in commands
    assert commands.index(".venv/bin/iso-gateway serve") < commands.index(STOP.command) < len(commands) - 1
    assert not any(re.search(r"\b\d{12}\b", command) for command in commands), "no literal RRN"
    codes = [step.expected_code for step in readme_steps() if step.expected_code]
    assert codes == ["00", "00", "64", "00", "51"]
    upstream = next(c for c in commands if "GATEWAY_UPSTREAM__URL" in c)
    assert commands.index("<stop the gateway>") < commands.index(upstream)  # the second gateway, after the first


# --- the clone ------------------------------------------------------------------------------------


def fresh_clone(into: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    clone = into / "iso-gateway"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a file deleted from the tree but not from the index is not in a clone
            target = clone / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return clone


def borrow_venv(clone: Path) -> None:
    """A .venv for the clone that installs nothing: see the module's docstring. Its console scripts
    are those pip writes: the clone's own (``[project.scripts]`` of its pyproject.toml) and pytest's."""
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "readme-tour.pth").write_text(f"{clone}\n{sysconfig.get_paths()['purelib']}\n")
    project = tomllib.loads((clone / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    scripts = {**project["scripts"], "pytest": entry_points(group="console_scripts", name="pytest")["pytest"].value}
    for name, target in scripts.items():
        module, function = target.split(":")
        script = venv / "bin" / name
        script.write_text(
            f"#!{venv}/bin/python\nimport sys\nfrom {module} import {function}\n"
            f"if __name__ == '__main__':\n    sys.exit({function}())\n"
        )
        script.chmod(0o755)
    (venv / ".installed").touch()  # the Makefile's stamp, newer than pyproject.toml


# --- running it ------------------------------------------------------------------------------------


@dataclass
class Terminal:
    """A command that runs until stopped, its output in a file."""

    process: subprocess.Popen[bytes]
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@dataclass
class Tour:
    clone: Path
    env: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)
    terminals: list[Terminal] = field(default_factory=list)
    gateway: Terminal | None = None  #: the first gateway (stopped where the README says "Stop")
    events: Terminal | None = None
    host: Terminal | None = None

    def run(self, step: Line) -> None:
        if step is STOP:
            self.stop_gateway()
        elif any(name in step.command for name in LONG_RUNNING):
            self.start(step)
        else:
            self.once(step)

    def once(self, step: Line) -> None:
        env = dict(self.env)
        if step.command == "make test" and not FULL:
            env["PYTEST_ADDOPTS"] = f"-p no:cacheprovider {SLICE}"
        result = subprocess.run(
            ["bash", "-c", step.command], cwd=self.clone, env=env, capture_output=True, text=True, timeout=600
        )
        shown = f"$ {step.command}\n{result.stdout}{result.stderr}"
        assert result.returncode == 0, shown
        if step.expected_code is not None:
            assert re.search(rf"^<- \d{{4}} {step.expected_code}\b", result.stdout, re.MULTILINE), shown
        self.outputs[step.command] = result.stdout

    def start(self, step: Line) -> None:
        output = self.clone.parent / f"terminal-{len(self.terminals) + 1}.out"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", exec_line(step.command)],
                cwd=self.clone,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        terminal = Terminal(process, output)
        self.terminals.append(terminal)
        if "iso-gateway serve" in step.command:
            self.gateway = self.gateway or terminal
            wait_until(lambda: '"gateway.started"' in terminal.text() or process.poll() is not None, 20, "the gateway")
            assert process.poll() is None, terminal.text()
        elif "iso-host serve" in step.command:
            self.host = terminal
            wait_until(lambda: "listening on" in terminal.text() or process.poll() is not None, 20, "the host")
            assert process.poll() is None, terminal.text()
        else:
            self.events = terminal
            wait_until(lambda: subscribed(process.pid, 1883) or process.poll() is not None, 10, "mosquitto_sub")
            assert process.poll() is None, terminal.text()

    def refund_events(self) -> list[dict[str, Any]]:
        """The refund events of this run's sale that ``mosquitto_sub`` printed, in order."""
        assert self.events is not None
        rrn = sale_rrn(self)
        return [
            event
            for line in self.events.text().splitlines()
            if line.startswith("pos/corrections/MERCHANT0000001/TERM0001/refund/")
            and (event := json.loads(line.split(" ", 1)[1]))["subject"].endswith(f"/{rrn}")
        ]

    def stop_gateway(self) -> None:
        assert self.gateway is not None
        # as a person would, once the second terminal showed the tour's two refund events
        wait_until(lambda: len(self.refund_events()) >= 2, 15, "the refund events on mosquitto_sub")
        self.gateway.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert self.gateway.process.wait(timeout=30) == 0, self.gateway.text()

    def close(self) -> None:
        for terminal in self.terminals:
            if terminal.process.poll() is None:
                terminal.process.send_signal(signal.SIGINT)
                try:
                    terminal.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    terminal.process.kill()
                    terminal.process.wait()


def exec_line(command: str) -> str:
    """``command`` run by bash as the process itself (signals reach it): ``exec`` after its leading
    variable assignments (``A=1 exec cmd`` passes ``A`` to ``cmd``; ``exec A=1 cmd`` fails)."""
    words = command.split(" ")
    settings = 0
    while settings < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[settings]):
        settings += 1
    return " ".join([*words[:settings], "exec", *words[settings:]])


def subscribed(pid: int, port: int) -> bool:
    """Whether process ``pid`` has an established TCP connection to ``port`` (Linux ``/proc``): then
    its SUBSCRIBE went out right after, long before the next command's first event."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                cells = row.split()
                if (
                    int(cells[2].rsplit(":", 1)[1], 16) == port
                    and cells[3] == "01"
                    and f"socket:[{cells[9]}]" in inodes
                ):
                    return True
    return False


@contextlib.contextmanager
def machine_for_the_tour() -> Iterator[None]:
    """One tour at a time on this machine; Mosquitto on 1883, free 8583 and 8600, or the test cannot run."""
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not port_accepts("127.0.0.1", 1883):
                missing_service("the README tour needs Mosquitto listening on 127.0.0.1:1883")
            if shutil.which("mosquitto_sub") is None:
                missing_service("the README tour runs mosquitto_sub, which is not installed")
            deadline = time.monotonic() + 30  # a gateway of a test that just ended may still be closing
            for port in TOUR_PORTS:
                while port_accepts("127.0.0.1", port):
                    if time.monotonic() > deadline:
                        missing_service(f"port {port} is in use on this machine; the README tour needs it")
                    time.sleep(0.2)
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
                    probe.bind(("127.0.0.1", port))  # free now: nothing else bound it without listening
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sale_rrn(tour: Tour) -> str:
    sale = next(command for command in tour.outputs if " sale " in command)
    match = re.search(r"^<- 0210 00 approved  RRN (\d{12})", tour.outputs[sale], re.MULTILINE)
    assert match is not None, tour.outputs[sale]
    return match.group(1)


@pytest.mark.timeout(900 if FULL else 240)
def test_the_readme_quick_start_and_tour_work_as_written_in_a_fresh_clone_twice_in_a_row(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path)
    if not FULL:
        borrow_venv(clone)
    home = tmp_path / "home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith(("GATEWAY_", "XDG_", "PYTEST_"))}
    env.update({"HOME": str(home), INNER: "1"})
    env.pop("VIRTUAL_ENV", None)
    steps = readme_steps()
    rrns = []
    with machine_for_the_tour():
        for run in (1, 2):
            tour = Tour(clone, env)
            try:
                for step in steps:
                    tour.run(step)
            finally:
                tour.close()
            assert tour.gateway is not None and tour.events is not None
            log = [json.loads(line) for line in tour.gateway.text().splitlines() if line.startswith("{")]
            (broker,) = [line for line in log if line["event"] == "mqtt.broker"]
            assert broker["mode"] == "local", broker  # the machine's Mosquitto, not a second broker
            rrn = sale_rrn(tour)
            ours = tour.refund_events()
            assert [(e["type"], e["data"]["request"]["amount"]) for e in ours] == [
                ("pos.refund.approved", 6000),
                ("pos.refund.declined", 5000),
            ], f"run {run}: mosquitto_sub saw {tour.events.text()}"
            assert "gateway log: demo-output/gateway.log" in tour.outputs["make demo"]
            assert "TERM0001" in tour.outputs[".venv/bin/iso-gateway batches --open"]
            assert tour.host is not None
            assert len(re.findall(r"\b0200\b", tour.host.text())) == 2, tour.host.text()  # the two sales it decided
            assert "nothing queued" in tour.outputs[".venv/bin/iso-gateway saf status"], tour.outputs
            rrns.append(rrn)
    assert rrns[0] != rrns[1]  # the second run refunded its own sale, whatever its RRN
    assert int(rrns[1]) - int(rrns[0]) < 1000  # and no block of RRNs was lost in between
