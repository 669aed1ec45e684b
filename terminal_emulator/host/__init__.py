"""``iso-host``: an acquirer host simulator for integrators and tests.

It approves by default and declines, delays, drops or hangs up as a small rules file says; it
records every request it received (PAN masked). Like the terminal emulator it encodes with
pyiso8583 and the ``specs/`` data files (``terminal_emulator.codec``), never with the gateway's
codec, so a codec bug in the gateway cannot cancel out against the same bug in its test host.
"""

from __future__ import annotations

from .engine import HostEngine, Outcome, classify
from .journal import Record
from .rules import Decision, Rule, RulesError, Then, When, load_rules, parse_rules
from .server import HostSimulator

__all__ = [
    "Decision",
    "HostEngine",
    "HostSimulator",
    "Outcome",
    "Record",
    "Rule",
    "RulesError",
    "Then",
    "When",
    "classify",
    "load_rules",
    "parse_rules",
]
