"""The host simulator's rules: which requests to decline, delay, leave unanswered or hang up on.

Pure: parsing a rules document (TOML or YAML, already loaded into a mapping) with errors that name
the rule and the key, and :class:`RuleBook`, which picks the first matching rule for a request and
counts matches (for ``nth`` and ``times``). No I/O except :func:`load_rules`, which reads the file.

```toml
[[rule]]
name = "big tickets"                    # optional, shown in the journal and the log
when = { amount_over = 100000 }         # every condition must hold; no `when` matches everything
then = { code = "51" }                  # decline
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..codec import IsoMessage

__all__ = [
    "Decision",
    "Rule",
    "RuleBook",
    "RulesError",
    "Then",
    "When",
    "card_number",
    "load_rules",
    "luhn_valid",
    "parse_rules",
]


class RulesError(ValueError):
    """A rules file is missing or malformed (``iso-host`` exits 2 with this message)."""


@dataclass(frozen=True, slots=True)
class When:
    """Conditions on a request; all given ones must hold. Text values are alternatives (any of).

    ``mti`` (e.g. ``0200``), ``processing_code`` (prefix of DE3: ``20`` refunds), ``amount`` (DE4
    exactly, minor units), ``amount_over`` / ``amount_under`` (DE4 strictly above / below), ``pan``
    (exact), ``pan_prefix``, ``pan_fails_luhn`` (the PAN of DE2, else of DE35 track 2), ``stan``
    (DE11), ``terminal`` (DE41), ``merchant`` (DE42), ``network_code`` (DE70) and ``nth`` (the Nth
    request, counting from 1, among those that meet the rule's other conditions).
    """

    mti: tuple[str, ...] = ()
    processing_code: tuple[str, ...] = ()
    amount: tuple[int, ...] = ()
    amount_over: int | None = None
    amount_under: int | None = None
    pan: tuple[str, ...] = ()
    pan_prefix: tuple[str, ...] = ()
    pan_fails_luhn: bool | None = None
    stan: tuple[str, ...] = ()
    terminal: tuple[str, ...] = ()
    merchant: tuple[str, ...] = ()
    network_code: tuple[str, ...] = ()
    nth: tuple[int, ...] = ()

    def holds(self, request: IsoMessage) -> bool:
        """Every condition but ``nth`` (which needs the rule's count) holds for ``request``."""
        fields = request.fields
        if self.mti and request.mti not in self.mti:
            return False
        if self.processing_code and not _starts_with_any(fields.get(3), self.processing_code):
            return False
        if not self._amount_holds(fields.get(4)):
            return False
        if self.pan or self.pan_prefix or self.pan_fails_luhn is not None:
            pan = card_number(request)
            if pan is None:
                return False
            if self.pan and pan not in self.pan:
                return False
            if self.pan_prefix and not _starts_with_any(pan, self.pan_prefix):
                return False
            if self.pan_fails_luhn is not None and luhn_valid(pan) == self.pan_fails_luhn:
                return False
        for wanted, number in ((self.stan, 11), (self.terminal, 41), (self.merchant, 42), (self.network_code, 70)):
            if wanted and (fields.get(number) or "").rstrip() not in wanted:
                return False
        return True

    def _amount_holds(self, raw: str | None) -> bool:
        if not (self.amount or self.amount_over is not None or self.amount_under is not None):
            return True
        if raw is None or not raw.isdigit():
            return False
        value = int(raw)
        if self.amount and value not in self.amount:
            return False
        if self.amount_over is not None and not value > self.amount_over:
            return False
        return self.amount_under is None or value < self.amount_under


@dataclass(frozen=True, slots=True)
class Then:
    """What to do: answer with ``code`` (and ``approval_code``), after ``delay_ms``; or ``drop``
    (no answer at all) or ``close`` (hang up, after ``delay_ms``). ``times``: only the first N
    matching requests; later ones go on to the next rules. Nothing given: answer as by default."""

    code: str | None = None
    approval_code: str | None = None
    delay_ms: float = 0
    drop: bool = False
    close: bool = False
    times: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    when: When = field(default_factory=When)
    then: Then = field(default_factory=Then)
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen rule's effect on one request (``rule`` is its 1-based position; None: no rule)."""

    rule: int | None = None
    name: str | None = None
    code: str | None = None
    approval_code: str | None = None
    delay_ms: float = 0
    drop: bool = False
    close: bool = False


class RuleBook:
    """The rules in order, with the per-rule counts that ``nth`` and ``times`` need."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._seen = [0] * len(self.rules)  # requests that met the rule's conditions (nth)
        self._applied = [0] * len(self.rules)  # requests the rule decided (times)

    def decide(self, request: IsoMessage) -> Decision:
        """The first rule that matches wins; later rules do not see (nor count) the request."""
        for index, rule in enumerate(self.rules):
            if not rule.when.holds(request):
                continue
            self._seen[index] += 1
            if rule.when.nth and self._seen[index] not in rule.when.nth:
                continue
            if rule.then.times is not None and self._applied[index] >= rule.then.times:
                continue
            self._applied[index] += 1
            then = rule.then
            return Decision(index + 1, rule.name, then.code, then.approval_code, then.delay_ms, then.drop, then.close)
        return Decision()


def card_number(request: IsoMessage) -> str | None:
    """The PAN: DE2, else the part of DE35 (track 2) before its separator."""
    pan = request.fields.get(2)
    if pan:
        return pan
    track = request.fields.get(35)
    if track:
        return track.replace("D", "=").split("=", 1)[0] or None
    return None


def luhn_valid(pan: str) -> bool:
    if not pan.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(pan)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _starts_with_any(value: str | None, prefixes: tuple[str, ...]) -> bool:
    return value is not None and value.startswith(prefixes)


# --- parsing -------------------------------------------------------------------------------------
def load_rules(path: str | Path) -> list[Rule]:
    """Read a rules file: ``.toml``, or ``.yaml`` / ``.yml``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise RulesError(f"{path}: cannot read the rules file ({reason})") from None
    data: object
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RulesError(f"{path}: not valid YAML: {exc}") from None
    elif path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{path}: not valid TOML: {exc}") from None
    else:
        raise RulesError(f"{path}: a rules file ends in .toml, .yaml or .yml")
    try:
        return parse_rules(data)
    except RulesError as exc:
        raise RulesError(f"{path}: {exc}") from None


def parse_rules(data: object) -> list[Rule]:
    """Rules from a parsed document: ``{"rule": [{"when": {...}, "then": {...}, "name": ...}, ...]}``."""
    if not isinstance(data, Mapping):
        raise RulesError("the document must be a table with a `rule` list")
    unknown = sorted(str(k) for k in data if k != "rule")
    if unknown:
        raise RulesError(f"unknown top-level key {unknown[0]!r} (expected only `rule`, as [[rule]] tables)")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError("`rule` must be a list of tables (write [[rule]] in TOML)")
    return [_parse_rule(raw, number) for number, raw in enumerate(raw_rules, start=1)]


def _parse_rule(raw: object, number: int) -> Rule:
    where = f"rule {number}"
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where}: must be a table with `when` and `then`")
    _refuse_unknown(raw, ("name", "when", "then"), where)
    name = raw.get("name")
    if name is not None and not (isinstance(name, str) and name):
        raise RulesError(f"{where}: name must be a non-empty string")
    if "then" not in raw:
        raise RulesError(f"{where}: missing `then` (what to do: code, delay_ms, drop, close, times)")
    return Rule(when=_parse_when(raw.get("when", {}), where), then=_parse_then(raw["then"], where), name=name)


_WHEN_TEXT: dict[str, Callable[[str], bool]] = {
    "mti": lambda v: len(v) == 4 and v.isdigit(),
    "processing_code": lambda v: 1 <= len(v) <= 6 and v.isdigit(),
    "pan": lambda v: 8 <= len(v) <= 19 and v.isdigit(),
    "pan_prefix": lambda v: 1 <= len(v) <= 19 and v.isdigit(),
    "terminal": lambda v: 1 <= len(v) <= 8,
    "merchant": lambda v: 1 <= len(v) <= 15,
    "network_code": lambda v: len(v) == 3 and v.isdigit(),
}
_WHEN_TEXT_HINT = {
    "mti": "4 digits, quoted, e.g. \"0200\"",
    "processing_code": "1 to 6 digits, quoted, e.g. \"20\"",
    "pan": "8 to 19 digits, quoted",
    "pan_prefix": "1 to 19 digits, quoted",
    "terminal": "1 to 8 characters",
    "merchant": "1 to 15 characters",
    "network_code": "3 digits, quoted, e.g. \"301\"",
}
_WHEN_LISTS: dict[str, Callable[[object, str], Any]] = {
    "amount": lambda v, where: _integer(v, where, 0),
    "stan": lambda v, where: _stan(v, where),
    "nth": lambda v, where: _integer(v, where, 1),
}
_WHEN_KEYS = (*_WHEN_TEXT, *_WHEN_LISTS, "amount_over", "amount_under", "pan_fails_luhn")


def _parse_when(raw: object, where: str) -> When:
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where}: `when` must be a table, e.g. when = {{ amount_over = 100000 }}")
    _refuse_unknown(raw, _WHEN_KEYS, f"{where}: when")
    values: dict[str, Any] = {}
    for key, check in _WHEN_TEXT.items():
        if key in raw:
            values[key] = _texts(raw[key], f"{where}: when.{key}", check, _WHEN_TEXT_HINT[key])
    for key, parse_one in _WHEN_LISTS.items():
        if key in raw:
            label = f"{where}: when.{key}"
            values[key] = tuple(parse_one(item, label) for item in _alternatives(raw[key], label))
    for key in ("amount_over", "amount_under"):
        if key in raw:
            values[key] = _integer(raw[key], f"{where}: when.{key}", 0)
    if "pan_fails_luhn" in raw:
        values["pan_fails_luhn"] = _boolean(raw["pan_fails_luhn"], f"{where}: when.pan_fails_luhn")
    return When(**values)


