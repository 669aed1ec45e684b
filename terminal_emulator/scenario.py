"""Scenarios: YAML scripts of terminal steps with expectations (see docs/emulator.md).

```yaml
name: Refund of the wrong amount
terminal: {tid: auto}            # auto (default): a fresh terminal id per run
steps:
  - id: sale
    sale: {amount: "12.34"}
    expect: {"39": "00", "38": {present: true}}
  - id: too_much
    refund: {rrn: "${sale.37}", amount: "20.00"}
    expect: {"39": "64"}
```

A step has one action (``sale``, ``preauth``, ``complete``, ``void``, ``refund``, ``reverse``,
``settle``, ``echo``, ``signon``, ``send``, ``resend``), an optional ``id`` to refer to its exchange
later (``${id.37}``, ``${id.request.11}``, ``${id.reversal.39}``, ``${id.mti}``), optional
``lose_response: true`` and ``expect``: path -> value, list of values (any of), or
``{not: value}`` / ``{present: bool}``. Paths: ``mti``, ``outcome``, a response field number,
``request.<n>``, ``reversal.<n>`` / ``reversal.mti`` (the stored reversal the terminal sent
before this step).

A scenario is dialect-neutral when it expects meanings rather than data elements; the profile's
dialect reads them: ``settlement`` (``balanced``, ``not_balanced``, ``error``: iso87 DE39 00/95,
cup the result digit of field 48), ``totals.debits_count`` / ``debits_amount`` / ``credits_count``
/ ``credits_amount`` (what the settlement request carried, minor units, no padding) and
``request.original_stan`` (the STAN of the transaction a correction or reversal points at).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .codec import IsoMessage
from .dialects import Dialect
from .errors import ConnectionFailed, ConnectionLost, ReversalPending, TerminalError, TransportError, UsageError
from .journal import Journal
from .money import AmountError, parse_major
from .profile import WireProfile
from .terminal import Exchange, Terminal

__all__ = [
    "ACTIONS",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "Step",
    "StepResult",
    "load_scenario",
    "parse_scenario",
    "run_scenario",
]

ACTIONS = ("sale", "preauth", "complete", "void", "refund", "reverse", "settle", "echo", "signon", "send",
           "resend")
_STEP_KEYS = frozenset({"id", "description", "expect", "lose_response", *ACTIONS})
_REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)\.([A-Za-z0-9_.]+)\}")


class ScenarioError(ValueError):
    """The scenario file is malformed, or a reference cannot be resolved."""


@dataclass(frozen=True, slots=True)
class Step:
    action: str
    params: Mapping[str, Any]
    id: str | None = None
    description: str | None = None
    expect: Mapping[str, Any] = field(default_factory=dict)
    lose_response: bool = False

    @property
    def label(self) -> str:
        return self.id or self.action


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    description: str = ""
    tid: str = "auto"
    mid: str = "MERCHANT0000001"
    currency: str | None = None  # None: the dialect's (840 iso87, 156 cup)
    pan: str | None = None  # None: the dialect's test card


@dataclass(slots=True)
class StepResult:
    step: Step
    exchanges: list[Exchange] = field(default_factory=list)
    main: Exchange | None = None
    failures: list[str] = field(default_factory=list)
    #: the run stopped at this step: a connection failure (its reason is the step's failure)
    stopped: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def reversal(self) -> Exchange | None:
        """The last stored reversal sent before this step's own request."""
        earlier = [e for e in self.exchanges if e is not self.main and e.kind == "reversal"]
        return earlier[-1] if earlier else None


@dataclass(slots=True)
class ScenarioResult:
    scenario: Scenario
    tid: str
    steps: list[StepResult] = field(default_factory=list)
    #: why the run stopped before its last step: the host could not be reached, or the connection
    #: was lost where no step expected it (every later step would only fail in its wake)
    stopped: str | None = None

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.steps) and len(self.steps) == len(self.scenario.steps)