def _parse_then(raw: object, where: str) -> Then:
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where}: `then` must be a table, e.g. then = {{ code = \"51\" }}")
    _refuse_unknown(raw, ("code", "approval_code", "delay_ms", "drop", "close", "times"), f"{where}: then")
    code = raw.get("code")
    if code is not None and not (isinstance(code, str) and len(code) == 2 and code.isalnum()):
        raise RulesError(f"{where}: then.code must be 2 characters, quoted (\"51\"; YAML reads 51 or 00 as numbers)")
    approval = raw.get("approval_code")
    if approval is not None and not (isinstance(approval, str) and 1 <= len(approval) <= 6 and approval.isalnum()):
        raise RulesError(f"{where}: then.approval_code must be 1 to 6 letters or digits, quoted")
    delay = raw.get("delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 3_600_000:
        raise RulesError(f"{where}: then.delay_ms must be a number of milliseconds from 0 to 3600000")
    drop = _boolean(raw.get("drop", False), f"{where}: then.drop")
    close = _boolean(raw.get("close", False), f"{where}: then.close")
    times = _integer(raw["times"], f"{where}: then.times", 1) if "times" in raw else None
    if drop and close:
        raise RulesError(f"{where}: then.drop and then.close exclude each other (drop keeps the connection)")
    if (drop or close) and (code is not None or approval is not None):
        raise RulesError(f"{where}: then.code and then.approval_code mean nothing when nothing is answered "
                         "(drop or close)")
    if drop and delay:
        raise RulesError(f"{where}: then.delay_ms means nothing with drop (no answer is ever sent)")
    if approval is not None and code not in (None, "00"):
        raise RulesError(f"{where}: then.approval_code goes with an approval (code \"00\" or none)")
    return Then(code=code, approval_code=approval, delay_ms=delay, drop=drop, close=close, times=times)


def _refuse_unknown(raw: Mapping[Any, Any], allowed: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            raise RulesError(f"{where}: unknown key {str(key)!r} (known: {', '.join(allowed)})")


def _alternatives(value: object, where: str) -> list[object]:
    items = list(value) if isinstance(value, list) else [value]
    if not items:
        raise RulesError(f"{where}: an empty list matches nothing; remove the key instead")
    return items


def _texts(value: object, where: str, check: Callable[[str], bool], hint: str) -> tuple[str, ...]:
    items = _alternatives(value, where)
    for item in items:
        if not isinstance(item, str) or not check(item):
            raise RulesError(f"{where}: {item!r} is not valid ({hint})")
    return tuple(str(item).rstrip() for item in items)  # DE41/DE42 are compared without their padding


def _integer(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RulesError(f"{where}: must be an integer of at least {minimum}, got {value!r}"
                         + (" (amounts are minor units: 100.00 is 10000)" if "amount" in where else ""))
    return value


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise RulesError(f"{where}: must be true or false, got {value!r}")
    return value


def _stan(value: object, where: str) -> str:
    # Text only: YAML would read an unquoted 000123 as the octal number 83.
    if not isinstance(value, str) or not value.isdigit() or not 1 <= len(value) <= 6:
        raise RulesError(f"{where}: must be up to 6 digits, quoted (\"000123\"), got {value!r}")
    return value.zfill(6)