# --- loading ------------------------------------------------------------------------------------
def load_scenario(path: Path | str) -> Scenario:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text("utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"scenario {p} is not valid YAML: {exc}") from None
    return parse_scenario(data, default_name=p.stem)


def parse_scenario(data: object, default_name: str = "scenario") -> Scenario:
    if not isinstance(data, Mapping):
        raise ScenarioError("a scenario is a mapping with 'steps'")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ScenarioError("a scenario needs a non-empty 'steps' list")
    terminal = data.get("terminal") or {}
    if not isinstance(terminal, Mapping):
        raise ScenarioError("'terminal' must be a mapping")
    steps = tuple(_parse_step(i, raw) for i, raw in enumerate(raw_steps, 1))
    ids = [s.id for s in steps if s.id]
    if len(ids) != len(set(ids)):
        raise ScenarioError("step ids must be unique")
    return Scenario(
        name=str(data.get("name", default_name)),
        description=str(data.get("description", "")).strip(),
        steps=steps,
        tid=str(terminal.get("tid", "auto")),
        mid=str(terminal.get("mid", "MERCHANT0000001")),
        currency=_text(terminal["currency"], "terminal.currency").zfill(3) if "currency" in terminal else None,
        pan=_text(terminal["pan"], "terminal.pan") if "pan" in terminal else None,
    )


def _parse_step(index: int, raw: object) -> Step:
    where = f"step {index}"
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: a step is a mapping")
    unknown = set(raw) - _STEP_KEYS
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    actions = [a for a in ACTIONS if a in raw]
    if len(actions) != 1:
        raise ScenarioError(f"{where}: exactly one action of {', '.join(ACTIONS)} is needed")
    action = actions[0]
    params = raw[action] or {}
    if not isinstance(params, Mapping):
        raise ScenarioError(f"{where}: the parameters of {action!r} must be a mapping")
    expect = raw.get("expect") or {}
    if not isinstance(expect, Mapping):
        raise ScenarioError(f"{where}: 'expect' must be a mapping")
    for key, matcher in expect.items():
        _check_matcher(f"{where} expect {key}", matcher)
    step_id = raw.get("id")
    return Step(
        action=action,
        params={str(k): v for k, v in params.items()},
        id=str(step_id) if step_id is not None else None,
        description=str(raw["description"]) if raw.get("description") else None,
        expect={str(k): v for k, v in expect.items()},
        lose_response=bool(raw.get("lose_response", False)),
    )


def _check_matcher(where: str, matcher: object) -> None:
    if isinstance(matcher, str):
        return
    if isinstance(matcher, list):
        for item in matcher:
            _check_matcher(where, item)
        return
    if isinstance(matcher, Mapping) and set(matcher) <= {"not", "present"}:
        if "not" in matcher:
            _check_matcher(where, matcher["not"])
        return
    raise ScenarioError(f"{where}: use a quoted string (e.g. \"00\"), a list, {{not: ...}} or {{present: ...}}")


def _text(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ScenarioError(f"{where}: expected text")
    return str(value)


# --- running ------------------------------------------------------------------------------------
class _Context:
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.results: dict[str, StepResult] = {}

    def lookup(self, step_id: str, path: str) -> str:
        result = self.results.get(step_id)
        if result is None:
            raise ScenarioError(f"reference to unknown or later step {step_id!r}")
        value = _path_value(result, path, self.dialect)
        if value is None:
            raise ScenarioError(f"${{{step_id}.{path}}} has no value")
        return value

    def interpolate(self, value: Any) -> Any:
        if isinstance(value, str):
            return _REF.sub(lambda m: self.lookup(m.group(1), m.group(2)), value)
        if isinstance(value, list):
            return [self.interpolate(v) for v in value]
        if isinstance(value, Mapping):
            return {k: self.interpolate(v) for k, v in value.items()}
        return value


_TOTALS = ("credits_count", "credits_amount", "debits_count", "debits_amount")


def _path_value(result: StepResult, path: str, dialect: Dialect) -> str | None:
    parts = path.split(".")
    exchange = result.main
    if parts[0] == "reversal":
        exchange = result.reversal
        parts = parts[1:]
    if exchange is None or not parts:
        return None
    head = parts[0]
    if head == "outcome":
        return exchange.outcome
    if head == "request":
        if len(parts) == 2 and parts[1] == "mti":
            return exchange.request.mti
        if len(parts) == 2 and parts[1] == "original_stan":
            return dialect.original_stan(exchange.request)
        return _field(exchange.request, parts[1:])
    if head == "totals":
        if len(parts) != 2 or parts[1] not in _TOTALS:
            raise ScenarioError(f"bad totals path {path!r} (use totals.{' / '.join(_TOTALS)})")
        totals = dialect.totals_sent(exchange.request)
        return None if totals is None else str(getattr(totals, parts[1]))
    if head == "mti":
        return exchange.response.mti if exchange.response is not None else None
    if exchange.response is None:
        return None
    if head == "settlement" and len(parts) == 1:
        return dialect.reconciliation(exchange.response)
    return _field(exchange.response, parts)


def _field(message: IsoMessage, parts: list[str]) -> str | None:
    if len(parts) != 1 or not parts[0].isdigit():
        raise ScenarioError(f"bad reference path {'.'.join(parts)!r}")
    return message.get(int(parts[0]))


def _matches(actual: str | None, matcher: Any, ctx: _Context) -> tuple[bool, str]:
    if isinstance(matcher, list):
        options = [ctx.interpolate(m) for m in matcher]
        ok = any(_matches(actual, m, ctx)[0] for m in options)
        return ok, f"one of {options}"
    if isinstance(matcher, Mapping):
        if "present" in matcher:
            want = bool(matcher["present"])
            return (actual is not None) == want, "present" if want else "absent"
        other = ctx.interpolate(matcher["not"])
        ok, text = _matches(actual, other, ctx)
        return not ok, f"not {text}"
    expected = ctx.interpolate(matcher)
    return actual == expected, repr(expected)


def _amount(params: Mapping[str, Any], key: str, currency: str, required: bool = False) -> int | None:
    minor_key = f"{key}_minor"
    if minor_key in params:
        value = params[minor_key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{minor_key} must be an integer")
        return value
    if key not in params:
        if required:
            raise ScenarioError(f"{key!r} is required")
        return None
    try:
        return parse_major(str(params[key]), currency)
    except AmountError as exc:
        raise ScenarioError(str(exc)) from None


def _opt(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    return None if value is None else str(value)


async def _perform(terminal: Terminal, step: Step, params: Mapping[str, Any], ctx: _Context) -> Exchange:
    cur = str(params.get("currency", terminal.currency))
    action = step.action
    if action in ("sale", "preauth"):
        amount = _amount(params, "amount", cur, required=True)
        assert amount is not None
        call = terminal.sale if action == "sale" else terminal.preauth
        return await call(amount, pan=_opt(params, "pan"), expiry=_opt(params, "expiry"), currency=cur)
    if action == "complete":
        return await terminal.complete(
            _opt(params, "rrn"), amount=_amount(params, "amount", cur),
            approval_code=_opt(params, "approval_code"), pan=_opt(params, "pan"), currency=_opt(params, "currency"),
        )
    if action == "void":
        rrn = _opt(params, "rrn")
        if rrn is None:
            raise ScenarioError("void needs 'rrn'")
        return await terminal.void(rrn, amount=_amount(params, "amount", cur), pan=_opt(params, "pan"),
                                   currency=_opt(params, "currency"))
    if action == "refund":
        return await terminal.refund(
            _opt(params, "rrn"), amount=_amount(params, "amount", cur), pan=_opt(params, "pan"),
            currency=_opt(params, "currency"), by_original_data=bool(params.get("by_original_data", False)),
        )
    if action == "reverse":
        return await terminal.reverse(
            _opt(params, "rrn"), stan=_opt(params, "stan"), advice=bool(params.get("advice", False)),
            partial_amount=_amount(params, "partial_amount", cur), pan=_opt(params, "pan"),
        )
    if action == "settle":
        return await terminal.settle(
            credits_count=_int_opt(params, "credits_count"),
            credits_amount=_amount(params, "credits_amount", cur),
            debits_count=_int_opt(params, "debits_count"),
            debits_amount=_amount(params, "debits_amount", cur),
        )
    if action == "echo":
        return await terminal.echo(str(params.get("code", "301")))
    if action == "signon":
        return await terminal.signon(str(params.get("operator", "01")))
    if action == "send":
        mti = _opt(params, "mti")
        raw_fields = params.get("fields") or {}
        if mti is None or not isinstance(raw_fields, Mapping):
            raise ScenarioError("send needs 'mti' and a 'fields' mapping")
        return await terminal.send(IsoMessage(mti=mti, fields=_fields(raw_fields)))
    # resend
    target = _opt(params, "step")
    earlier = ctx.results.get(target or "")
    if earlier is None or earlier.main is None:
        raise ScenarioError(f"resend needs 'step': the id of an earlier step, got {target!r}")
    overrides = params.get("fields") or {}
    if not isinstance(overrides, Mapping):
        raise ScenarioError("resend 'fields' must be a mapping")
    return await terminal.resend(earlier.main, mti=_opt(params, "mti"), fields=_fields(overrides) or None,
                                 repeat=bool(params.get("repeat", False)))


def _fields(raw: Mapping[Any, Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, value in raw.items():
        if not str(key).isdigit() or not isinstance(value, str):
            raise ScenarioError(f"field {key!r}: numbers as keys, quoted strings as values")
        out[int(key)] = value
    return out


def _int_opt(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{key} must be an integer")
    return value


def new_tid(rng: random.Random | None = None) -> str:
    """A fresh 8-character terminal id (``S`` + 7 digits) so each run starts with an empty batch."""
    return "S" + f"{(rng or random).randrange(10**7):07d}"


async def run_scenario(
    scenario: Scenario,
    *,
    host: str,
    port: int,
    profile: WireProfile,
    response_timeout: float = 10.0,
    tid: str | None = None,
    mid: str | None = None,
    journal: Journal | None = None,
    tpdu: bytes | None = None,
    on_exchange: Callable[[Step, Exchange], None] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> ScenarioResult:
    """Play every step in order; a failed expectation is recorded and the run goes on, but a
    connection failure (the host cannot be reached, the connection is lost where the step did not
    expect ``outcome: connection_lost``, a stored reversal cannot be delivered) stops the run there,
    with the reason in ``stopped``."""
    terminal_id = tid or (new_tid() if scenario.tid == "auto" else scenario.tid)
    result = ScenarioResult(scenario=scenario, tid=terminal_id)
    current: list[Exchange] = []
    current_step: list[Step] = []

    def collect(exchange: Exchange) -> None:
        current.append(exchange)
        if on_exchange is not None and current_step:
            on_exchange(current_step[0], exchange)

    async with Terminal(
        host, port, profile=profile, tid=terminal_id, mid=mid or scenario.mid, currency=scenario.currency,
        pan=scenario.pan, journal=journal or Journal(), timeout=response_timeout, tpdu=tpdu, on_exchange=collect,
    ) as terminal:
        ctx = _Context(terminal.dialect)
        for step in scenario.steps:
            current.clear()
            current_step[:] = [step]
            step_result = StepResult(step=step)
            try:
                params = ctx.interpolate(dict(step.params))
                if step.lose_response:
                    terminal.lose_next_response()
                step_result.main = await _perform(terminal, step, params, ctx)
            except (ReversalPending, ConnectionFailed) as exc:
                result.stopped = str(exc)
            except TransportError as exc:
                # A time-out or a lost connection is an outcome a step may expect; checked below.
                step_result.main = exc.exchange
                unexpected_loss = isinstance(exc, ConnectionLost) and step.expect.get("outcome") != "connection_lost"
                if exc.exchange is None or unexpected_loss:
                    result.stopped = str(exc)
            except (ScenarioError, UsageError, TerminalError) as exc:
                step_result.failures.append(f"{type(exc).__name__}: {exc}")
            step_result.exchanges = list(current)
            if result.stopped is not None:
                step_result.failures.append(result.stopped)
                step_result.stopped = True
            elif step_result.main is not None:
                _check(step, step_result, ctx)
            elif not step_result.failures:
                step_result.failures.append("no exchange took place")
            if step.id:
                ctx.results[step.id] = step_result
            result.steps.append(step_result)
            if on_step is not None:
                on_step(step_result)
            if result.stopped is not None:
                break
    return result


def _check(step: Step, result: StepResult, ctx: _Context) -> None:
    expect = dict(step.expect)
    outcome = expect.pop("outcome", "lost" if step.lose_response else "answered")
    got = _path_value(result, "outcome", ctx.dialect)
    ok, wanted = _matches(got, outcome, ctx)
    if not ok:
        result.failures.append(f"outcome: expected {wanted}, got {got!r}")
        return
    for path, matcher in expect.items():
        try:
            actual = _path_value(result, path, ctx.dialect)
            ok, wanted = _matches(actual, matcher, ctx)
        except ScenarioError as exc:
            result.failures.append(f"{path}: {exc}")
            continue
        if not ok:
            shown = "absent" if actual is None else repr(actual)
            result.failures.append(f"{path}: expected {wanted}, got {shown}")
